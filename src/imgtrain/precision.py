"""amp=O0|O1|O2 as one object: apex's optimisation levels on native torch.amp.

- O0: fp32 everything.
- O1: per-op autocast; fp32 weights; GradScaler (dynamic by default with float16).
- O2: half-precision weights and buffers, BatchNorm kept in fp32, inputs cast at the model's entry,
      and the optimizer stepping on fp32 master copies (static loss scale 1024 by default, as the
      seed's apex run set it; apex's own O2 default is dynamic).

An overflowed step is skipped under a static scale too, where apex applies it (see the docs).

The trainer only calls `autocast()`, `backward()`, `step()` and the state-dict methods, so it never
branches on the level. docs/precision-and-npu.md maps each level onto apex's.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imgtrain.device import DeviceInfo
from imgtrain.errors import ConfigError
from imgtrain.masters import MasterWeights

if TYPE_CHECKING:
    from imgtrain.plan import Amp

LEVELS = ("O0", "O1", "O2")
_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# The static scale the seed's apex run set (loss_scale=1024) for its published numbers.
O2_STATIC_SCALE = 1024.0


def resolve_dtype(level: str, dtype: str, device: DeviceInfo) -> torch.dtype | None:
    if level not in LEVELS:
        raise ConfigError(f"unknown AMP level {level!r}; choose one of {', '.join(LEVELS)}")
    if level == "O0":
        return None
    if dtype == "auto":
        return device.default_half_dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown amp.dtype {dtype!r}; choose auto, float16 or bfloat16")
    resolved = _DTYPES[dtype]
    if resolved == torch.float16 and device.name == "cpu":
        raise ConfigError("amp.dtype=float16 is not supported on the CPU; use amp.dtype=bfloat16 "
                          "(or auto)")
    return resolved


def resolve_loss_scale(level: str, dtype: torch.dtype | None, loss_scale: Any) -> float | str | None:
    """None (no scaler), 'dynamic', or a static scale."""
    if dtype is None:
        return None
    if loss_scale == "auto":
        if dtype == torch.bfloat16:
            return None  # bfloat16 has fp32's exponent range: scaling only costs time
        return O2_STATIC_SCALE if level == "O2" else "dynamic"
    if dtype == torch.bfloat16:
        raise ConfigError(f"amp.loss_scale={loss_scale} with bfloat16: bfloat16 needs no loss "
                          "scaling; leave amp.loss_scale=auto or use amp.dtype=float16")
    if loss_scale == "dynamic":
        return "dynamic"
    try:
        scale = float(loss_scale)
    except (TypeError, ValueError):
        raise ConfigError(f"amp.loss_scale={loss_scale!r}: use auto, dynamic or a number") from None
    if not scale > 0:
        raise ConfigError(f"amp.loss_scale={loss_scale!r} must be positive")
    return scale


class Precision:
    """Autocast, loss scaling and (for O2) fp32 master weights, behind one small interface."""

    def __init__(self, level: str, dtype: torch.dtype | None, loss_scale: float | str | None,
                 device: DeviceInfo) -> None:
        self.level, self.dtype, self.device = level, dtype, device
        self.static_scale = loss_scale if isinstance(loss_scale, float) else None
        self.scaler = None
        if loss_scale is not None:
            self.scaler = device.grad_scaler(init_scale=self.static_scale or 2.0 ** 16,
                                             dynamic=self.static_scale is None)
        self.masters = MasterWeights()  # O2's fp32 copies; empty at the other levels

    @property
    def emulated_on_this_cpu(self) -> bool:
        """bfloat16 on a CPU without oneDNN's bfloat16 kernels (they need AVX512-BF16 or AMX):
        convolutions fall back to torch's reference kernels, whose backward pass took ~30x an
        fp32 step on the development machine's AVX2 CPU."""
        return self.device.name == "cpu" and self.dtype == torch.bfloat16 and \
            not torch.ops.mkldnn._is_mkldnn_bf16_supported()

    @classmethod
    def from_plan(cls, amp: Amp, device: DeviceInfo) -> "Precision":
        """The plan's AMP (plan.amp: dtype and loss scale resolved once, in the parent) on this
        process's device."""
        return cls(amp.level, amp.dtype, amp.loss_scale, device)

    def prepare(self, model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
        """Make the model this level's shape; return it and the parameters the optimizer steps.

        O2 copies its fp32 masters from the model's weights, so every rank must hold rank 0's
        already (the worker broadcasts them first).
        """
        if self.level != "O2":
            return model, [p for p in model.parameters() if p.requires_grad]
        return model, self.masters.attach(model, self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.level == "O1":
            return torch.autocast(self.device.autocast_type, dtype=self.dtype)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def zero_grad(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Clear the gradients before a backward pass.

        Normally they are dropped (set to None). An optimizer that keeps its own views of the
        gradients (torch_npu's fused optimizers copy every `.grad` into one flat buffer on their
        first step and read only that buffer afterwards) gets them zeroed in place instead:
        replacing a `.grad` would leave it stepping a stale buffer from then on.
        """
        if not keeps_gradient_views(optimizer):
            model.zero_grad(set_to_none=True)
            return
        optimizer.zero_grad(set_to_none=False)  # the stepped gradients, in place
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for param in model.parameters():
            if id(param) not in stepped:  # O2's half weights: copied into the masters' .grad
                param.grad = None

    def step(self, optimizer: torch.optim.Optimizer,
             clip_grad_norm: float | None = None) -> torch.Tensor | None:
        """Step (unless gradients overflowed), update the scale, and refresh O2's half weights.

        With a loss scale, returns the step's verdict as a device tensor (1.0: skipped for an
        overflow, 0.0: applied), which the caller can use without a host sync; without one, None
        (nothing is skipped). torch's fused SGD takes that verdict on the device, so the step costs
        no host sync; other optimizers need one read of it on the host. `clip_grad_norm` clips
        the gradients the optimizer steps (O2's fp32 masters), after unscaling and after the
        verdict.
        """
        self.masters.grads_to_masters()
        if self.scaler is None:
            _clip(optimizer, clip_grad_norm)
            optimizer.step()
            self.masters.masters_to_model()
            return None
        self.scaler.unscale_(optimizer)
        overflowed = self._overflow_verdict(optimizer)
        _clip(optimizer, clip_grad_norm)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # The GradScaler contract for fused optimizers: they skip the step on the device.
            optimizer.grad_scale, optimizer.found_inf = None, overflowed
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif not overflowed.item():
            optimizer.step()
        self.scaler.update(self.static_scale)  # a static scale is re-pinned; dynamic adapts
        self.masters.masters_to_model()
        return overflowed

    def _overflow_verdict(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """1.0 on the device if this step's gradients overflowed, else 0.0; no host sync.

        The scaler's own check, recorded by `unscale_` for this optimizer, decides: on an Ascend
        910 in saturation mode an fp16 overflow saturates at the fp16 maximum instead of becoming
        inf, and torch_npu's check reads the device's overflow status register and clears it, so
        no later look at the (finite) values can see it. torch_npu also all-reduces that verdict
        across ranks (each device has its own register) before recording it. imgtrain's own check
        of the unscaled values is added for a scaler that does not look (torch_npu's static mode
        applies overflowed steps): a step that either check finds overflowed is skipped.
        """
        recorded = self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        device = self.scaler._scale.device
        verdict = _non_finite(optimizer, device)
        for found_inf in recorded.values():  # torch_npu's has shape (1,) on older releases
            verdict = verdict + found_inf.to(device, non_blocking=True).reshape(())
        # torch_npu adds 1 for the ranks' verdict to its own 1; fused SGD skips only on exactly 1.
        return verdict.clamp(max=1.0)

    @property
    def loss_scale(self) -> torch.Tensor | None:
        """The current scale as a device tensor (reading it does not sync)."""
        return self.scaler._scale if self.scaler is not None else None

    def full_precision_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict in fp32 on the CPU, with O2's masters in place of its half
        weights."""
        return self.masters.full_precision_state(model)

    def master_params(self, model: nn.Module) -> list[torch.Tensor]:
        """Each parameter's true value, in the model's order (O2's fp32 masters)."""
        return self.masters.master_params(model)

    def load_full_precision_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """fp32 weights into the model, and into O2's masters at full precision."""
        self.masters.load_full_precision_state(model, state)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume a dynamic scale where it was; a static scale is this run's config, not state."""
        saved = state.get("scaler")
        if self.scaler is None or self.static_scale is not None or not saved:
            return
        # torch_npu's scaler also wants its `dynamic` flag, which a GPU checkpoint lacks.
        self.scaler.load_state_dict({**saved, "dynamic": True})


def keeps_gradient_views(optimizer: torch.optim.Optimizer) -> bool:
    """torch_npu's fused optimizers (NpuFusedOptimizerBase sets is_fused_optimizer)."""
    return bool(getattr(optimizer, "is_fused_optimizer", False))


@torch.no_grad()
def _non_finite(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """1.0 on `device` if any gradient the optimizer steps holds an inf or a nan, else 0.0.

    One fused pass per dtype (the kernel GradScaler unscales with, here with a scale of 1), no
    host sync. A process drives one device, so every gradient is on it.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    found_inf = torch.zeros((), dtype=torch.float32, device=device)
    one = torch.ones((), dtype=torch.float32, device=device)
    for grads in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)
    return found_inf


def _clip(optimizer: torch.optim.Optimizer, max_norm: float | None) -> None:
    """Scale the stepped gradients so that their total norm is at most `max_norm` (on the device,
    no host sync); a step with non-finite gradients is skipped whatever this makes of them."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(
            [p for group in optimizer.param_groups for p in group["params"]], max_norm)
