"""The sample index of an ImageFolder split: listed once per job, mapped read-only by every process.

Listing ImageNet's train/ is 1.28 million directory entries: seconds on a local disk, minutes on a
network filesystem whose listing carries no file type (each entry is then a stat). The index holds
what the listing found, in torchvision's `make_dataset` order, as three numpy arrays: every
sample's path (relative to the split folder) in ONE uint8 buffer with int64 offsets, and its label
as a small integer; the class names beside them. Arrays, not a list of `(str, int)` tuples: a
tuple's reference count is written whenever it is read, so each loader worker ends up with a
private copy of a list of Python objects (pytorch/pytorch#13246), where a mapped array stays one
copy in the page cache for every rank and worker.

Where it is kept, and when it is listed again: index_cache.py.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from imgtrain.errors import ConfigError

ARRAYS = ("paths", "offsets", "labels")
TOUCH_EVERY_CLASSES = 20  # class folders listed between two calls of list_split's `alive`


@dataclass(frozen=True, eq=False)
class SampleIndex:
    """One split's samples as arrays: sample i's path (relative to the split folder) is
    paths[offsets[i]:offsets[i + 1]], its class labels[i]."""

    paths: np.ndarray    # uint8: every path, encoded as the filesystem encodes names
    offsets: np.ndarray  # int64, len + 1
    labels: np.ndarray   # int16 (int32 past 32,767 classes)
    classes: tuple[str, ...]
    files: str | None = None  # the folder it was mapped from: what it pickles as

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        """Sample `index`'s path relative to the split folder, decoded only now."""
        start, end = self.offsets[index], self.offsets[index + 1]
        return os.fsdecode(self.paths[start:end].tobytes())

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def __reduce__(self) -> Any:
        # A spawned loader worker maps the files again rather than receiving a copy of them.
        if self.files is not None:
            return load, (self.files,)
        return SampleIndex, (self.paths, self.offsets, self.labels, self.classes)


def load(files: str) -> SampleIndex:
    """A build's arrays, mapped read-only: every process shares the page cache's one copy."""
    folder = Path(files)
    arrays = [np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS]
    classes = tuple(json.loads((folder / "classes.json").read_text()))
    return SampleIndex(*arrays, classes=classes, files=str(folder))


# --- Listing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Listing:
    index: SampleIndex
    directories: list[tuple[str, int]]  # (path relative to the split folder, mtime in ns)


def list_split(folder: str, alive: Any = None) -> Listing:
    """List `folder` as torchvision's make_dataset does: the same samples, in the same order.
    Each directory's modification time is read before its listing, so a file added meanwhile
    makes the next check see a change. `alive()` is called every few class folders."""
    directories = [("", os.stat(folder).st_mtime_ns)]
    try:
        classes, _ = find_classes(folder)
    except FileNotFoundError:
        raise ConfigError(f"{folder} has no class folders") from None
    names: list[bytes] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        if alive is not None and label % TOUCH_EVERY_CLASSES == 0:
            alive()
        found = len(names)
        for relative, mtime, files in _walk_class(folder, name):
            directories.append((relative, mtime))
            for file in files:
                names.append(os.fsencode(relative + os.sep + file))
            labels.extend([label] * len(files))
        if len(names) == found:
            empty.append(name)
    if empty:  # torchvision's own error, in its words
        raise ConfigError(f"{folder}: Found no valid file for the classes "
                          f"{', '.join(sorted(empty))}. Supported extensions are: "
                          f"{', '.join(IMG_EXTENSIONS)}")
    return Listing(_arrays(names, labels, tuple(classes)), directories)


def _walk_class(folder: str, name: str) -> Iterator[tuple[str, int, list[str]]]:
    """(directory relative to `folder`, its mtime, its image files sorted) for the class folder
    and the folders under it, in make_dataset's order: `sorted(os.walk(..., followlinks=True))`."""
    top = os.path.join(folder, name)
    if not os.path.isdir(top):
        return
    first_mtime = os.stat(top).st_mtime_ns
    start = len(folder) + 1
    for root, _, files in sorted(os.walk(top, followlinks=True)):
        # A nested folder's time is read after its listing (os.walk lists it first): a file
        # added in that instant is the one change this can miss.
        mtime = first_mtime if root == top else os.stat(root).st_mtime_ns
        yield root[start:], mtime, sorted(f for f in files if f.lower().endswith(IMG_EXTENSIONS))


def _arrays(names: list[bytes], labels: list[int], classes: tuple[str, ...]) -> SampleIndex:
    lengths = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    paths = np.frombuffer(b"".join(names), dtype=np.uint8) if names else np.zeros(0, np.uint8)
    label_type = np.int16 if len(classes) <= np.iinfo(np.int16).max else np.int32
    return SampleIndex(paths, offsets, np.asarray(labels, dtype=label_type), classes)


def write_arrays(entry: Path, build: str, index: SampleIndex) -> None:
    """The build's files in a folder of their own, renamed into place once complete."""
    partial = entry / f".{build}.partial"
    partial.mkdir()
    try:
        for name in ARRAYS:
            with open(partial / f"{name}.npy", "wb") as f:
                np.save(f, getattr(index, name))
                f.flush()
                os.fsync(f.fileno())
        (partial / "classes.json").write_text(json.dumps(list(index.classes)))
        os.rename(partial, entry / build)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
