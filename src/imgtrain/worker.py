"""One worker process: device and process group, then model, data, optimizer, precision, Trainer."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from imgtrain import checkpoint, device as devices, jobenv, preemption, weights as model_weights
from imgtrain.data import build_loaders, cpu_cores, describe
from imgtrain.distributed import (PEER_LOSS_GRACE_SECONDS, World, is_peer_loss, process_group,
                                  world_from_env)
from imgtrain.logger import NullLogger, RunLogger, close_logging, setup_logging
from imgtrain.models import build_model, compile_model, freeze
from imgtrain.memory import check_memory
from imgtrain.ema import WeightAverage
from imgtrain.optim import build_optimizer, build_scheduler, parameter_kinds, weight_decay_groups
from imgtrain.precision import Precision
from imgtrain.results import run_results
from imgtrain.summary import end_lines, start_lines
from imgtrain.errors import Preempted
from imgtrain.trainer import Trainer, epoch_steps

log = logging.getLogger("imgtrain")


@record
def worker(cfg: dict[str, Any], output_dir: str) -> dict[str, Any] | None:
    """The entry point of every rank; returns rank 0's results (None elsewhere)."""
    world = world_from_env()
    out = Path(output_dir)
    setup_logging(out, world.is_main)
    device = devices.for_local_rank(cfg["device"]["resolved"], world.local_rank)
    device.apply_settings(cfg["device"])
    logger = RunLogger(out) if world.is_main else NullLogger()
    # Training stops on a signal at an agreed step; from here on, so that one during setup (the
    # whole process group gets it) is acted on at the first step rather than killing a rank.
    stop = preemption.StopSignals()
    with stop if cfg["mode"] == "train" else contextlib.nullcontext(), \
            process_group(world, device):
        try:
            results = _run(cfg, out, world, device, logger, stop)
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


def _run(cfg: dict[str, Any], out: Path, world: World, device: devices.DeviceInfo,
         logger: RunLogger, stop: preemption.StopSignals) -> dict[str, Any] | None:
    _share_cpu_threads(world)
    torch.manual_seed(cfg["train"]["seed"] + world.rank)
    source = model_weights.for_mode(cfg)  # eval|predict|export: the checkpoint names its model
    if cfg["mode"] == "predict":
        from imgtrain.predict import predict
        return predict(cfg, out, device, source)
    if cfg["mode"] == "export":
        from imgtrain.export import export
        return export(cfg, out, source)
    evaluating = cfg["mode"] == "eval"  # the val split alone, in batches of eval.batch_size
    loaders = build_loaders(cfg["dataset"],
                            cfg["eval"]["batch_size"] if evaluating else cfg["train"]["batch_size"],
                            world.rank, world.world_size, world.local_world_size,
                            cfg["train"]["seed"], accelerator=device.is_accelerator,
                            accumulate_steps=1 if evaluating else cfg["train"]["accumulate_steps"],
                            val_batch=cfg["eval"]["batch_size"], train=not evaluating)
    if cfg["mode"] == "bench_data":
        from imgtrain.bench import bench_loader
        return bench_loader(cfg, loaders, world, logger)
    precision = Precision.from_config(cfg["amp"], device)
    if precision.emulated_on_this_cpu and world.is_main and cfg["mode"] == "train":
        log.warning("warning: amp=%s on this CPU has no native bfloat16 kernels (oneDNN needs "
                    "AVX512-BF16 or AMX): training runs many times slower than with amp=O0",
                    precision.level)
    check_memory(cfg, device, world, loaders.num_classes, half=precision.dtype is not None)
    model = build_model(cfg["model"]["arch"], loaders.num_classes,
                        zero_init_residual=cfg["model"]["zero_init_residual"])
    resume_from = checkpoint.resume_path(out, cfg["train"]["resume"]) if cfg["mode"] == "train" \
        else None
    saved = _load_resume(resume_from, cfg, loaders, world) if resume_from else None
    if not saved and cfg["model"]["weights"]:
        source = source or model_weights.read(cfg["model"]["weights"], cfg["model"]["weights_key"])
        if cfg["mode"] == "eval":
            model_weights.check_class_names(source, loaders.class_names)
        model_weights.load_into(model, source, cfg["model"]["arch"],
                                allow_new_fc=cfg["mode"] == "train")
    freeze(model, cfg["model"]["freeze"])
    trainer = _build_trainer(cfg, out, world, device, logger, loaders, precision, model, stop)
    if saved:
        trainer.load_state_dict(saved)
        trainer.state.restarts = preemption.restart_count(trainer.state.restarts)
        trainer.resumed = {"epoch": trainer.state.epoch + 1, "step": trainer.state.step_in_epoch,
                           "restart": trainer.state.restarts}
    return _execute(cfg, trainer, logger, resumed_from=resume_from if saved else None, out=out)


