"""dataset=imagenet: an ImageFolder tree decoded straight to uint8.

PIL's `draft()` lets libjpeg downscale by 2, 4 or 8 inside the decoder when the crop still has
enough pixels for the output size, and one `resize(box=...)` crops and resizes in a single pass.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from imgtrain.data import transforms as T
from imgtrain.errors import ConfigError

log = logging.getLogger("imgtrain")


def check_layout(root: str) -> list[str]:
    """The class names under root/train, after checking that train/ and val/ agree."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"dataset.root does not exist: {base}")
    if not any(base.iterdir()):
        raise ConfigError(f"dataset.root is empty: {base}")
    classes = {}
    for split in ("train", "val"):
        folder = base / split
        if not folder.is_dir():
            raise ConfigError(f"dataset.root {base} has no {split}/ folder (expected "
                              f"{split}/<class>/<image> as in ImageNet's layout)")
        try:
            classes[split] = find_classes(str(folder))[0]
        except FileNotFoundError:
            raise ConfigError(f"{folder} has no class folders") from None
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))[:3]
        only_val = sorted(set(classes["val"]) - set(classes["train"]))[:3]
        raise ConfigError(f"class folders differ between {base}/train and {base}/val "
                          f"(only in train: {only_train}, only in val: {only_val})")
    return classes["train"]


class JpegFolder(torch.utils.data.Dataset):
    """One split of an ImageFolder tree; items are uint8 CHW tensors of image_size x image_size."""

    def __init__(self, root: str, split: str, image_size: int, train: bool,
                 skip_bad_images: bool = False) -> None:
        folder = Path(root).expanduser() / split
        classes, class_to_idx = find_classes(str(folder))
        try:
            self.samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as exc:
            raise ConfigError(f"{folder}: {exc}") from None
        self.classes, self.image_size, self.train = classes, image_size, train
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                return self._load(path, seed), label
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                if not self.skip_bad_images:
                    raise ConfigError(f"corrupt or truncated image file: {path} ({exc}); set "
                                      "dataset.skip_bad_images=true to skip such files") from None
                log.warning("skipping bad image file %s (%s)", path, exc)
        raise ConfigError(f"no readable image in {self.samples[0][0]}'s dataset")

    def _load(self, path: str, seed: int) -> torch.Tensor:
        with Image.open(path) as image:
            if self.train:
                image = self._random_resized_crop(image, random.Random(seed))
                if random.Random(seed + 1).random() < 0.5:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                image = self._resize_centre_crop(image)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)

    def _random_resized_crop(self, image: Image.Image, rng: random.Random) -> Image.Image:
        width, height = image.size
        left, top, w, h = T.random_resized_crop_box(width, height, rng)
        size = self.image_size
        # Ask the decoder for the smallest DCT scale that still leaves the crop >= size pixels.
        image.draft("RGB", (max(1, width * size // w), max(1, height * size // h)))
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        return image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=box)

    def _resize_centre_crop(self, image: Image.Image) -> Image.Image:
        """torchvision's Resize(image_size / 0.875) then CenterCrop(image_size), on PIL."""
        image = image.convert("RGB")
        new_w, new_h = T.resize_size(*image.size, T.val_resize(self.image_size))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        size = self.image_size
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        return image.crop((left, top, left + size, top + size))
