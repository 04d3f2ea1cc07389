"""Before a model is evaluated or saved: every rank takes rank 0's BatchNorm statistics, and a
weight or statistic that is inf or NaN stops the run as diverged, before any checkpoint is written
from it."""
from __future__ import annotations

import torch
from torch import nn

from imgtrain.distributed import World
from imgtrain.errors import ConfigError
from imgtrain.masters import bare_model
from imgtrain.precision import Precision


def sync_buffers(world: World, modules: list[nn.Module]) -> None:
    """Rank 0's BatchNorm statistics on every rank, as DDP gives them at each training forward:
    each rank's last step updated its own copy from its own batch. Then all ranks evaluate,
    and judge finiteness, with the statistics that the checkpoint saves."""
    world.broadcast_from_main([b for module in modules for b in module.buffers()
                               if b.is_floating_point()])


def check_finite(model: nn.Module, precision: Precision, where: str, lr: float) -> None:
    """Stop as diverged when a weight or BatchNorm statistic of `model` is inf or NaN.

    A step the loss scaler skipped leaves the weights as they were; only a non-finite value
    that reached the weights is divergence. DDP keeps the weights equal on every rank, so
    every rank reaches the same verdict without exchanging it.
    """
    bare = bare_model(model)
    named = [*zip((name for name, _ in bare.named_parameters()), precision.master_params(model)),
             *((name, b) for name, b in bare.named_buffers() if b.is_floating_point())]
    if torch.stack([t.isfinite().all() for _, t in named]).all():  # one host sync
        return
    name, bad = next((name, t) for name, t in named if not t.isfinite().all())
    kind = "nan" if bad.isnan().any() else "inf"
    raise ConfigError(f"training diverged: {kind} in {name} at {where} (optim.lr={lr}); lower "
                      "the lr or check the data; no checkpoint was written from these weights")
