"""model=resnet18|34|50|101|152: torchvision's ResNets, optionally started from local weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from imgtrain.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch {arch!r}; valid: {', '.join(ARCHS)}")


def build_model(arch: str, num_classes: int) -> nn.Module:
    check_arch(arch)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Model weights from an imgtrain checkpoint or a plain (torchvision) state-dict file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.weights file not found: {file}")
    try:
        payload: Any = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.weights {file} is not a PyTorch checkpoint or state dict "
                          f"({type(exc).__name__})") from None
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"model.weights {file} holds no model state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights(model: nn.Module, path: str) -> None:
    state = load_state_dict_file(path)
    expected = model.state_dict()
    fc = "fc.weight"
    if fc in state and fc in expected and state[fc].shape != expected[fc].shape:
        raise ConfigError(f"model.weights {path} was trained for {state[fc].shape[0]} classes, "
                          f"but this dataset has {expected[fc].shape[0]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"model.weights {path} does not match {type(model).__name__}: "
                          f"{len(missing)} missing and {len(unexpected)} unexpected keys "
                          f"(e.g. {(missing or unexpected)[0]})")