def _load_resume(path: Path, cfg: dict[str, Any], loaders: Any, world: World) -> dict[str, Any]:
    saved = checkpoint.load(path)
    checkpoint.check_compatible(saved, {"arch": cfg["model"]["arch"],
                                        "num_classes": loaders.num_classes,
                                        "global_batch_size": cfg["train"]["batch_size"],
                                        "freeze": cfg["model"]["freeze"]}, path)
    return saved  # the start summary says where it resumes from


def _channels_last(cfg: dict[str, Any], device: devices.DeviceInfo) -> bool:
    setting = cfg["model"]["channels_last"]
    return device.name == "gpu" if setting == "auto" else bool(setting)


def _build_trainer(cfg: dict[str, Any], out: Path, world: World, device: devices.DeviceInfo,
                   logger: RunLogger, loaders: Any, precision: Precision,
                   model: torch.nn.Module,
                   stop: preemption.StopSignals | None = None) -> Trainer:
    channels_last = _channels_last(cfg, device)
    model = model.to(device.torch_device,
                     memory_format=torch.channels_last if channels_last else torch.preserve_format)
    # Every rank starts from rank 0's weights before anything copies them: the EMA (torchvision
    # builds it from the DDP-synchronised model) and O2's fp32 masters. DDP's own broadcast comes
    # only when it wraps the model, after both copies are made.
    world.broadcast_from_main([t.detach() for t in (*model.parameters(), *model.buffers())])
    ema = _build_ema(cfg, model)  # before O2 halves the weights: the EMA holds fp32 ones
    kinds = parameter_kinds(model)  # one per trainable parameter, in the order prepare() steps them
    model, params = precision.prepare(model)
    optimizer = build_optimizer(weight_decay_groups(kinds, params, cfg["optim"]), cfg["optim"],
                                device, loss_scaled=precision.scaler is not None)
    scheduler = None if loaders.train is None else build_scheduler(  # mode=eval: no steps
        optimizer, cfg["sched"], cfg["train"]["epochs"],
        epoch_steps(loaders, cfg["train"]["steps_per_epoch"]))
    eval_model = model  # never wrapped by DDP: see Trainer.eval_model
    if world.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.is_accelerator else None)
    if cfg["model"]["compile"]:
        model = compile_model(model, cfg["model"])
        eval_model = compile_model(eval_model, cfg["model"])
    return Trainer(model=model, optimizer=optimizer, scheduler=scheduler, precision=precision,
                   loaders=loaders, device=device, world=world, logger=logger, cfg=cfg,
                   output_dir=out, channels_last=channels_last, eval_model=eval_model, ema=ema,
                   stop_signals=stop)


def _build_ema(cfg: dict[str, Any], model: torch.nn.Module) -> WeightAverage | None:
    """The EMA of `model` (on its device, still fp32), or None when ema.decay is null."""
    if cfg["ema"]["decay"] is None:
        return None
    copy = deepcopy(model)
    # model.freeze's per-instance `train` came along: it would switch the original's layers.
    copy.__dict__.pop("train", None)
    return WeightAverage.from_config(cfg, copy, global_batch=cfg["train"]["batch_size"])


