"""The packer's listing of a split: torchvision's ImageFolder order, and every file's size.

The order is make_dataset's own (sorted classes, sorted walk, sorted names), so sample i of the
shards is sample i of JpegFolder and of torchvision's ImageFolder. The sizes, which place every
member in its shard before any is written, come from stat calls spread over the pool: on a
network file system each is a round trip, and a 1.28M-file tree would otherwise wait on them one
at a time.
"""
from __future__ import annotations

import os
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from imgtrain.data.shard_writer import SplitFiles
from imgtrain.errors import ConfigError

STAT_CHUNK = 2048


def list_split(folder: Path, classes: list[str], pool: Pool) -> SplitFiles:
    try:
        samples = make_dataset(str(folder), {name: i for i, name in enumerate(classes)},
                               extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise ConfigError(f"{folder}: {exc}") from None
    paths = [path for path, _ in samples]
    chunks = [paths[start:start + STAT_CHUNK] for start in range(0, len(paths), STAT_CHUNK)]
    stats = np.concatenate([np.asarray(chunk, dtype=np.int64).reshape(-1, 2)
                            for chunk in pool.imap(_sizes_and_times, chunks)])
    return SplitFiles(folder.name, paths, np.array([label for _, label in samples], np.uint32),
                      stats[:, 0], stats[:, 1])


def _sizes_and_times(paths: list[str]) -> list[tuple[int, int]]:
    found = []
    for path in paths:
        info = os.stat(path)
        found.append((info.st_size, info.st_mtime_ns))
    return found
