"""The one place that knows about accelerators: device=auto|npu|gpu|cpu.

Everything else asks a `DeviceInfo` for its torch device, distributed backend, autocast type,
synchronize function and grad scaler. No other module calls `.cuda()` or imports torch_npu.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from imgtrain.errors import ConfigError

# config name -> (torch device type, distributed backend)
_KINDS = {"npu": ("npu", "hccl"), "gpu": ("cuda", "nccl"), "cpu": ("cpu", "gloo")}

# Ascend runtime defaults, applied only where the user set nothing: the task queue overlaps host
# dispatch with device work, and HCCL's default 120 s connect timeout is short for 8-device start-up.
NPU_ENV_DEFAULTS = {"TASK_QUEUE_ENABLE": "1", "HCCL_CONNECT_TIMEOUT": "1200"}


@dataclass(frozen=True)
class DeviceInfo:
    """One process's accelerator: what torch calls it, and how to drive it."""

    name: str  # the config name: npu, gpu or cpu
    index: int | None = None

    @property
    def type(self) -> str:
        return _KINDS[self.name][0]

    @property
    def backend(self) -> str:
        return _KINDS[self.name][1]

    @property
    def torch_device(self) -> torch.device:
        # Device strings, never bare integers: torch reads a bare int as a CUDA ordinal.
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    @property
    def autocast_type(self) -> str:
        return self.type

    @property
    def default_half_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "cpu" else torch.float16

    @property
    def is_accelerator(self) -> bool:
        return self.name != "cpu"

    def module(self) -> Any:
        """torch.cuda or torch.npu (None on the CPU)."""
        return getattr(torch, self.type) if self.is_accelerator else None

    def set_current(self) -> None:
        """Bind this process to its device; must precede init_process_group for nccl/hccl."""
        if self.is_accelerator:
            self.module().set_device(str(self.torch_device))

    def synchronize(self) -> None:
        if self.is_accelerator:
            self.module().synchronize()

    def grad_scaler(self, init_scale: float) -> Any:
        if self.name == "npu":
            # torch_npu's own scaler: torch.amp's does not know the npu device on every release.
            return torch.npu.amp.GradScaler(init_scale=init_scale)
        return torch.amp.GradScaler(self.type, init_scale=init_scale)

    def fused_sgd_class(self) -> Callable | None:
        if self.name == "npu":
            return importlib.import_module("torch_npu.optim").NpuFusedSGD
        return None


def _import_torch_npu() -> None:
    for key, value in NPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    check_ascend_visible_devices(os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))
    try:
        importlib.import_module("torch_npu")
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "device=npu needs torch_npu: pip install torch-npu==<your torch version> on a host with "
            "Ascend CANN (see the README's NPU section)") from exc
    except Exception as exc:  # torch_npu raises assorted errors when CANN's libraries are absent
        raise ConfigError(f"torch_npu is installed but cannot load ({type(exc).__name__}: "
                          f"{one_line_of(exc)}); install Ascend CANN and source its set_env.sh") from exc


def one_line_of(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_ascend_visible_devices(value: str | None) -> None:
    """ASCEND_RT_VISIBLE_DEVICES out of ascending order makes torch.npu.is_available() silently False."""
    if not value:
        return
    try:
        ids = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"ASCEND_RT_VISIBLE_DEVICES={value!r} must be a comma-separated list of "
                          "device numbers") from None
    if ids != sorted(set(ids)):
        raise ConfigError(f"ASCEND_RT_VISIBLE_DEVICES={value!r} must list distinct devices in "
                          f"ascending order (e.g. {','.join(map(str, sorted(set(ids))))}), or the "
                          "NPUs are not visible at all")


def _npu_installed() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def resolve_name(requested: str) -> str:
    """Map device=auto|npu|gpu|cpu to an available device name, or raise ConfigError."""
    if requested not in ("auto", *_KINDS):
        raise ConfigError(f"unknown device {requested!r}; choose auto, npu, gpu or cpu")
    if requested == "auto":
        if _npu_installed():
            _import_torch_npu()
            if torch.npu.is_available():
                return "npu"
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "npu":
        _import_torch_npu()
        if not torch.npu.is_available():
            raise ConfigError("device=npu but no NPU is visible; check npu-smi info and "
                              "ASCEND_RT_VISIBLE_DEVICES")
    if requested == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device=gpu but CUDA is not available (no GPU, or a CPU-only torch); "
                          "use device=cpu or device=auto")
    return requested


def visible_count(name: str) -> int:
    """How many devices of this kind a process on this node can use (CPU: unlimited)."""
    if name == "cpu":
        return 1 << 30
    return getattr(torch, _KINDS[name][0]).device_count()


def for_local_rank(name: str, local_rank: int) -> DeviceInfo:
    if name == "npu":
        _import_torch_npu()  # a fresh worker process has not imported it yet
    return DeviceInfo(name, None if name == "cpu" else local_rank)
