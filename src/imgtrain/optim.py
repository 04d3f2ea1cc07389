"""optim=sgd and sched=cosine|step: the optimizer and its per-step learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from torch import nn

from imgtrain.config import Config, OptimConfig, SchedConfig
from imgtrain.device import DeviceInfo
from imgtrain.errors import ConfigError

# torchvision's set_weight_decay: the layers whose parameters optim.norm_weight_decay covers.
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
               nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def build_optimizer(params: Iterable[Any], optim: OptimConfig, device: DeviceInfo,
                    fused: bool) -> torch.optim.Optimizer:
    """SGD over `params`: parameters, or the parameter groups of `weight_decay_groups`.
    `fused`: the plan's choice of fused SGD (plan.fused_sgd, from `resolve_fused`)."""
    if optim.name != "sgd":
        raise ConfigError(f"unknown optim.name {optim.name!r}; choose sgd")
    params = list(params)
    # By default every parameter decays, BatchNorm and biases included, as in the seed's recipe
    # (the Ascend port and pytorch/examples); optim.norm/bias_weight_decay make groups.
    kwargs = dict(lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                  nesterov=optim.nesterov)
    if fused and device.fused_sgd_class() is not None:
        return device.fused_sgd_class()(params, **kwargs)
    if not fused:  # torch's choice: foreach kernels on accelerators, the plain loop on the CPU
        return torch.optim.SGD(params, **kwargs)
    optimizer = torch.optim.SGD(params, fused=True, **kwargs)
    zero_momentum(optimizer)
    return optimizer


def parameter_kinds(model: nn.Module) -> list[tuple[bool, bool]]:
    """(is a bias, is in a normalisation layer) for each trainable parameter, in
    `model.parameters()` order."""
    return [(name == "bias", isinstance(module, NORM_LAYERS))
            for module in model.modules()
            for name, param in module.named_parameters(recurse=False) if param.requires_grad]


def group_weight_decay(kind: str, optim: OptimConfig) -> float:
    """A group's decay: optim.norm_weight_decay / bias_weight_decay for those groups."""
    return optim.weight_decay if kind == "other" else getattr(optim, f"{kind}_weight_decay")


def weight_decay_groups(kinds: list[tuple[bool, bool]], params: list[Any],
                        optim: OptimConfig) -> list[Any]:
    """`params` (the stepped parameters, one per entry of `kinds`) grouped as torchvision's
    set_weight_decay does: biases under optim.bias_weight_decay when it is set, then the
    normalisation layers' parameters under optim.norm_weight_decay when it is set, the rest under
    optim.weight_decay. With neither set, the plain list: the seed's single group."""
    bias_set = optim.bias_weight_decay is not None
    norm_set = optim.norm_weight_decay is not None
    if not (bias_set or norm_set):
        return params
    groups: dict[str, list[Any]] = {}
    for (is_bias, in_norm), param in zip(kinds, params, strict=True):
        kind = "bias" if is_bias and bias_set else "norm" if in_norm and norm_set else "other"
        groups.setdefault(kind, []).append(param)
    return [{"params": members, "kind": kind, "weight_decay": group_weight_decay(kind, optim)}
            for kind, members in groups.items()]


def resolve_fused(setting: Any, device: DeviceInfo, loss_scaled: bool = False) -> bool:
    """optim.fused=auto|true|false: auto is torch's fused SGD only for scaled float16 on a GPU.

    There the fused kernel takes the loss scaler's found_inf on the device and skips an
    overflowed step itself: no host sync a step. Elsewhere auto is torch's default SGD (the
    plain loop on the CPU, foreach kernels on accelerators), the kernel the seed's recipe ran:
    torch's CPU fused kernel rounds differently in each tensor's last elements (it computes
    momentum x buffer + gradient with one fused multiply-add there), and on the recipe's unstable
    small runs that changes the outcome (benchmarks/README.md, "Fused SGD on the CPU"). The
    NPU's fused SGD (torch_npu's NpuFusedSGD) stays opt-in.
    """
    if setting == "auto":
        return device.name == "gpu" and loss_scaled
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"optim.fused={setting!r}: use auto, true or false")


