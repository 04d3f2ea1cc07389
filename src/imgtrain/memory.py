"""Memory: the estimate checked before training (train.memory_check), and the memory/ scalars.

The estimate runs one training step's forward and backward on the meta device, which has shapes
but no data, and follows every storage the step makes from its creation to its release: the peak
of what is alive together counts the activations autograd saves, the input, the gradients and the
backward pass's own temporaries (a layer's input gradient beside its output gradient). It
matches the allocator's own peak (torch.profiler's, on the CPU) to 1%, takes under two seconds
of CPU time for ResNet-152 and allocates nothing. Two batch sizes separate what grows with the
batch from what does not. The weights, the optimizer's state, O2's masters and the EMA's copy
are counted from the parameter count; on the CPU the heap grows past the allocator's peak
(CPU_HEAP_GROWTH, CPU_REORDERS), and an accelerator holds its runtime outside the allocator
(RUNTIME_BYTES). benchmarks/memory_check.py measures the estimate against real runs.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from imgtrain.errors import ConfigError

if TYPE_CHECKING:
    from imgtrain.plan import RunPlan

GIB = float(1 << 30)
MIB = float(1 << 20)
# The check asks for this much more than the estimate, which meets the peaks measured on one
# machine (benchmarks/README.md): other allocators, library versions and long runs' fragmentation
# (on an accelerator, the caching allocator's reserved but unused blocks) need room it cannot see.
MARGIN = 0.10
# On the CPU, peak RSS passes the allocator's peak (which the count here matches) by what torch's
# allocator does not see: the holes a step's tensors, freed and made again in another order, leave
# in glibc's heap (imgtrain keeps freed memory: device.keep_freed_host_memory), and oneDNN's own
# buffers (its reorders into blocked layouts). No count from first principles matched that, so two
# factors fitted to measured runs stand for it: the step's count grows by CPU_HEAP_GROWTH (more
# with bfloat16, whose kernels convert), and each image adds CPU_REORDERS times its largest feature
# map in fp32 (resnet18 at 64 and 96 px, resnet50 at 128 px, batches 16-128, O0 and O2; measured
# 1.13-1.18x: benchmarks/README.md).
CPU_HEAP_GROWTH = {"fp32": 1.3, "half": 1.5}
CPU_REORDERS = 8
# Memory a process uses outside torch's allocator once it trains. The CUDA context with the lazily
# loaded kernels of cuDNN and cuBLAS (about 0.5-1 GiB on recent GPUs); the CANN runtime with HCCL's
# buffers on an NPU (about 2 GiB in torch_npu's out-of-memory reports). On the CPU, the pages of
# libtorch and oneDNN code the first steps fault in (RSS of files grew 24 MiB).
RUNTIME_BYTES = {"cpu": 24 * MIB, "gpu": 1.0 * GIB, "npu": 2.0 * GIB}


@dataclass
class Estimate:
    per_image: float      # bytes per image at the step's peak: activations, temporaries, input
    fixed: float          # bytes beside them then: weights, gradients, optimizer state, EMA
    floor: float = 0.0    # the peak of moments without activations (EMA build, optimizer step)
    runtime: float = 0.0  # memory outside the allocator (RUNTIME_BYTES)

    def total(self, batch: int) -> float:
        return self.runtime + max(self.floor, self.fixed + batch * self.per_image)


class _LiveBytes(TorchDispatchMode):
    """The bytes of every storage an op makes while on, and the peak of those alive together,
    leaving out the storages that end up as parameters' gradients (counted apart)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.events: list[tuple[int, int]] = []  # (storage's serial, +bytes made / -bytes freed)
        self.alive: dict[int, tuple[int, Any]] = {}  # id(storage) -> (serial, weak reference)
        self.largest_map = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in (out,) if isinstance(out, torch.Tensor) else tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
                if tensor.dim() == 4 and tensor.shape[0] == self.batch:  # a feature map
                    self.largest_map = max(self.largest_map, tensor.untyped_storage().nbytes())
        return out

    def _track(self, storage: Any) -> None:
        key = id(storage)  # a storage keeps its Python object while it lives: views share it
        if key in self.alive:
            return
        serial, size = len(self.events), storage.nbytes()
        self.events.append((serial, size))
        # The id is free again once the storage is: the serial tells storages apart over time.
        self.alive[key] = (serial, weakref.ref(storage, lambda _ref: self._free(key, serial,
                                                                                size)))

    def _free(self, key: int, serial: int, size: int) -> None:
        self.alive.pop(key, None)
        self.events.append((serial, -size))

    def peak_without(self, storages: list[Any]) -> int:
        """The peak of the bytes alive together, leaving out `storages` (alive now)."""
        left_out = {self.alive[id(s)][0] for s in storages if id(s) in self.alive}
        live = peak = 0
        for serial, size in self.events:
            if serial not in left_out:
                live += size
                peak = max(peak, live)
        return peak


