"""model=resnet18|34|50|101|152: torchvision's ResNets, with the ImageNet or the CIFAR stem,
optionally with a frozen backbone."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from imgtrain.config import ModelConfig
from imgtrain.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# model.stem: torchvision's 7x7 stride-2 conv1 and 3x3 stride-2 max-pool (ImageNet), or a 3x3
# stride-1 conv1 and no max-pool (kuangliu/pytorch-cifar's ResNets, the CIFAR-10 speed records'
# ResNet-18s): 32 px images then reach layer4 as 4x4 maps instead of 1x1.
STEMS = ("imagenet", "cifar")
STEM_NAMES = {"imagenet": "ImageNet stem (7x7/2 conv, max-pool)",
              "cifar": "CIFAR stem (3x3/1 conv, no max-pool)"}
_STEM_KERNELS = {7: "imagenet", 3: "cifar"}  # conv1's kernel size tells a state dict's stem


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch {arch!r}; valid: {', '.join(ARCHS)}")


def build_model(arch: str, num_classes: int, zero_init_residual: bool = False,
                stem: str = "imagenet") -> nn.Module:
    """A torchvision ResNet; `zero_init_residual` zeroes each residual block's last BatchNorm
    weight, so every block starts as the identity (torchvision's argument, on in timm); `stem`:
    model.stem as resolved (imagenet or cifar)."""
    check_arch(arch)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes,
                                         zero_init_residual=zero_init_residual)
    if stem == "cifar":
        conv = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's
        model.conv1, model.maxpool = conv, nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"unresolved model.stem {stem!r}")  # resolve_stem's job: a bug
    return model


def resolve_stem(setting: str, dataset_name: str) -> str:
    """model.stem=auto: the CIFAR stem for dataset=cifar10's 32 px images, the ImageNet stem for
    every other dataset (the CIFAR stem costs about 15x the compute at the same size)."""
    if setting != "auto":
        return setting
    return "cifar" if dataset_name == "cifar10" else "imagenet"


def stem_of(state: dict[str, torch.Tensor]) -> str | None:
    """The stem a ResNet state dict was trained with (None: no conv1 imgtrain knows)."""
    conv1 = state.get("conv1.weight")
    return None if conv1 is None or conv1.dim() != 4 else _STEM_KERNELS.get(int(conv1.shape[-1]))


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
