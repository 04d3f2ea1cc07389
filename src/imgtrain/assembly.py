"""The one way a Trainer is built from a RunPlan: by the worker, the tests and the benchmarks.

`build_trainer(plan, output_dir)` is enough on one CPU process; the worker hands in its world,
device, logger and stop signals. The order matters and is kept here alone: rank 0's weights
reach every rank before the EMA and O2's fp32 masters copy them, the EMA copies fp32 weights
before O2 halves them, and the scheduler starts at the resumed step.
"""
from __future__ import annotations

import logging
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from imgtrain import checkpoint_files, device as devices, preemption, weights as model_weights
from imgtrain.data import Loaders, build_loaders
from imgtrain.distributed import World
from imgtrain.ema import WeightAverage
from imgtrain.logger import NullLogger, RunLogger
from imgtrain.memory import check_memory
from imgtrain.models import build_model, compile_model, freeze
from imgtrain.optim import build_optimizer, build_scheduler, parameter_kinds, weight_decay_groups
from imgtrain.plan import RunPlan
from imgtrain.precision import Precision
from imgtrain.trainer import Trainer

log = logging.getLogger("imgtrain")


def build_trainer(plan: RunPlan, output_dir: Path | str, *, world: World | None = None,
                  device: devices.DeviceInfo | None = None, logger: RunLogger | None = None,
                  stop_signals: preemption.StopSignals | None = None,
                  model: nn.Module | None = None) -> Trainer:
    """A Trainer for `plan`, resumed from the run's checkpoint where train.resume finds one.
    `model`: a network to train instead of the plan's (the tests' and benchmarks' own)."""
    out, world = Path(output_dir), world or World()
    device = device or devices.for_local_rank(plan.device, world.local_rank)
    loaders = build_loaders(plan, world, accelerator=device.is_accelerator)
    precision = Precision.from_plan(plan.amp, device)
    if precision.emulated_on_this_cpu and world.is_main and plan.trains:
        log.warning("warning: amp=%s on this CPU has no native bfloat16 kernels (oneDNN needs "
                    "AVX512-BF16 or AMX): training runs many times slower than with amp=O0",
                    precision.level)
    check_memory(plan, device, world)
    resume_from = checkpoint_files.resume_path(out, plan.train.resume) if plan.trains else None
    saved = checkpoint_files.load_resume(resume_from, plan) if resume_from else None
    if model is None:
        model = _network(plan, loaders, from_weights=not saved)
    steps_per_epoch = plan.batches.steps_per_epoch(len(loaders.train), plan.train.steps_per_epoch) \
        if loaders.train is not None else 0
    trainer = _assemble(plan, out, world, device, logger or NullLogger(), loaders, precision,
                        model, steps_per_epoch, stop_signals,
                        start_step=saved["state"]["global_step"] if saved else 0)
    if saved:
        trainer.load_state_dict(saved)
        trainer.state.restarts = preemption.restart_count(trainer.state.restarts)
        trainer.resumed = {"epoch": trainer.state.epoch + 1, "step": trainer.state.step_in_epoch,
                           "restart": trainer.state.restarts}
        trainer.resumed_from = resume_from
    return trainer


def _network(plan: RunPlan, loaders: Loaders, from_weights: bool) -> nn.Module:
    """The plan's network: model.weights loaded unless a resume restores the run's own, and
    model.freeze applied."""
    model = build_model(plan.model.arch, plan.num_classes,
                        zero_init_residual=plan.model.zero_init_residual, stem=plan.model.stem)
    if from_weights and plan.model.weights:
        source = model_weights.read(plan.model.weights, plan.model.weights_key)
        if plan.mode == "eval":
            model_weights.check_class_names(source, loaders.class_names)
        model_weights.load_into(model, source, plan.model.arch, allow_new_fc=plan.trains)
    freeze(model, plan.model.freeze)
    return model


def _assemble(plan: RunPlan, out: Path, world: World, device: devices.DeviceInfo,
              logger: RunLogger, loaders: Loaders, precision: Precision, model: nn.Module,
              steps_per_epoch: int, stop_signals: preemption.StopSignals | None,
              start_step: int) -> Trainer:
    model = model.to(device.torch_device, memory_format=torch.channels_last
                     if plan.channels_last else torch.preserve_format)
    # Every rank starts from rank 0's weights before anything copies them: the EMA (torchvision
    # builds it from the DDP-synchronised model) and O2's fp32 masters. DDP's own broadcast comes
    # only when it wraps the model, after both copies are made.
    world.broadcast_from_main([t.detach() for t in (*model.parameters(), *model.buffers())])
    ema = _build_ema(plan, model)  # before O2 halves the weights: the EMA holds fp32 ones
    kinds = parameter_kinds(model)  # one per trainable parameter, in the order prepare() steps them
    model, params = precision.prepare(model)
    optimizer = build_optimizer(weight_decay_groups(kinds, params, plan.optim), plan.optim,
                                device, fused=plan.fused_sgd)
    scheduler = None if loaders.train is None else build_scheduler(  # mode=eval: no steps
        optimizer, plan.sched, plan.train.epochs, steps_per_epoch, start_step=start_step)
    eval_model = model  # never wrapped by DDP: see Trainer.eval_model
    if world.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.is_accelerator else None)
    if plan.model.compile:
        model = compile_model(model, plan.model)
        eval_model = compile_model(eval_model, plan.model)
    return Trainer(plan, model=model, eval_model=eval_model, optimizer=optimizer,
                   scheduler=scheduler, precision=precision, loaders=loaders, device=device,
                   world=world, logger=logger, output_dir=out, steps_per_epoch=steps_per_epoch,
                   ema=ema, stop_signals=stop_signals)


def _build_ema(plan: RunPlan, model: nn.Module) -> WeightAverage | None:
    """The EMA of `model` (on its device, still fp32), or None when ema.decay is null."""
    if plan.ema.decay is None:
        return None
    copy = deepcopy(model)
    # model.freeze's per-instance `train` came along: it would switch the original's layers.
    copy.__dict__.pop("train", None)
    return WeightAverage.from_plan(plan, copy)
