"""Augmentations on uint8 images, driven by a per-sample seed, and normalisation on the device.

Workers only decode, crop, resize and flip uint8 pixels (and augment them, data/augment.py,
where dataset.auto_augment or random_erase asks); the float conversion and ImageNet
normalisation run on the device inside the training step (`normalize`), where they cost almost
nothing and the host-to-device copy is four times smaller.
"""
from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import torch

from imgtrain.errors import ConfigError

if TYPE_CHECKING:
    from imgtrain.config import DatasetConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_RESIZE_RATIO = 0.875  # validation resizes to image_size / 0.875 (256 for 224), then centre-crops
VAL_SIZE_KEYS = ("val_resize_size", "val_crop_size")
_MASK = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample's augmentation in one epoch, the same whatever worker decodes it."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def mix(seed: int) -> int:
    """splitmix64's finaliser: 64 well-mixed bits from any seed, far cheaper than random.Random."""
    x = (seed + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def train_crop_params(width: int, height: int, seed: int) -> tuple[tuple[int, int, int, int], bool]:
    """One sample's RandomResizedCrop box and RandomHorizontalFlip coin, drawn from its seed."""
    rng = random.Random(seed)
    return random_resized_crop_box(width, height, rng), rng.random() < 0.5


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, as (left, top, crop_width, crop_height)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height  # fallback: the whole image, clipped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """torchvision Resize(int): the shorter side becomes `short_side`, keeping the aspect ratio."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def val_resize(image_size: int) -> int:
    return int(round(image_size / VAL_RESIZE_RATIO))


def val_sizes(dataset: DatasetConfig) -> tuple[int, int]:
    """(short side to resize to, centre crop) for validation, predict and export, checked.
    The parent derives them once (plan.val_resize_size, plan.val_crop_size); read those.

    dataset.val_crop_size defaults to image_size and val_resize_size to the crop / 0.875, so
    setting only the crop keeps the usual ratio (224 -> 256).
    """
    for key in VAL_SIZE_KEYS:
        value = getattr(dataset, key)
        if value is not None and int(value) < 1:
            raise ConfigError(f"dataset.{key}={value} must be a positive number of "
                              "pixels (or null)")
    crop = dataset.val_crop_size or int(dataset.image_size)
    resize = dataset.val_resize_size or val_resize(crop)
    if crop > resize:
        crop_key = "val_crop_size" if dataset.val_crop_size else "image_size"
        raise ConfigError(f"dataset.{crop_key}={crop} is larger than val_resize_size={resize}: "
                          "validation resizes the short side, then centre-crops inside it")
    return resize, crop


def random_flip(image: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return image.flip(-1) if rng.random() < 0.5 else image


def pad_crop(image: torch.Tensor, size: int, padding: int, rng: random.Random) -> torch.Tensor:
    """RandomCrop(size, padding) with zero padding, on a CHW uint8 tensor."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    top = rng.randint(0, padded.shape[-2] - size)
    left = rng.randint(0, padded.shape[-1] - size)
    return padded[..., top:top + size, left:left + size]


class Normalizer:
    """uint8 NCHW batch -> normalised float on the device, in one fused multiply-add."""

    def __init__(self, device: torch.device, channels_last: bool) -> None:
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.scale, self.shift = 1 / std, -mean / std
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # One pass: batches may arrive in either layout (JPEG batches are NHWC, see JpegFolder).
        x = images.to(torch.float32, memory_format=self.memory_format)
        return torch.addcmul(self.shift, x, self.scale)
