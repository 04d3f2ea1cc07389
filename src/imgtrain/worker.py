"""One worker process: device and process group, then model, data, optimizer, precision, Trainer."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from imgtrain import device as devices, eval_sweep, jobenv, preemption, weights as model_weights
from imgtrain.assembly import build_trainer
from imgtrain.config import override_key
from imgtrain.data import build_loaders, cpu_cores, describe
from imgtrain.distributed import (PEER_LOSS_GRACE_SECONDS, World, is_peer_loss, process_group,
                                  world_from_env)
from imgtrain.errors import Preempted
from imgtrain.logger import NullLogger, RunLogger, close_logging, setup_logging
from imgtrain.names import run_label
from imgtrain.plan import RunPlan
from imgtrain.results import run_results
from imgtrain.summary import end_lines, start_lines
from imgtrain.trainer import Trainer

log = logging.getLogger("imgtrain")


@record
def worker(plan: RunPlan, output_dir: str) -> dict[str, Any] | None:
    """The entry point of every rank; returns rank 0's results (None elsewhere)."""
    world = world_from_env()
    out = Path(output_dir)
    # mode=export writes beside its checkpoint and keeps no log of its own (app.py removes the
    # folder Hydra made for it).
    setup_logging(None if plan.mode == "export" else out, world.is_main)
    device = devices.for_local_rank(plan.device, world.local_rank)
    device.apply_settings(plan.cfg.device)
    logger = RunLogger(out) if world.is_main else NullLogger()
    # Training stops on a signal at an agreed step; from here on, so that one during setup (the
    # whole process group gets it) is acted on at the first step rather than killing a rank.
    stop = preemption.StopSignals()
    with stop if plan.trains else contextlib.nullcontext(), process_group(world, device):
        try:
            results = _run(plan, out, world, device, logger, stop)
        except Exception as exc:
            if is_peer_loss(str(exc)):  # let the rank that crashed be the one reported
                time.sleep(PEER_LOSS_GRACE_SECONDS)
            raise
        finally:
            logger.close()
            close_logging()
    if stop.requested and jobenv.under_elastic_agent() and \
            (results or {}).get("status") in preemption.STOPPED:
        # An elastic agent that caught the signal shuts its workers down without reading what
        # they return: a rank that returned would wait for that read until the agent's SIGKILL.
        sys.exit(results["exit_code"])
    return results


def _share_cpu_threads(world: World) -> None:
    """Split the cores between this node's processes, as torchrun does with OMP_NUM_THREADS=1:
    N processes each using every core oversubscribe the CPU several times over."""
    if world.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cpu_cores() // world.local_world_size))


def _run(plan: RunPlan, out: Path, world: World, device: devices.DeviceInfo,
         logger: RunLogger, stop: preemption.StopSignals) -> dict[str, Any] | None:
    _share_cpu_threads(world)
    torch.manual_seed(plan.train.seed + world.rank)
    for line in plan.adopted:  # eval|predict|export: what the checkpoint said its model is
        log.info("%s", line)
    if plan.mode in ("predict", "export"):
        source = model_weights.read(plan.model.weights, plan.model.weights_key)
        if plan.mode == "predict":
            from imgtrain.predict import predict
            return predict(plan, out, device, source)
        from imgtrain.export import export
        return export(plan, source)
    if plan.mode == "bench_data":
        from imgtrain.bench import bench_loader
        return bench_loader(plan, build_loaders(plan, world, device.is_accelerator), world,
                            logger)
    trainer = build_trainer(plan, out, world=world, device=device, logger=logger,
                            stop_signals=stop)
    return _execute(plan, trainer, logger, out)


def _execute(plan: RunPlan, trainer: Trainer, logger: RunLogger, out: Path) -> Any:
    results = run_results(plan, trainer)
    if plan.mode == "eval":
        return _evaluate(plan, trainer, logger, out, results)
    if trainer.state.epoch >= plan.train.epochs:
        logger.info("run already completed %d epochs; nothing to train (results.json has its "
                    "results)", trainer.state.epoch)
        return {**run_results(plan, trainer), "status": "completed", "already_completed": True}
    for line in start_lines(plan, trainer, out, trainer.resumed_from):
        logger.info("%s", line)
    logger.hparams(hparam_values(plan), trial=run_label(out))
    logger.results({**results, "status": "running"})
    started = time.time()
    try:
        trainer.fit()
    except Preempted as exc:
        return _stopped(plan, trainer, logger, str(exc))
    results = {**run_results(plan, trainer), "status": "completed"}
    logger.results(results)
    for line in end_lines(results, time.time() - started, out):
        logger.info("%s", line)
    return results


