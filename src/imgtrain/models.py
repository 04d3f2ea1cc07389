"""model=resnet18|34|50|101|152: torchvision's ResNets, optionally with a frozen backbone."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from imgtrain.config import ModelConfig
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


def check_compile(model: ModelConfig) -> None:
    """model.compile_backend and model.compile_mode, refused before any process starts (torch
    would refuse them only at the first step, in every rank)."""
    if not model.compile:
        return
    import torch._dynamo
    import torch._inductor
    backend, mode = model.compile_backend, model.compile_mode
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"unknown model.compile_backend {backend!r}; registered: "
                          f"{', '.join(torch._dynamo.list_backends())}, or aot_eager and eager "
                          "(no code generation: for debugging)")
    if mode is None:
        return
    if backend != "inductor":
        raise ConfigError(f"model.compile_mode={mode} is an inductor setting; "
                          f"model.compile_backend={backend} takes none (set it to null)")
    modes = torch._inductor.list_mode_options()
    if mode not in modes:
        raise ConfigError(f"unknown model.compile_mode {mode!r}; choose one of {', '.join(modes)}")


def compile_model(model: nn.Module, model_cfg: ModelConfig) -> nn.Module:
    return torch.compile(model, backend=model_cfg.compile_backend, mode=model_cfg.compile_mode)


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