def _step_peak(model: torch.nn.Module, batch: int, image_size: int,
               half: torch.dtype | None) -> tuple[int, int]:
    """Peak bytes alive together in one training step on the meta device, but the gradients,
    and the largest feature map it makes.

    Left out, the rest grows in proportion to the batch (the gradients' share of the peak does
    not: at a small batch the peak comes late in the backward pass, when they all exist)."""
    tracker = _LiveBytes(batch)
    with tracker:
        raw = torch.empty(batch, 3, image_size, image_size, dtype=torch.uint8, device="meta")
        images = raw.float()  # the loader's uint8 batch, normalised
        if half is not None:
            images = images.to(half)  # O2's forward pre-hook (O1's autocast casts it alike)
        target = torch.empty(batch, dtype=torch.long, device="meta")
        loss = torch.nn.functional.cross_entropy(model(images).float(), target)
        loss.backward()
        del raw, images, target, loss
    peak = tracker.peak_without([p.grad.untyped_storage() for p in model.parameters()
                                 if p.grad is not None])
    for param in model.parameters():
        param.grad = None
    return peak, tracker.largest_map


def _half_network(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The network as O2 holds it (O1's autocast computes alike): half, but fp32 BatchNorm."""
    for module in model.modules():
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)


def estimate(arch: str, num_classes: int, image_size: int, amp_level: str, half: bool,
             ema: bool = False, device_name: str = "cpu", stem: str = "imagenet") -> Estimate:
    """Peak training memory of one process: per image of the per-device batch, and fixed.
    The stem sets the feature maps' sizes: the CIFAR stem's layer1 works on 16x the pixels."""
    from imgtrain.models import build_model

    with torch.device("meta"):
        model = build_model(arch, num_classes, stem=stem)
    model.train()
    half_dtype = torch.float16 if half and amp_level in ("O1", "O2") else None
    if half_dtype is not None:
        _half_network(model, half_dtype)
    (small, largest_small), (large, largest_large) = (
        _step_peak(model, batch, image_size, half_dtype) for batch in (2, 4))
    per_image, step_fixed = (large - small) / 2, max(small - (large - small), 0)
    growth, reorders = 1.0, 0.0
    if device_name == "cpu":
        growth = CPU_HEAP_GROWTH["half" if half_dtype is not None else "fp32"]
        fp32 = 2 if half_dtype is not None else 1
        reorders = CPU_REORDERS * fp32 * (largest_large - largest_small) / 2
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * 4 for b in model.buffers())
    # The gradients, all of them at the step's peak (a few are still to come then): fp32, or
    # O2's half ones; they are made and freed with the step's tensors, hence the growth.
    gradients = (2 if amp_level == "O2" and half_dtype is not None else 4) * params
    # Beside the step: fp32 weights and SGD momentum; O1 adds autocast's half copies of the
    # weights (kept for the backward pass), O2 holds half weights and fp32 masters with their
    # gradients.
    per_param = {"O1": 10, "O2": 14}.get(amp_level, 8) if half_dtype is not None else 8
    ema_bytes = 4 * params + buffers if ema else 0
    fixed = per_param * params + ema_bytes + (step_fixed + gradients) * growth
    # Moments without activations: the optimizer step (foreach SGD copies the gradients; so does
    # a checkpoint of O2's weights), and the EMA's build, when AveragedModel copies imgtrain's
    # copy of the model (three fp32 networks for a moment). On the CPU the heap keeps that
    # copy's pages once freed, and a step whose activations are too small to fill them runs
    # beside them (resnet18 at 32 px, batch 8: peak RSS 233-278 MiB from run to run).
    kept = ema_bytes if ema and device_name == "cpu" else 0
    floor = max(per_param * params + ema_bytes + kept + gradients + 4 * params,
                12 * params + 3 * buffers if ema else 0)
    return Estimate(per_image * growth + reorders, fixed, floor,
                    RUNTIME_BYTES.get(device_name, 0.0))


