"""Memory: the estimate checked before training (train.memory_check), and the memory/ scalars.

The estimate runs the model's forward on the meta device, which has shapes but no data, and
counts the bytes autograd saves for the backward pass: it takes about a second for ResNet-152
and allocates nothing. Two batch sizes separate what grows with the batch from what does not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from imgtrain.errors import ConfigError

GIB = float(1 << 30)


@dataclass
class Estimate:
    per_image: float  # bytes of saved activations (and the input) per image
    fixed: float      # weights, gradients, optimizer state, and batch-independent saved tensors

    def total(self, batch: int) -> float:
        return self.fixed + batch * self.per_image


def _saved_bytes(model: torch.nn.Module, batch: int, image_size: int) -> int:
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()  # by id: a tensor saved twice
        return tensor                                              # is held once

    images = torch.empty(batch, 3, image_size, image_size, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images)
    return sum(seen.values()) + images.numel() * images.element_size()


def estimate(arch: str, num_classes: int, image_size: int, amp_level: str,
             half: bool) -> Estimate:
    """Peak training memory of one process, as activations per image plus a fixed part."""
    from imgtrain.models import build_model

    with torch.device("meta"):
        model = build_model(arch, num_classes)
    model.train()
    small, large = _saved_bytes(model, 2, image_size), _saved_bytes(model, 4, image_size)
    per_image, batch_fixed = (large - small) / 2, small - (large - small)
    # fp32 weights, gradients and SGD momentum; O2 adds half weights and half gradients.
    params = sum(p.numel() for p in model.parameters())
    state = params * (4 + 4 + 4 + (4 if amp_level == "O2" and half else 0))
    activation_scale = 0.5 if half and amp_level in ("O1", "O2") else 1.0
    return Estimate(per_image * activation_scale, state + max(batch_fixed, 0) * activation_scale)


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
    """The largest power-of-two per-device batch that fits (0 when not even one image does)."""
    fits = int((available - est.fixed) // est.per_image) if est.per_image > 0 else 0
    batch = 1
    while batch * 2 <= fits:
        batch *= 2
    return batch if fits >= 1 else 0


def check_memory(cfg: dict[str, Any], device: Any, world: Any, num_classes: int,
                 half: bool) -> None:
    """Stop before training when the estimate clearly exceeds this process's memory."""
    if cfg["mode"] != "train" or not cfg["train"].get("memory_check", True):
        return
    found = available_bytes(device, world.local_world_size)
    if found is None:
        return
    available, where = found
    micro_steps = cfg["train"].get("accumulate_steps", 1)
    per_device = cfg["train"]["batch_size"] // world.world_size // micro_steps
    est = estimate(cfg["model"]["arch"], num_classes, cfg["dataset"]["image_size"],
                   cfg["amp"]["level"], half)
    needed = est.total(per_device)
    if needed <= available:
        return
    fits = fitting_batch(est, available)
    advice = (f"train.batch_size={fits * world.world_size * micro_steps} fits (or raise "
              "train.accumulate_steps)" if fits else
              "not even one image per device fits: pick a smaller model.arch or "
              "dataset.image_size")
    raise ConfigError(
        f"training needs about {needed / GIB:.1f} GiB per process ({cfg['model']['arch']}, "
        f"{per_device} images of {cfg['dataset']['image_size']} px per device, "
        f"amp={cfg['amp']['level']}) but {available / GIB:.1f} GiB is {where}; {advice} "
        "(train.memory_check=false skips this check)")


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