@torch.no_grad()
def zero_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give torch's fused SGD zero momentum buffers before its first step.

    Left to itself, its first step allocates the buffers uninitialised and fills them in the kernel;
    a first step skipped for inf gradients (found_inf) leaves them as garbage (torch 2.14). With
    dampening 0, zero buffers give exactly the first step torch's SGD takes (buffer = gradient).
    """
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state, keeping this run's SGD implementation.

    `load_state_dict` also restores the saved param-group flags, so a checkpoint written with
    another `optim.fused` would silently switch the implementation (and break the device-side
    skip of overflowed steps, which only the fused kernel does).
    """
    implementation = [{key: group[key] for key in ("fused", "foreach") if key in group}
                      for group in optimizer.param_groups]
    saved_kinds = [group.get("kind", "other") for group in state["param_groups"]]
    kinds = [group.get("kind", "other") for group in optimizer.param_groups]
    if saved_kinds != kinds:
        raise ConfigError(f"the checkpoint's optimizer has the weight-decay groups {saved_kinds} "
                          f"but this run makes {kinds}: resume with the run's "
                          "optim.norm_weight_decay and optim.bias_weight_decay (null or not)")
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, implementation):
        group.update(flags)
    if any(group.get("fused") for group in optimizer.param_groups):
        zero_momentum(optimizer)


# model.freeze=backbone trains one linear layer on fixed features: a convex problem, which wants
# neither the backbone's warm-up nor its weight decay, and a larger lr than the whole network's
# (linear probes: MoCo's SGD at lr 30, MAE's and SimCLR's 0.1 per 256 with LARS, all without weight
# decay). HEAD_LR_BASE, per optim.lr_base_size images, was measured against scikit-learn's
# logistic regression on the same features (benchmarks/README.md, "A head-only fine-tune").
HEAD_LR_BASE = 1.0


def head_recipe(config: Config, given: set[str]) -> str | None:
    """model.freeze=backbone: the head's own defaults for the keys the command line leaves
    unset (lr HEAD_LR_BASE per optim.lr_base_size images, no weight decay, no warm-up), set
    once, before the config is sealed. Returns how the lr was chosen (None: not a head-only
    fine-tune, or optim.lr / lr_base given)."""
    if config.model.freeze != "backbone" or config.mode != "train":
        return None
    if "optim.weight_decay" not in given:
        config.optim.weight_decay = 0.0
    if "sched.warmup_epochs" not in given:
        config.sched.warmup_epochs = 0
    if given & {"optim.lr", "optim.lr_base"}:
        return None
    config.optim.lr = HEAD_LR_BASE * config.train.batch_size / config.optim.lr_base_size
    return (f"the head's {HEAD_LR_BASE:g} x global batch {config.train.batch_size} / "
            f"{config.optim.lr_base_size} (model.freeze=backbone: a linear layer's lr, no "
            "weight decay, no warm-up; set optim.lr to override)")


def check_schedule(sched: SchedConfig) -> None:
    if sched.name not in ("cosine", "step"):
        raise ConfigError(f"unknown sched.name {sched.name!r}; choose cosine or step")
    start = sched.warmup_start_factor
    if start is not None and not 0.0 <= start <= 1.0:
        raise ConfigError(f"sched.warmup_start_factor={start} must be in [0, 1] (torchvision's "
                          "recipes: 0.01; null: the seed's ramp)")


def lr_factor(step: int, steps_per_epoch: int, sched: SchedConfig, epochs: int) -> float:
    """The learning rate multiplier at a global step: linear warm-up, then cosine or step decay."""
    warmup_steps = int(sched.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        start = sched.warmup_start_factor
        if start is None:  # the seed's ramp: 1/warmup_steps at the first step
            return (step + 1) / warmup_steps
        return start + (1.0 - start) * step / warmup_steps  # torchvision's LinearLR
    if sched.name == "cosine":
        decay_steps = max(1, epochs * steps_per_epoch - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if sched.name == "step":
        return sched.gamma ** (step // steps_per_epoch // sched.step_epochs)
    raise ConfigError(f"unknown sched.name {sched.name!r}; choose cosine or step")


def build_scheduler(optimizer: torch.optim.Optimizer, sched: SchedConfig, epochs: int,
                    steps_per_epoch: int, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per training step, from `start_step` (a resume's global step).

    A resumed schedule is built at its step rather than loaded, so that it scales the lr of this
    run's config (each group's `initial_lr`) with this run's epochs.
    """
    for group in optimizer.param_groups:  # what LambdaLR sets itself when it starts at step 0
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, sched, epochs),
        last_epoch=start_step - 1)
