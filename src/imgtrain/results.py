"""results.json: one machine-readable summary per run, written by rank 0 (and by run.py on failure)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imgtrain.checkpoint_files import write_json_atomic
from imgtrain.config import Config, check_choices
from imgtrain.errors import ConfigError
from imgtrain.slurm import job_id

if TYPE_CHECKING:
    from imgtrain.plan import RunPlan

RESULTS = "results.json"
WEIGHTS_ONLY = ("predict", "export")  # modes that read model.weights and no dataset


def run_results(plan: RunPlan, trainer: Any) -> dict[str, Any]:
    """The summary of a run as it stands; the caller adds `status`."""
    state = trainer.state
    last = state.history[-1] if state.history else {}
    return {
        **identity(plan),
        "global_batch_size": plan.batches.global_batch,  # mode=eval: its own batch
        "epochs": plan.train.epochs,
        "epochs_completed": state.epoch,
        "images_per_sec": state.timed_images / state.timed_seconds if state.timed_seconds else 0.0,
        "best_acc1": state.best_acc1,
        "final_acc1": last.get("acc1"),
        "final_acc5": last.get("acc5"),
        "val_samples": last.get("samples"),
        "train_seconds": state.train_seconds,
        **({"ema_acc1": last.get("ema_acc1"), "best_ema_acc1": state.best_ema_acc1}
           if getattr(trainer, "ema", None) is not None else {}),
        **({"resumed": trainer.resumed} if getattr(trainer, "resumed", None) else {}),
        "history": state.history,
    }


def identity(plan: RunPlan) -> dict[str, Any]:
    """What the run is, known before any process starts. mode=predict and export record no
    training settings: they use none (no AMP, batch or lr; one process)."""
    return _identity(plan.cfg, plan.device, plan.world_size, plan.overrides)


def _identity(config: Config, device: str, world_size: int,
              overrides: Iterable[str]) -> dict[str, Any]:
    if config.mode in WEIGHTS_ONLY:
        return {"arch": config.model.arch, "device": device, "weights": config.model.weights,
                "torch_version": torch.__version__, "overrides": list(overrides),
                "mode": config.mode}
    return {
        "arch": config.model.arch, "dataset": config.dataset.name, "device": device,
        "world_size": world_size, "amp": config.amp.level, "torch_version": torch.__version__,
        # train.batch_size even for mode=eval, whose own batch run_results records once it runs
        "global_batch_size": config.train.batch_size, "lr": config.optim.lr,
        "overrides": list(overrides), "mode": config.mode,
        **({"slurm_job_id": job_id()} if job_id() else {}),
    }


def raw_identity(composed: dict[str, Any], overrides: list[str]) -> dict[str, Any] | None:
    """The identity of a run that failed before it had a plan, from the composed config (as
    `OmegaConf.to_container(cfg, resolve=False)` gives it): as `identity` where the config
    resolves far enough (known keys, interpolations, choices, device, world), so that a sweep's
    error record of a bad dataset.root still names the job's overrides and lr; else its values as
    written (optim.lr may be its ${...} rule); None where not even those can be read."""
    from imgtrain import device as devices  # here: results.json's readers need neither
    from imgtrain.jobenv import plan_job
    from imgtrain.plan import typed
    try:
        config = typed(OmegaConf.merge(OmegaConf.structured(Config), composed))
        check_choices(config)
        device = devices.resolve_name(config.device.name)
        world_size = plan_job(config.world).world_size
    except (ConfigError, OmegaConfBaseException):
        return _as_written(composed)
    return _identity(config, device, world_size, overrides)


def _as_written(composed: dict[str, Any]) -> dict[str, Any] | None:
    try:
        model, mode, device = composed["model"], composed["mode"], composed["device"]["name"]
        if mode in WEIGHTS_ONLY:
            return {"arch": model["arch"], "device": device, "weights": model["weights"],
                    "torch_version": torch.__version__, "overrides": [], "mode": mode}
        world = composed["world"]
        return {
            "arch": model["arch"], "dataset": composed["dataset"]["name"], "device": device,
            "world_size": world["nproc_per_node"] * world["nnodes"],
            "amp": composed["amp"]["level"], "torch_version": torch.__version__,
            "global_batch_size": composed["train"]["batch_size"], "lr": composed["optim"]["lr"],
            "overrides": [], "mode": mode, **({"slurm_job_id": job_id()} if job_id() else {}),
        }
    except (KeyError, TypeError):
        return None


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def record_failure(output_dir: Path, run_identity: dict[str, Any] | None, error: str,
                   since: float) -> None:
    """Mark the run failed, without overwriting results that this invocation did not write.

    A results.json is ours to mark if it is absent, or if it says `running` and was written after
    `since` (this invocation's start). `run_identity` (`identity`, or `raw_identity` before a
    plan) is written where there are no results to mark; None: then nothing is written.
    """
    path = output_dir / RESULTS
    previous = read(path)
    if previous is not None and not (previous.get("status") == "running"
                                     and path.stat().st_mtime >= since):
        return
    base = previous if previous is not None else run_identity
    if base is not None:
        write_json_atomic(path, {**base, "status": "failed", "error": error})