def _execute(cfg: dict[str, Any], trainer: Trainer, logger: RunLogger, resumed_from: Path | None,
             out: Path) -> Any:
    results = run_results(cfg, trainer)
    if cfg["mode"] == "eval":
        return _evaluate(cfg, trainer, logger, out, results)
    if trainer.state.epoch >= cfg["train"]["epochs"]:
        logger.info("run already completed %d epochs; nothing to train (results.json has its "
                    "results)", trainer.state.epoch)
        return {**run_results(cfg, trainer), "status": "completed", "already_completed": True}
    for line in start_lines(cfg, trainer, out, resumed_from):
        logger.info("%s", line)
    logger.hparams(hparam_values(cfg, trainer))
    logger.results({**results, "status": "running"})
    started = time.time()
    try:
        trainer.fit()
    except Preempted as exc:
        return _stopped(cfg, trainer, logger, str(exc))
    results = {**run_results(cfg, trainer), "status": "completed"}
    logger.results(results)
    for line in end_lines(results, time.time() - started, out):
        logger.info("%s", line)
    return results


def _evaluate(cfg: dict[str, Any], trainer: Trainer, logger: RunLogger, out: Path,
              results: dict[str, Any]) -> dict[str, Any]:
    """mode=eval: the weights' loss and accuracy on the validation split, said with what was
    evaluated, on what, and where the results are."""
    weights = str(Path(cfg["model"]["weights"]).expanduser().resolve())
    logger.info("eval: %s (%s) on %s, val split: %d images, batch %d", weights,
                cfg["model"]["arch"], describe(cfg["dataset"]), len(trainer.loaders.val.dataset),
                trainer.global_batch)
    with trainer.progress:
        val = trainer.evaluate()
    results.update(status="completed", weights=weights, final_acc1=val["acc1"],
                   final_acc5=val["acc5"], best_acc1=val["acc1"], val_samples=val["samples"],
                   val_loss=val["loss"])
    logger.results(results)
    logger.info("eval done: loss %.4f acc1 %.3f acc5 %.3f (%d images)", val["loss"], val["acc1"],
                val["acc5"], val["samples"])
    logger.info("  weights    %s", weights)
    logger.info("  results    %s", out / "results.json")
    return results


def _stopped(cfg: dict[str, Any], trainer: Trainer, logger: RunLogger,
             where: str) -> dict[str, Any]:
    """A stop signal ended training at an agreed step: one line on where and how to resume, and
    results.json's status; the launcher exits with the returned `exit_code`."""
    sig = trainer.stop_signals.received
    status, code = preemption.outcome(sig, cfg["train"]["preempt_exit_code"])
    results = {**run_results(cfg, trainer), "status": status, "exit_code": code}
    logger.results(results)
    logger.info("%s by %s %s; %s (exit code %d)", status, preemption.name(sig), where,
                cfg.get("resume_hint", ""), code)
    return results


def override_keys(cfg: dict[str, Any]) -> list[str]:
    """The keys of the run's command-line overrides, without their +/++/~ prefixes."""
    return [str(o).partition("=")[0].lstrip("+~") for o in cfg.get("overrides") or []]


def _hparam_value(text: str) -> Any:
    """An override's value as TensorBoard filters it: numbers as numbers, the rest as text."""
    try:
        return float(text) if text.strip().lower() not in ("nan", "inf", "-inf") else text
    except ValueError:
        return text


def hparam_values(cfg: dict[str, Any], trainer: Trainer) -> dict[str, Any]:
    """Every override (the swept keys among them), then the run's main settings by config key."""
    values = {key: _hparam_value(str(override).partition("=")[2])
              for key, override in zip(override_keys(cfg), cfg.get("overrides") or [])}
    main = {"model.arch": cfg["model"]["arch"], "dataset.name": cfg["dataset"]["name"],
            "device": cfg["device"]["resolved"], "world_size": trainer.world.world_size,
            "train.batch_size": trainer.global_batch, "optim.lr": cfg["optim"]["lr"],
            "optim.weight_decay": cfg["optim"]["weight_decay"], "sched.name": cfg["sched"]["name"],
            "sched.warmup_epochs": cfg["sched"]["warmup_epochs"],
            "train.epochs": cfg["train"]["epochs"], "amp.level": cfg["amp"]["level"]}
    for key, value in main.items():
        values.setdefault(key, value)
    return values
