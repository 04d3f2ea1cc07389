"""The one place that knows about accelerators: device=auto|npu|gpu|cpu.

Everything else asks a `DeviceInfo` for its torch device, distributed backend, autocast type,
synchronize function and grad scaler. No other module calls `.cuda()` or imports torch_npu.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from imgtrain.errors import ConfigError

if TYPE_CHECKING:
    from imgtrain.config import DeviceConfig

# config name -> (torch device type, distributed backend)
_KINDS = {"npu": ("npu", "hccl"), "gpu": ("cuda", "nccl"), "cpu": ("cpu", "gloo")}

# Ascend runtime defaults, applied only where the user set nothing: the task queue overlaps host
# dispatch with device work (1 is torch_npu's own default; Ascend recommends 2, which also moves
# part of the operator launch to a second thread), and HCCL's default 120 s connect timeout is
# short for 8-device start-up.
NPU_ENV_DEFAULTS = {"TASK_QUEUE_ENABLE": "2", "HCCL_CONNECT_TIMEOUT": "1200"}
NPU_DOCS = "docs/precision-and-npu.md"
_NO_GROWTH = 1 << 30  # a GradScaler growth_interval no run reaches: the scale never grows
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


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
    def device_string(self) -> str:
        """'npu:3', 'cuda:0' or 'cpu'. Device strings, never bare integers: torch (and torch_npu's
        set_device) read a bare int as a CUDA ordinal."""
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device_string)

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
            self.module().set_device(self.device_string)
        else:
            keep_freed_host_memory()

    def synchronize(self) -> None:
        if self.is_accelerator:
            self.module().synchronize()

    def grad_scaler(self, init_scale: float, dynamic: bool = True) -> Any:
        """A loss scaler starting at `init_scale`; `dynamic=False` keeps it there.

        Neither torch.amp's scaler nor torch_npu's is used in a static mode of its own: torch.amp's
        has none, and torch_npu's `dynamic=False` applies steps whose gradients overflowed. Both
        run in their dynamic mode with growth pushed out of reach, and `Precision` re-pins the
        scale after each update. torch.amp's does not know the npu device on every release.
        """
        if self.name == "npu":
            scaler = torch.npu.amp.GradScaler(init_scale=init_scale, dynamic=True)
        else:
            scaler = torch.amp.GradScaler(self.type, init_scale=init_scale)
        if not dynamic:
            scaler.set_growth_interval(_NO_GROWTH)
        return scaler

    def apply_settings(self, device_cfg: DeviceConfig) -> None:
        """The device group's settings: cuDNN autotuning (training shapes are fixed: drop_last)."""
        if self.name == "gpu":
            torch.backends.cudnn.benchmark = bool(device_cfg.cudnn_benchmark)

    def copy_in(self, batch: torch.Tensor) -> torch.Tensor:
        """A host batch on this device, copied from contiguous memory.

        JPEG batches are NHWC in memory (a channels_last NCHW tensor). torch_npu copies a
        non-contiguous source through a contiguous host copy in malloc'd memory and then syncs the
        stream on every step; so the NHWC block travels as a contiguous tensor and is permuted
        back into an NCHW view on the device, which costs nothing.
        """
        if batch.dim() == 4 and not batch.is_contiguous():
            nhwc = batch.permute(0, 2, 3, 1)
            if nhwc.is_contiguous():
                return nhwc.to(self.torch_device, non_blocking=True).permute(0, 3, 1, 2)
        return batch.to(self.torch_device, non_blocking=True)

    def fused_sgd_class(self) -> Callable | None:
        if self.name == "npu":
            return importlib.import_module("torch_npu.optim").NpuFusedSGD
        return None


def keep_freed_host_memory() -> bool:
    """Stop glibc handing each step's freed activations back to the OS (True where it applies).

    A CPU training step frees its activations and allocates them again in the next one. glibc
    trims the top of its heap and mmaps large blocks, so every step faults that memory back in:
    about 22,000 page faults per resnet18 step at 32 px with two threads here. Raising the mmap
    threshold is not enough: intra-op threads allocate in arenas of their own, whose heaps are
    capped at 64 MiB, and glibc mmaps what does not fit there whatever the threshold. So mmap is
    switched off (blocks come from the heaps, the main one growing with brk) and no heap is
    trimmed: the faults drop to almost none, as with jemalloc or tcmalloc. Only glibc has these
    knobs; other C libraries are left as they are.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _import_torch_npu() -> None:
    """Import torch_npu (which registers torch.npu) after checking what makes it fail silently."""
    for key, value in NPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)  # read by torch_npu at import: must be set before it
    check_ascend_visible_devices(os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))
    if not _npu_installed():
        raise ConfigError(
            f"device=npu needs torch_npu: pip install 'torch-npu=={_torch_release()}.*' (the "
            f"release matching torch {torch.__version__}) on a host with Ascend CANN; see "
            f"{NPU_DOCS}, or use device=gpu|cpu")
    try:
        importlib.import_module("torch_npu")
    except Exception as exc:  # torch_npu raises assorted errors when CANN's libraries are absent
        raise ConfigError(f"torch_npu is installed but cannot load ({type(exc).__name__}: "
                          f"{one_line_of(exc)}); install Ascend CANN and source its "
                          f"set_env.sh (see {NPU_DOCS}), or use device=gpu|cpu") from exc


def _torch_release() -> str:
    """torch's version without its local tag: torch-npu releases carry the same number (plus
    .postN fixes, which the pip pattern `==X.Y.Z.*` accepts)."""
    return torch.__version__.split("+")[0]


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
                          "ascending order, else torch.npu.is_available() is silently False; set "
                          f"ASCEND_RT_VISIBLE_DEVICES={','.join(map(str, sorted(set(ids))))}")


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
            raise ConfigError("device=npu but no NPU is visible: check `npu-smi info` and "
                              "ASCEND_RT_VISIBLE_DEVICES, or use device=gpu|cpu")
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
