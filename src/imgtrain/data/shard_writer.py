"""Writing packed shards (data/shard_format.py's layout): the plan of a split, one shard, the check
that a shard an interrupted pack left behind is finished.

The plan comes from the files' sizes alone, so every member's offset is known before a byte is
written: the index is the plan, and a shard written by any process, in any order, lands where the
index says.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgtrain.data.shard_format import (BLOCK, END_OF_ARCHIVE, INDEX_DTYPE, label_bytes,
                                        member_header, padded, sample_key, shard_name)
from imgtrain.errors import ConfigError


@dataclass(frozen=True)
class SplitFiles:
    """A split's image files in ImageFolder order, with their labels, sizes and change times."""

    split: str
    paths: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: samples [first, first + len(paths)) of a split."""

    path: str
    first: int
    paths: list[str]
    labels: list[int]
    sizes: list[int]
    bytes: int

    @property
    def name(self) -> str:
        return Path(self.path).name


def member_names(task: ShardTask, position: int) -> tuple[str, str]:
    """The image's and the label's member names of the task's sample at `position`."""
    key = sample_key(task.first + position)
    extension = Path(task.paths[position]).suffix.lower() or ".jpg"
    return key + extension, key + ".cls"


def sample_spans(sizes: np.ndarray) -> np.ndarray:
    """Bytes each sample takes in a shard: the image's header and data, then the label's header
    and its digits (a label is under 512 digits: one block)."""
    return 3 * BLOCK + (sizes.astype(np.int64) + BLOCK - 1) // BLOCK * BLOCK


def plan_split(files: SplitFiles, out: Path, shard_bytes: int | None,
               samples_per_shard: int | None) -> tuple[list[ShardTask], np.ndarray]:
    """The split's shards (each sample in one, in order) and its index (INDEX_DTYPE)."""
    spans = sample_spans(files.sizes)
    bounds = (_count_bounds(len(spans), samples_per_shard) if samples_per_shard
              else _size_bounds(spans, shard_bytes))
    index = np.zeros(len(spans), dtype=INDEX_DTYPE)
    index["length"], index["label"] = files.sizes, files.labels
    tasks = []
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        starts = np.concatenate([[0], np.cumsum(spans[start:stop])[:-1]])
        index["shard"][start:stop] = number
        index["offset"][start:stop] = starts + BLOCK  # the data follows the member's header
        tasks.append(ShardTask(str(out / shard_name(files.split, number)), int(start),
                               files.paths[start:stop], files.labels[start:stop].tolist(),
                               files.sizes[start:stop].tolist(),
                               int(spans[start:stop].sum()) + END_OF_ARCHIVE))
    return tasks, index


def _count_bounds(samples: int, per_shard: int) -> list[int]:
    return [*range(0, samples, per_shard), samples]


def _size_bounds(spans: np.ndarray, shard_bytes: int) -> list[int]:
    """Shard boundaries holding at most shard_bytes each (a larger image gets a shard alone)."""
    bounds, used = [0], END_OF_ARCHIVE
    for position, span in enumerate(spans.tolist()):
        if used + span > shard_bytes and position > bounds[-1]:
            bounds.append(position)
            used = END_OF_ARCHIVE
        used += span
    return bounds + [len(spans)]


def write_shard(task: ShardTask) -> tuple[str, int, int]:
    """Write the shard to `<name>.tmp` and rename it into place once complete; (name, samples,
    bytes). A pool worker's task: the files are read here, in parallel with other shards."""
    temporary = task.path + ".tmp"
    with open(temporary, "wb") as out:
        for position, (path, label, size) in enumerate(zip(task.paths, task.labels, task.sizes)):
            image_name, label_name = member_names(task, position)
            data = _read_exact(path, size)
            digits = label_bytes(label)
            out.write(member_header(image_name, size) + data + bytes(padded(size) - size)
                      + member_header(label_name, len(digits)) + digits
                      + bytes(padded(len(digits)) - len(digits)))
        out.write(bytes(END_OF_ARCHIVE))
        written = out.tell()
        out.flush()
        os.fsync(out.fileno())  # on disk before the rename says the shard is finished
    if written != task.bytes:
        raise RuntimeError(f"{task.name}: wrote {written} bytes where the plan says {task.bytes}")
    os.replace(temporary, task.path)
    return task.name, len(task.paths), written


def _read_exact(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != size:
        raise ConfigError(f"{path} changed while it was packed (it was {size} bytes, now "
                          f"{len(data)}); run the same command again")
    return data


def is_finished(task: ShardTask) -> bool:
    """Whether an earlier pack finished this shard: the planned size, and its last sample's
    headers where the plan puts them (a rename happens only after the whole shard is written)."""
    try:
        with open(task.path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != task.bytes:
                return False
            last = len(task.paths) - 1
            image_name, label_name = member_names(task, last)
            size, digits = task.sizes[last], label_bytes(task.labels[last])
            at = task.bytes - END_OF_ARCHIVE - 3 * BLOCK - padded(size)
            image_header = os.pread(f.fileno(), BLOCK, at)
            label_at = at + BLOCK + padded(size)
            label_header = os.pread(f.fileno(), BLOCK + len(digits), label_at)
    except FileNotFoundError:
        return False
    return (image_header == member_header(image_name, size)
            and label_header == member_header(label_name, len(digits)) + digits)
