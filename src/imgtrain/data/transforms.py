"""Augmentations on uint8 images, driven by a per-sample seed, and normalisation on the device.

Workers only decode, crop, resize and flip uint8 pixels (and augment them, data/augment.py,
where dataset.auto_augment or random_erase asks); the float conversion and ImageNet
normalisation run on the device inside the training step (`normalize`), where they cost almost
nothing and the host-to-device copy is four times smaller.
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainCrop:
    """dataset.scale, ratio and hflip: how a training image is cropped and flipped (timm's
    --scale, --ratio, --hflip). `scale` None: no random-resized crop, the image keeps its size
    (cifar10 and synthetic, whose images come at it), with a random crop of `pad` zero-padded
    pixels a side where set (CIFAR's recipe)."""

    scale: tuple[float, float] | None = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    pad: int = 0

    @property
    def is_identity(self) -> bool:
        return self.scale is None and not self.pad and not self.hflip


def train_crop(dataset: DatasetConfig, pad: int = 0) -> TrainCrop:
    """The dataset's keys as a TrainCrop (checked in the parent: check_train_crop); `pad`: the
    dataset's padded crop where dataset.scale is null."""
    scale = None if dataset.scale is None else (float(dataset.scale[0]), float(dataset.scale[1]))
    return TrainCrop(scale, (float(dataset.ratio[0]), float(dataset.ratio[1])),
                     float(dataset.hflip), pad if scale is None else 0)


def check_train_crop(dataset: DatasetConfig, fixed_size: bool) -> None:
    """dataset.hflip, scale and ratio; `fixed_size`: the dataset's images come at image_size,
    so dataset.scale=null (no random-resized crop) is allowed."""
    if not 0.0 <= float(dataset.hflip) <= 1.0:
        raise ConfigError(f"dataset.hflip={dataset.hflip} must be a probability in [0, 1] "
                          "(0: never flip)")
    scale, ratio = dataset.scale, dataset.ratio
    if scale is None and not fixed_size:
        raise ConfigError(f"dataset.scale=null keeps images at their size, which only "
                          f"cifar10 and synthetic can; dataset={dataset.name} needs a "
                          "random-resized crop's [min, max] area, e.g. [0.08,1]")
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"dataset.scale={list(scale)} must be [min, max] with 0 < min <= max "
                          "<= 1: the crop's share of the image's area, e.g. [0.08,1]")
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        raise ConfigError(f"dataset.ratio={list(ratio)} must be [min, max] with 0 < min <= max: "
                          "the crop's width / height, e.g. [0.75,1.333]")


def train_crop_params(width: int, height: int, seed: int, crop: TrainCrop = TrainCrop()
                      ) -> tuple[tuple[int, int, int, int], bool]:
    """One sample's crop box (left, top, width, height; past the edges where the crop pads) and
    flip coin, drawn from its seed: RandomResizedCrop then RandomHorizontalFlip by default."""
    rng = random.Random(seed)
    if crop.scale is not None:
        box = random_resized_crop_box(width, height, rng, crop.scale, crop.ratio)
    elif crop.pad:  # RandomCrop(size, padding): the top offset first, as CIFAR's always drew
        top, left = rng.randint(0, 2 * crop.pad), rng.randint(0, 2 * crop.pad)
        box = (left - crop.pad, top - crop.pad, width, height)
    else:
        box = (0, 0, width, height)
    # Drawn whatever hflip is: the coin stays the same draw of the sample's stream.
    return box, rng.random() < crop.hflip


def crop_in_memory(image: torch.Tensor, box: tuple[int, int, int, int], flip: bool,
                   size: int) -> torch.Tensor:
    """train_crop_params' box and flip on an in-memory uint8 CHW image (cifar10, synthetic):
    zero-padded where the box reaches past the edges, resized to `size` where it is not."""
    left, top, w, h = box
    height, width = image.shape[-2:]
    pad = max(0, -left, -top, left + w - width, top + h - height)
    if pad:
        image = torch.nn.functional.pad(image, (pad,) * 4)
        left, top = left + pad, top + pad
    image = image[..., top:top + h, left:left + w]
    if (w, h) != (size, size):
        return resize_uint8(image, size, size, flip)
    return image.flip(-1) if flip else image


def resize_uint8(image: torch.Tensor, width: int, height: int, flip: bool = False) -> torch.Tensor:
    """torchvision's Resize on a uint8 CHW tensor (flipped first if asked): antialiased bilinear."""
    # A compact NHWC copy first: libjpeg's output is HWC, and the uint8 antialias kernel runs about
    # twice as fast on a dense channels-last block as on a strided view. Flipping the NHWC view
    # writes such a block itself, so the flip costs no extra copy.
    nhwc = image.permute(1, 2, 0).unsqueeze(0)
    compact = (nhwc.flip(2) if flip else nhwc).contiguous().permute(0, 3, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uint8 interpolate is supported; older torch warns anyway
        return torch.nn.functional.interpolate(compact, size=(height, width), mode="bilinear",
                                               antialias=True)[0]


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


def val_resize(crop_size: int, crop_ratio: float = VAL_RESIZE_RATIO) -> int:
    """The short side validation resizes to before its centre crop of `crop_size`."""
    return int(round(crop_size / crop_ratio))


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
