"""ema.decay / ema.steps: an exponential moving average of the weights and BatchNorm buffers.

torch's `AveragedModel` holds the average and `get_ema_multi_avg_fn` folds the weights in, as in
torchvision's references (`ExponentialMovingAverage`): updated every `ema.steps` optimizer steps, with the decay
adjusted for that interval and the global batch, and restarted from the current weights after each
update during the warm-up. It averages the fp32 values the optimizer steps (O2's masters), never
the half weights, and is evaluated next to the raw model after every epoch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgtrain.config import EmaConfig
from imgtrain.errors import ConfigError

if TYPE_CHECKING:
    from imgtrain.plan import RunPlan


def check_ema(ema: EmaConfig) -> None:
    if ema.decay is not None and not 0.0 <= ema.decay < 1.0:
        raise ConfigError(f"ema.decay={ema.decay} must be in [0, 1), e.g. 0.99998 (null: no EMA)")
    if ema.steps < 1:
        raise ConfigError(f"ema.steps={ema.steps} must be at least 1")


def adjusted_decay(decay: float, steps: int, global_batch: int, epochs: int) -> float:
    """torchvision's adjustment (references/classification/train.py): the decay applied every
    `steps` optimizer steps is 1 - (1 - decay) * global_batch * steps / epochs, at least 0."""
    adjust = global_batch * steps / epochs
    return 1.0 - min(1.0, (1.0 - decay) * adjust)


class WeightAverage:
    """The EMA model (an fp32 copy of the network) and when to update it."""

    def __init__(self, copy: nn.Module, decay: float, every_steps: int,
                 warmup_epochs: float) -> None:
        self.decay, self.every_steps, self.warmup_epochs = decay, every_steps, warmup_epochs
        self.averaged = AveragedModel(copy, use_buffers=True)
        self.averaged.requires_grad_(False)
        self._average = get_ema_multi_avg_fn(decay)
        # Whether the next update copies instead of averaging. AveragedModel.update_parameters
        # asks `n_averaged == 0` of its device counter for every tensor (a host sync each time);
        # this host flag answers it once, and the counter is only ever written on the device.
        self._fresh = True

    @classmethod
    def from_plan(cls, plan: RunPlan, copy: nn.Module) -> "WeightAverage":
        """The plan's average (ema.decay set), starting at `copy`'s weights (an fp32 network of
        its own)."""
        ema = plan.ema
        decay = adjusted_decay(ema.decay, ema.steps, plan.batches.global_batch, plan.train.epochs)
        return cls(copy, decay, ema.steps, plan.sched.warmup_epochs)

    @property
    def module(self) -> nn.Module:
        """The averaged network, to evaluate (and to save)."""
        return self.averaged.module

    def due(self, global_step: int) -> bool:
        """Whether optimizer step `global_step` (counted from 1) ends with an update."""
        return global_step % self.every_steps == 0

    def update(self, epoch: int, params: Iterable[torch.Tensor],
               buffers: Iterable[torch.Tensor]) -> None:
        """Fold in `params` (the values the optimizer steps, in the network's order) and the
        network's `buffers`."""
        self._fold_in(params, buffers)
        if epoch < self.warmup_epochs:  # torchvision: the average restarts until warm-up ends
            self.restart()

    def restart(self) -> None:
        """Make the next update a copy of the weights, as torchvision's n_averaged.fill_(0)."""
        self.averaged.n_averaged.fill_(0)
        self._fresh = True

    @torch.no_grad()
    def _fold_in(self, params: Iterable[torch.Tensor], buffers: Iterable[torch.Tensor]) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*params, *buffers)]
        if self._fresh:
            torch._foreach_copy_(averaged, current)
        else:  # get_ema_multi_avg_fn takes one dtype at a time (BatchNorm's counters are ints)
            for floats in (True, False):
                pairs = [(a, c) for a, c in zip(averaged, current)
                         if a.is_floating_point() == floats]
                if pairs:
                    self._average(*map(list, zip(*pairs)), None)
        self.averaged.n_averaged += 1
        self._fresh = False

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AveragedModel's own layout (`module.` keys and `n_averaged`), as torchvision's
        `model_ema`: model.weights_key=ema reads it in mode=eval, export and fine-tuning."""
        return {key: value.detach().cpu() for key, value in self.averaged.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)
        self._fresh = int(state["n_averaged"]) == 0  # the checkpoint's copy, on the host
