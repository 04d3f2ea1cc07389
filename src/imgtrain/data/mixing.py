"""dataset.mixup_alpha / cutmix_alpha: torchvision's MixUp and CutMix on the device's batch.

They run in the training step, after normalisation, on the whole batch: mixing pairs images of
one batch, which the workers never see together. Their random draws (the mixing weight, the box,
which of the two) come from torch's CPU generator, which checkpoints save per rank, so a resumed
run mixes exactly as the uninterrupted one; the device only does the arithmetic.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torchvision.transforms import v2

from imgtrain.errors import ConfigError

if TYPE_CHECKING:
    from imgtrain.config import DatasetConfig

BatchMix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_mixing(dataset: DatasetConfig) -> None:
    for key in ("mixup_alpha", "cutmix_alpha"):
        alpha = getattr(dataset, key)
        if alpha < 0:
            raise ConfigError(f"dataset.{key}={alpha} must be 0 (off) or positive")


def build_batch_mix(dataset: DatasetConfig, num_classes: int) -> BatchMix | None:
    """(images, labels) -> (mixed images, soft targets), or None when both alphas are 0.
    The alphas were checked in the parent (check_mixing, through checks.recipe).

    With both set, each batch gets one of the two, with equal chance (torchvision's references).
    """
    mixes = []
    if dataset.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=dataset.mixup_alpha, num_classes=num_classes))
    if dataset.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=dataset.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def dominant_label(target: torch.Tensor) -> torch.Tensor:
    """The class a (soft) target weighs most: training accuracy's label under MixUp/CutMix."""
    return target.argmax(1) if target.ndim == 2 else target
