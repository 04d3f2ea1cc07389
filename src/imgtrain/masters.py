"""amp=O2's weights: half precision in the model, fp32 master copies for the optimizer to step.

As apex's O2: every parameter and buffer is cast to the half dtype except BatchNorm's, which stay
fp32 (and are their own masters); inputs are cast at the model's entry and its outputs returned in
fp32. Frozen parameters get no master, but their fp32 values are kept beside the half ones, so
that checkpoints and the EMA hold what was loaded, not its rounded copy. precision.py owns when
these copies happen; this module only keeps the pairs.
"""
from __future__ import annotations

import torch
from torch import nn


def bare_model(model: nn.Module) -> nn.Module:
    """Strip DDP and torch.compile wrappers so state-dict keys match torchvision's."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _keep_batchnorm_fp32(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast every parameter and buffer to `dtype` except BatchNorm's, which stay fp32."""
    for child in module.children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            continue
        _keep_batchnorm_fp32(child, dtype)
    for param in module.parameters(recurse=False):
        param.data = param.data.to(dtype)
    for name, buf in module.named_buffers(recurse=False):
        if buf.is_floating_point():
            setattr(module, name, buf.to(dtype))


class MasterWeights:
    """The (half parameter, fp32 master) pairs of an O2 model; empty at the other levels, where
    every method reads the model's own parameters."""

    def __init__(self) -> None:
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (half param, fp32 master)
        self._frozen_fp32: dict[int, torch.Tensor] = {}  # frozen params' fp32 values by id

    def attach(self, model: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
        """Halve `model` in place (BatchNorm kept fp32) and return the masters to step, one per
        trainable parameter in `model.parameters()` order, copied from its fp32 weights."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        masters = [nn.Parameter(p.detach().clone().float()) for p in trainable]
        # Frozen parameters get no master, but their exact fp32 values stay beside the half ones
        # (on the device, where the EMA reads them): checkpoints and the EMA hold these.
        self._frozen_fp32 = {id(p): p.detach().float().clone()
                             for p in model.parameters() if not p.requires_grad}
        _keep_batchnorm_fp32(model, dtype)
        # BatchNorm's fp32 parameters are their own masters: the optimizer steps them in place.
        self._pairs = [(p, p if p.dtype == torch.float32 else m)
                       for p, m in zip(trainable, masters)]
        # As apex O2's patched forward: half inputs in, fp32 outputs out, so callers never cast.
        model.register_forward_pre_hook(lambda _module, args: tuple(
            a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
        model.register_forward_hook(lambda _module, _args, out: out.float())
        return [master for _, master in self._pairs]

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """Copy the half gradients into the masters' existing `.grad` (an optimizer may hold views
        of it), or give a master its first one."""
        for half, master in self._pairs:
            if half is master:
                continue
            if half.grad is None:
                if master.grad is not None:
                    master.grad.zero_()
            elif master.grad is None:
                master.grad = half.grad.float()
            else:
                master.grad.copy_(half.grad)

    @torch.no_grad()
    def masters_to_model(self) -> None:
        halves = [h for h, m in self._pairs if h is not m]
        if halves:
            torch._foreach_copy_(halves, [m for h, m in self._pairs if h is not m])

    def full_precision_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict in fp32 on the CPU, with the masters in place of its half
        weights."""
        bare = bare_model(model)
        state = {key: value.detach().float() if value.is_floating_point() else value.detach()
                 for key, value in bare.state_dict().items()}
        master_of = {**self._frozen_fp32, **{id(half): master for half, master in self._pairs}}
        for name, param in bare.named_parameters():
            if id(param) in master_of:
                state[name] = master_of[id(param)].detach()
        return {key: value.cpu() for key, value in state.items()}

    def master_params(self, model: nn.Module) -> list[torch.Tensor]:
        """Each parameter's true value, in the model's order: its fp32 master where it has one
        (a frozen parameter's fp32 value where it has none), else the parameter itself."""
        master_of = {**self._frozen_fp32, **{id(half): master for half, master in self._pairs}}
        return [master_of.get(id(p), p) for p in bare_model(model).parameters()]

    @torch.no_grad()
    def load_full_precision_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """The inverse of `full_precision_state`: fp32 weights into the model, and into the
        masters at full precision (the model's half weights are their rounded copies)."""
        bare = bare_model(model)
        bare.load_state_dict(state)
        master_of = {**self._frozen_fp32,
                     **{id(half): master for half, master in self._pairs if half is not master}}
        for name, param in bare.named_parameters():
            if id(param) in master_of:
                master_of[id(param)].copy_(state[name])
