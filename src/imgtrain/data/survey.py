"""A glance at an ImageFolder's training images before a run starts, for the one warning that an
ImageNet recipe does not suit them: images much smaller than dataset.image_size (each upscaled
several times), or too few a class for a large model. It names experiment=small_images.

Bounded, whatever the tree's size: a few classes spread over the tree and the first bytes of a
few files per class (their JPEG headers: jpeg_size, no decoding). The classes and their files
come from the job's sample index where it has one (data/index.py: no listing at all), else from
at most PER_CLASS_ENOUGH entries listed in each sampled class folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING

import numpy as np

from imgtrain.data.imagefolder import jpeg_size
from imgtrain.data.index import load as load_index

if TYPE_CHECKING:
    from imgtrain.config import DatasetConfig

SAMPLED_CLASSES = 10
HEADERS_PER_CLASS = 3
HEADER_BYTES = 1 << 16       # a JPEG's frame header comes before its image data (and after EXIF)
UPSCALED = 2                 # warn when image_size is at least twice the images' short side
PER_CLASS_ENOUGH = 50        # fewer images a class than this is tiny for ...
LARGE_MODELS = ("resnet50", "resnet101", "resnet152")  # ... a bottleneck ResNet
PRESET = "experiment=small_images"


def _files(folder: str, limit: int) -> list[str]:
    """Up to `limit` files under a class folder (ImageFolder reads its subfolders too)."""
    found: list[str] = []
    for parent, _, names in os.walk(folder):
        found += [os.path.join(parent, name) for name in sorted(names)][:limit - len(found)]
        if len(found) >= limit:
            break
    return found


def _short_side(path: str) -> int | None:
    with open(path, "rb") as f:
        size = jpeg_size(f.read(HEADER_BYTES))
    return min(size) if size else None


def _sampled(count: int) -> list[int]:
    """SAMPLED_CLASSES of `count` classes, spread over them."""
    return list(range(count))[::max(1, count // SAMPLED_CLASSES)][:SAMPLED_CLASSES]


def _listed(train: Path) -> tuple[list[int], list[list[str]]]:
    """The sampled classes' image counts (at most PER_CLASS_ENOUGH) and first files, listed."""
    with os.scandir(train) as entries:
        classes = sorted(entry.path for entry in entries if entry.is_dir())
    listed = [_files(classes[i], PER_CLASS_ENOUGH) for i in _sampled(len(classes))]
    return [len(files) for files in listed], [files[:HEADERS_PER_CLASS] for files in listed]


def _indexed(train: Path, index_files: str) -> tuple[list[int], list[list[str]]]:
    """The sampled classes' image counts and first files, from the sample index (sorted by class,
    as torchvision's make_dataset lists them)."""
    index = load_index(index_files)
    counts = np.bincount(index.labels, minlength=len(index.classes))
    starts = np.concatenate([[0], np.cumsum(counts)])
    sampled = _sampled(len(index.classes))
    return [int(counts[c]) for c in sampled], [
        [str(train / index.path(i)) for i in range(starts[c], starts[c] + min(counts[c],
                                                                               HEADERS_PER_CLASS))]
        for c in sampled]


def small_data_warning(dataset: DatasetConfig, arch: str,
                       train_index: str | None = None) -> str | None:
    """The warning line for an ImageFolder training set that an ImageNet recipe does not suit,
    or None (also for other datasets, and where the tree cannot be read). `train_index`: the
    plan's sample index of train/ (its build's folder), read instead of listing the tree."""
    if dataset.name != "imagenet" or not dataset.root:
        return None
    train = Path(dataset.root).expanduser() / "train"
    try:
        counts, headers = _indexed(train, train_index) if train_index else _listed(train)
        sides = [side for files in headers for side in map(_short_side, files) if side]
    except OSError:
        return None  # the run's own checks and loaders say what is wrong with the tree
    reasons = []
    if sides and median(sides) * UPSCALED <= dataset.image_size:
        reasons.append(f"the training images are about {median(sides):g} px (the median short "
                       f"side of {len(sides)} sampled), much smaller than dataset.image_size="
                       f"{dataset.image_size}")
    per_class = median(counts) if counts else PER_CLASS_ENOUGH
    if arch in LARGE_MODELS and per_class < PER_CLASS_ENOUGH:
        reasons.append(f"about {per_class:g} training images a class is tiny for {arch}")
    if not reasons:
        return None
    return (f"warning: {'; '.join(reasons)}; {PRESET} is a recipe for small images of your own "
            "(a resnet18 at their size: README, Your own data)")
