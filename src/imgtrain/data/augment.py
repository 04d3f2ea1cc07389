"""dataset.auto_augment and dataset.random_erase: torchvision's v2 transforms on uint8 CHW images,
driven by each sample's seed.

torchvision draws their randomness from torch's global CPU generator, whose state in a worker
depends on everything that worker did before. Seeding it from the sample's seed inside
`fork_rng` makes a sample's augmentation the same whichever worker or rank makes it, and again
after a mid-epoch resume; the caller's generator (the training process's, with
dataset.workers=0) is restored untouched afterwards.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchvision.transforms import v2

from imgtrain.data.transforms import IMAGENET_MEAN, mix
from imgtrain.errors import ConfigError

if TYPE_CHECKING:
    from imgtrain.config import DatasetConfig

AUTO_AUGMENT = ("ta_wide", "ra", "augmix")
# torchvision's reference erases after normalisation with value 0, i.e. to the mean colour:
# on uint8 pixels that is the mean itself.
ERASE_VALUE = tuple(round(255 * mean) for mean in IMAGENET_MEAN)
# The crop and flip draw from random.Random(seed); the augmentation takes another stream.
_SALT = 0xA5A5_0016


def check_augment(dataset: DatasetConfig) -> None:
    policy, erase = dataset.auto_augment, dataset.random_erase
    if policy is not None and policy not in AUTO_AUGMENT:
        raise ConfigError(f"unknown dataset.auto_augment {policy!r}; choose one of "
                          f"{', '.join(AUTO_AUGMENT)} (or null: off)")
    if not 0.0 <= float(erase) <= 1.0:
        raise ConfigError(f"dataset.random_erase={erase} must be a probability in [0, 1] "
                          "(0: off)")


def _policy(name: str) -> v2.Transform:
    # torchvision's classification reference: bilinear, RandAugment magnitude 9, AugMix severity 3.
    bilinear = v2.InterpolationMode.BILINEAR
    if name == "ta_wide":
        return v2.TrivialAugmentWide(interpolation=bilinear)
    if name == "ra":
        return v2.RandAugment(interpolation=bilinear, magnitude=9)
    return v2.AugMix(interpolation=bilinear, severity=3)


class SampleAugment:
    """auto_augment then random erasing on one uint8 CHW training image, seeded per sample."""

    def __init__(self, auto_augment: str | None, random_erase: float) -> None:
        steps = [_policy(auto_augment)] if auto_augment else []
        if random_erase > 0:
            steps.append(v2.RandomErasing(p=random_erase, value=list(ERASE_VALUE)))
        self.transform = v2.Compose(steps)

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: never touch CUDA's
            torch.default_generator.manual_seed(mix(seed ^ _SALT))
            return self.transform(image)


def build_augment(dataset: DatasetConfig) -> SampleAugment | None:
    """The training images' augmentation, or None when it is off (the datasets' fast path).
    Its keys were checked in the parent (check_augment, through data.check_dataset)."""
    policy, erase = dataset.auto_augment, float(dataset.random_erase)
    if policy is None and erase == 0.0:
        return None
    return SampleAugment(policy, erase)
