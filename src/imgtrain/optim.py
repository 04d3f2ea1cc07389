"""optim=sgd and sched=cosine|step: the optimizer and its per-step learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from imgtrain.device import DeviceInfo
from imgtrain.errors import ConfigError


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_cfg: Any,
                    device: DeviceInfo) -> torch.optim.Optimizer:
    if optim_cfg["name"] != "sgd":
        raise ConfigError(f"unknown optim.name {optim_cfg['name']!r}; choose sgd")
    params = list(params)
    # No weight decay on BatchNorm and bias would differ from the seed's recipe, so every parameter
    # decays, as in the Ascend port and pytorch/examples.
    kwargs = dict(lr=optim_cfg["lr"], momentum=optim_cfg["momentum"],
                  weight_decay=optim_cfg["weight_decay"], nesterov=optim_cfg["nesterov"])
    fused_class = device.fused_sgd_class() if optim_cfg["fused"] else None
    if fused_class is not None:
        return fused_class(params, **kwargs)
    if optim_cfg["fused"]:
        return torch.optim.SGD(params, fused=True, **kwargs)
    # torch's own choice: foreach kernels on accelerators, the plain loop on the CPU (foreach has no
    # CPU kernel). Fused stays opt-in: after a step skipped for inf gradients, torch's fused SGD
    # leaves an uninitialised momentum buffer behind (seen with torch 2.14 on the CPU).
    return torch.optim.SGD(params, **kwargs)


def lr_factor(step: int, steps_per_epoch: int, sched_cfg: Any, epochs: int) -> float:
    """The learning rate multiplier at a global step: linear warm-up, then cosine or step decay."""
    warmup_steps = int(sched_cfg["warmup_epochs"] * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if sched_cfg["name"] == "cosine":
        decay_steps = max(1, epochs * steps_per_epoch - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if sched_cfg["name"] == "step":
        return sched_cfg["gamma"] ** (step // steps_per_epoch // sched_cfg["step_epochs"])
    raise ConfigError(f"unknown sched.name {sched_cfg['name']!r}; choose cosine or step")


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: Any, epochs: int,
                    steps_per_epoch: int, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per training step, from `start_step` (a resume's global step).

    A resumed schedule is built at its step rather than loaded, so that it scales the lr of this
    run's config (each group's `initial_lr`) with this run's epochs.
    """
    lr_factor(0, steps_per_epoch, sched_cfg, epochs)  # reject a bad name before training starts
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, sched_cfg, epochs),
        last_epoch=start_step - 1)