def _evaluate(plan: RunPlan, trainer: Trainer, logger: RunLogger, out: Path,
              results: dict[str, Any]) -> dict[str, Any]:
    """mode=eval: the weights' loss and accuracy on the validation split (at each test size of
    a sweep), said with what was evaluated, on what, and where the results are."""
    weights = str(Path(plan.model.weights).expanduser().resolve())
    sizes = len(plan.eval_sizes)
    logger.info("eval: %s (%s) on %s, val split: %d images, batch %d%s", weights,
                plan.model.arch, describe(plan.dataset), len(trainer.loaders.val.dataset),
                plan.batches.global_batch, f", {sizes} test sizes" if sizes else "")
    if sizes:
        rows = eval_sweep.sweep(plan, trainer, trainer.world, trainer.device.is_accelerator,
                                lambda line: logger.info("%s", line))
        results.update(status="completed", weights=weights, **eval_sweep.results(rows))
        top = eval_sweep.best(rows)
        logger.results(results)
        logger.info("eval done: best acc1 %.3f acc5 %.3f at resize %d crop %d (of %d sizes, %d "
                    "images each)", top["acc1"], top["acc5"], top["resize"], top["crop"], sizes,
                    top["samples"])
    else:
        with trainer.progress:
            val = trainer.evaluate()
        results.update(status="completed", weights=weights, final_acc1=val["acc1"],
                       final_acc5=val["acc5"], best_acc1=val["acc1"], val_samples=val["samples"],
                       val_loss=val["loss"])
        logger.results(results)
        logger.info("eval done: loss %.4f acc1 %.3f acc5 %.3f (%d images)", val["loss"],
                    val["acc1"], val["acc5"], val["samples"])
    logger.info("  weights    %s", weights)
    logger.info("  results    %s", out / "results.json")
    return results


def _stopped(plan: RunPlan, trainer: Trainer, logger: RunLogger, where: str) -> dict[str, Any]:
    """A stop signal ended training at an agreed step: one line on where and how to resume, and
    results.json's status; the launcher exits with the returned `exit_code`."""
    sig = trainer.stop_signals.received
    status, code = preemption.outcome(sig, plan.train.preempt_exit_code)
    results = {**run_results(plan, trainer), "status": status, "exit_code": code}
    logger.results(results)
    hint = plan.launch.requeue_hint if status == "preempted" else ""
    logger.info("%s by %s %s; %s (exit code %d)", status, preemption.name(sig), where,
                hint or plan.launch.resume_hint, code)
    return results


def _hparam_value(text: str) -> Any:
    """An override's value as TensorBoard filters it: numbers as numbers, the rest as text."""
    try:
        return float(text) if text.strip().lower() not in ("nan", "inf", "-inf") else text
    except ValueError:
        return text


# Override keys that a main column shows as resolved: a run that chose amp through an experiment
# (or not at all) has amp.level filled like the one that typed amp=O1, in the same column.
_MAIN_COLUMN_OF = {"amp": "amp.level", "model": "model.arch", "dataset": "dataset.name",
                   "device": "device", "device.name": "device", "sched": "sched.name",
                   "world": "world_size"}


def hparam_values(plan: RunPlan) -> dict[str, Any]:
    """The run's main settings by config key, resolved (every run fills each), then its other
    overrides (the swept keys among them) by key."""
    experiment = next((o.partition("=")[2] for o in plan.overrides
                       if override_key(o) == "experiment"), "none")
    values: dict[str, Any] = {
        "experiment": experiment, "model.arch": plan.model.arch,
        "dataset.name": plan.dataset_label, "device": plan.device, "world_size": plan.world_size,
        "train.batch_size": plan.batches.global_batch, "optim.lr": plan.optim.lr,
        "optim.weight_decay": plan.optim.weight_decay, "sched.name": plan.sched.name,
        "sched.warmup_epochs": plan.sched.warmup_epochs, "train.epochs": plan.train.epochs,
        "amp.level": plan.amp.level}
    for override in plan.overrides:
        key = override_key(override)
        if _MAIN_COLUMN_OF.get(key, key) not in values:
            values[key] = _hparam_value(override.partition("=")[2])
    return values
