"""What index_startup.py and worker_memory.py share: an ImageNet-sized tree of directory entries,
and the dataset as imgtrain kept it before the sample index (a list of `(path, label)` tuples from
torchvision's make_dataset), to measure against.

The tree: <root>/train/<1000 classes>/<1281 files> and <root>/val/<1000 classes>/<50 files>,
1,331,000 entries as in ImageNet-1k. Each class's files are hard links to one small JPEG of that
class (48x36 px, about 1 KB): every entry is a directory entry of its own, as listing sees it, yet
a batch decodes, and the tree takes 1,000 inodes instead of 1.3 million.
"""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgtrain.data.imagefolder import JpegFolder  # noqa: E402

TRAIN_PER_CLASS, VAL_PER_CLASS, CLASSES = 1281, 50, 1000


def make_tree(root: Path, classes: int = CLASSES, train_per_class: int = TRAIN_PER_CLASS,
              val_per_class: int = VAL_PER_CLASS) -> Path:
    """The tree under `root` (made once: a finished tree is reused, as its `done` file says)."""
    if (root / "done").exists():
        return root
    started = time.monotonic()
    rng = np.random.default_rng(0)
    originals = root / "originals"
    originals.mkdir(parents=True, exist_ok=True)
    for label in range(classes):
        name = f"n{label:08d}"
        original = originals / f"{name}.JPEG"
        pixels = rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        original.write_bytes(buffer.getvalue())
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                os.link(original, folder / f"{name}_{i}.JPEG")
    (root / "done").write_text(f"{classes} {train_per_class} {val_per_class}\n")
    print(f"made {root}: {classes} classes x ({train_per_class} train + {val_per_class} val) "
          f"entries in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return root


class ListedFolder(JpegFolder):
    """JpegFolder as it was before the sample index (main at 94d9913): torchvision's
    find_classes + make_dataset in every process, a list of (str, int) tuples read per sample."""

    def __init__(self, root: str, split: str, image_size: int, train: bool) -> None:
        self.folder = str(Path(root).expanduser() / split)
        classes, class_to_idx = find_classes(self.folder)
        self.list = make_dataset(self.folder, class_to_idx, extensions=IMG_EXTENSIONS)
        self.classes, self.image_size, self.train = classes, image_size, train
        self.skip_bad_images, self.augment, self.val_resize_size = False, None, None

    def __len__(self) -> int:
        return len(self.list)

    def label(self, index: int) -> int:
        return self.list[index][1]

    def where(self, index: int) -> str:
        return self.list[index][0]
