"""dataset.format=shards: an ImageFolder packed into tar shards (`python -m imgtrain.pack`), read
one sample at a time with one positioned read.

Sample i is the ImageFolder's sample i (data/shard_format.py), so the samplers, the augmentation
seeds and the decoding are the folder's: the same seed gives the same batches bit for bit. What
changes is what the file system sees: per image, one pread() on a shard file the worker already
has open, where a folder costs openat, fstat, read and close (metadata round trips on NFS or
Lustre). No mmap (page faults on a network file system are one synchronous round trip each) and
no local copy: the shards stay where they are.
"""
from __future__ import annotations

import os
import resource
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np

from imgtrain.data import transforms as T
from imgtrain.data.augment import SampleAugment
from imgtrain.data.imagefolder import JpegFolder
from imgtrain.data.shard_format import INDEX_DTYPE, Manifest, ShardInfo, index_name
from imgtrain.errors import ConfigError


def open_file_budget() -> int:
    """Shard files a process keeps open: a quarter of its open-file limit (DataLoader's
    file-descriptor sharing and the rest of the process keep the others), 16 to 1024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(1024, (soft if soft != resource.RLIM_INFINITY else 4096) // 4))


class OpenFiles:
    """A process's open shard files, least recently used closed first past `capacity`.

    Opened on first use and reopened in a forked loader worker (descriptors are per process; a
    worker closes the copies it inherited and opens its own), never pickled.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._fds: OrderedDict[str, int] = OrderedDict()
        _ALL.add(self)

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._fds[path] = fd
        if len(self._fds) > self.capacity:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:  # a dataset let go of (a test's, a rebuilt loader's) leaks none
        self.close()

    def __len__(self) -> int:
        return len(self._fds)


# Every OpenFiles of this process, closed in a forked child as it starts: a check of the pid on
# each read would cost a getpid() system call per image.
_ALL: weakref.WeakSet[OpenFiles] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [files.close() for files in list(_ALL)])


def read_at(fd: int, offset: int, length: int) -> bytearray:
    """`length` bytes at `offset` in one system call, into a writable buffer (torch wraps it
    without a copy, as JpegFolder's read_bytes)."""
    data = bytearray(length)
    if os.preadv(fd, [data], offset) != length:
        raise OSError(f"the shard ends before the image's {length} bytes (truncated)")
    return data


class ShardFolder(JpegFolder):
    """One split of a packed dataset; items and decoding are JpegFolder's."""

    def __init__(self, root: str, split: str, image_size: int, train: bool,
                 skip_bad_images: bool = False, augment: SampleAugment | None = None,
                 val_resize_size: int | None = None, crop: T.TrainCrop = T.TrainCrop()) -> None:
        base = Path(root).expanduser()
        manifest = Manifest.read(base)
        if split not in manifest.splits:
            raise ConfigError(f"{base} holds no packed {split} split")
        self.root, self.split = base, split
        self.classes = manifest.classes
        self.shard_paths = [str(base / shard.name) for shard in manifest.splits[split]]
        self.image_size, self.train = image_size, train
        self.skip_bad_images, self.augment = skip_bad_images, augment
        self.val_resize_size, self.crop = val_resize_size, crop
        self._open_index()

    def _open_index(self) -> None:
        # Mapped read-only: the ranks of a node share one copy in the page cache, and a forked
        # worker's reads never write to its pages (numpy items have no reference counts).
        self.index = np.load(self.root / index_name(self.split), mmap_mode="r")
        self.files = OpenFiles(open_file_budget())

    def __getstate__(self) -> dict:
        # Spawned loader workers map the index and open their files themselves.
        return {key: value for key, value in vars(self).items() if key not in ("index", "files")}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._open_index()

    def __len__(self) -> int:
        return len(self.index)

    def read(self, index: int) -> bytearray:
        record = self.index[index]
        fd = self.files.fd(self.shard_paths[record["shard"]])
        return read_at(fd, int(record["offset"]), int(record["length"]))

    def label(self, index: int) -> int:
        return int(self.index[index]["label"])

    def where(self, index: int) -> str:
        record = self.index[index]
        return (f"{self.shard_paths[record['shard']]} at byte {int(record['offset'])} "
                f"(sample {index} of {self.split})")


def check_shards(root: str, splits: tuple[str, ...], skip_bad_images: bool) -> list[str]:
    """The class names of a packed dataset, after checking (without reading an image) that the
    index and every shard the splits need are there, at the sizes the index says."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"dataset.root does not exist: {base}; with dataset.format=shards give "
                          "the folder that python -m imgtrain.pack wrote")
    manifest = Manifest.read(base)
    for split in splits:
        if split not in manifest.splits:
            raise ConfigError(f"{base} holds no packed {split} split (it has "
                              f"{', '.join(manifest.splits) or 'none'}); pack a folder with "
                              f"{split}/<class>/<image>")
        _check_split(base, split, manifest.splits[split], len(manifest.classes), skip_bad_images)
    return manifest.classes


def _check_split(base: Path, split: str, shards: list[ShardInfo], num_classes: int,
                 skip_bad_images: bool) -> None:
    path = base / index_name(split)
    try:
        index = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; pack the dataset again") from None
    expected = sum(shard.samples for shard in shards)
    if index.dtype != INDEX_DTYPE or len(index) != expected:
        raise ConfigError(f"{path} does not match {base}/index.json ({len(index)} samples where "
                          f"it lists {expected}); pack the dataset again")
    if len(index) and int(index["label"].max()) >= num_classes:
        raise ConfigError(f"{path} has labels beyond its {num_classes} classes; pack again")
    indexed = np.bincount(index["shard"], minlength=len(shards)) if len(index) else []
    for number, shard in enumerate(shards):
        if len(indexed) != len(shards) or indexed[number] != shard.samples:
            raise ConfigError(f"{path} does not match {base}/index.json for shard {shard.name}; "
                              "pack the dataset again")
        _check_shard(base / shard.name, shard, index, number, skip_bad_images)


def _check_shard(path: Path, shard: ShardInfo, index: np.ndarray, number: int,
                 skip_bad_images: bool) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"shard {path} is missing (listed in {path.parent}/index.json)") \
            from None
    if size > shard.bytes:
        raise ConfigError(f"shard {path} is {size} bytes where index.json says {shard.bytes}; "
                          "pack the dataset again")
    if size < shard.bytes and not skip_bad_images:
        records = index[index["shard"] == number]
        ends = records["offset"] + records["length"]
        lost = records["offset"][ends > size]
        first_lost = int(lost.min()) if len(lost) else size
        raise ConfigError(f"shard {path} is truncated at byte {size} (index.json says "
                          f"{shard.bytes} bytes): its images from byte {first_lost} on are lost; "
                          "pack it again, or set dataset.skip_bad_images=true to skip them")