def available_bytes(device: Any, processes_on_node: int) -> tuple[float, str] | None:
    """(bytes this process may use, what they are) or None where that cannot be told."""
    if device.is_accelerator:
        try:
            free, _total = device.module().mem_get_info(device.torch_device)
        except (AttributeError, RuntimeError):
            return None
        return float(free), f"free on {device.device_string}"
    host = _host_available()
    if host is None:
        return None
    share = " (this process's share)" if processes_on_node > 1 else ""
    return host / max(processes_on_node, 1), f"of host memory available{share}"


def _host_available() -> float | None:
    """MemAvailable, or the container's memory limit (cgroup v2) when that is lower."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = float(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file:
            limit = limit_file.read().strip()
        with open("/sys/fs/cgroup/memory.current") as current_file:
            used = float(current_file.read().strip())
        if limit != "max" and available is not None:
            available = min(available, float(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def fitting_batch(est: Estimate, available: float) -> int:
    """The largest power-of-two per-device batch that fits with the margin (0: not even one)."""
    room = available / (1 + MARGIN) - est.runtime
    if est.per_image <= 0 or room < est.floor:
        return 0
    fits = int((room - est.fixed) // est.per_image)
    batch = 1
    while batch * 2 <= fits:
        batch *= 2
    return batch if fits >= 1 else 0


def plan(run_plan: RunPlan, device: Any) -> tuple[Estimate, int]:
    """The run's estimate and the per-device micro-batch it is for."""
    per_device = run_plan.batches.micro
    # Under dataset.res_schedule the largest epoch's crop: the step that must fit.
    est = estimate(run_plan.model.arch, run_plan.num_classes, run_plan.largest_train_size,
                   run_plan.amp.level, run_plan.amp.dtype is not None,
                   ema=run_plan.ema.decay is not None, device_name=device.name,
                   stem=run_plan.model.stem)
    return est, per_device


def check_memory(run_plan: RunPlan, device: Any, world: Any) -> None:
    """Stop before training when the estimate and its margin exceed this process's memory."""
    if run_plan.mode != "train" or not run_plan.train.memory_check:
        return
    found = available_bytes(device, world.local_world_size)
    if found is None:
        return
    available, where = found
    micro_steps = run_plan.batches.accumulate_steps
    est, per_device = plan(run_plan, device)
    needed = est.total(per_device) * (1 + MARGIN)
    if needed <= available:
        return
    fits = fitting_batch(est, available)
    advice = (f"train.batch_size={fits * world.world_size * micro_steps} fits (or raise "
              "train.accumulate_steps)" if fits else
              "not even one image per device fits: pick a smaller model.arch or "
              "dataset.image_size")
    raise ConfigError(
        f"training needs about {needed / GIB:.1f} GiB per process (the estimate and a "
        f"{MARGIN:.0%} margin; {run_plan.model.arch}{_stem_note(run_plan.model.stem)}, "
        f"{per_device} images of "
        f"{run_plan.largest_train_size} px per device, amp={run_plan.amp.level}) but "
        f"{available / GIB:.1f} GiB is {where}; {advice} "
        "(train.memory_check=false skips this check)")


def _stem_note(stem: str) -> str:
    return " with the CIFAR stem" if stem == "cifar" else ""


def memory_scalars(device: Any) -> dict[str, float]:
    """memory/ scalars at a print point: the device's peak since the last one, or host RSS.

    Reading the allocator's counters does not synchronise the device.
    """
    if device.is_accelerator:
        module, where = device.module(), device.torch_device
        values = {"memory/max_allocated_gib": module.max_memory_allocated(where) / GIB,
                  "memory/reserved_gib": module.memory_reserved(where) / GIB}
        module.reset_peak_memory_stats(where)  # each print window reports its own peak
        return values
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        return {"memory/host_rss_gib": resident_pages * os.sysconf("SC_PAGE_SIZE") / GIB}
    except (OSError, ValueError, IndexError):
        return {}
