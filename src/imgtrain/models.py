"""model=resnet18|34|50|101|152: torchvision's ResNets, optionally with a frozen backbone."""
from __future__ import annotations

import torchvision
from torch import nn

from imgtrain.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch {arch!r}; valid: {', '.join(ARCHS)}")


def build_model(arch: str, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """A torchvision ResNet; `zero_init_residual` zeroes each residual block's last BatchNorm
    weight, so every block starts as the identity (torchvision's argument, on in timm)."""
    check_arch(arch)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes,
                                        zero_init_residual=zero_init_residual)


FREEZE = ("none", "backbone")


def check_freeze(what: str | None) -> str:
    if what not in (None, *FREEZE):
        raise ConfigError(f"unknown model.freeze {what!r}; choose one of {', '.join(FREEZE)}")
    return what or "none"


def freeze(model: nn.Module, what: str | None) -> None:
    """model.freeze=backbone: train only `fc`, as the seed's --pretrained does.

    The frozen part's BatchNorm layers stay in eval mode whenever the model is put in training
    mode, so their running statistics keep the loaded values.
    """
    if check_freeze(what) == "none":
        return
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.fc.parameters():
        param.requires_grad_(True)
    frozen_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    train_all = model.train

    # An instance attribute: nn.Module.train (also DDP's and torch.compile's) calls each child's
    # `train`, so this one runs however the model is wrapped.
    def train(mode: bool = True) -> nn.Module:
        train_all(mode)
        for norm in frozen_norms:
            norm.train(False)
        return model

    model.train = train
