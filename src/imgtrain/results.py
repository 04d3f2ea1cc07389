"""results.json: one machine-readable summary per run, written by rank 0 (and by run.py on failure)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch

from imgtrain.checkpoint import write_json_atomic
from imgtrain.errors import ConfigError
from imgtrain.jobenv import plan_job
from imgtrain.slurm import job_id

RESULTS = "results.json"
WEIGHTS_ONLY = ("predict", "export")  # modes that read model.weights and no dataset


def run_results(cfg: dict[str, Any], trainer: Any) -> dict[str, Any]:
    """The summary of a run as it stands; the caller adds `status`."""
    state = trainer.state
    last = state.history[-1] if state.history else {}
    return {
        **identity(cfg, trainer.world.world_size),
        "global_batch_size": trainer.global_batch,
        "epochs": cfg["train"]["epochs"],
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


def identity(cfg: dict[str, Any], world_size: int | None) -> dict[str, Any]:
    """What the run is, known before any process starts. mode=predict and export record no
    training settings: they use none (no AMP, batch or lr; one process). `world_size`: the
    processes there are, or were planned (None: the world could not be planned)."""
    if cfg["mode"] in WEIGHTS_ONLY:
        return {"arch": cfg["model"]["arch"], "device": cfg["device"].get("resolved")
                or cfg["device"]["name"], "weights": cfg["model"]["weights"],
                "torch_version": torch.__version__, "overrides": cfg.get("overrides", []),
                "mode": cfg["mode"]}
    return {
        "arch": cfg["model"]["arch"], "dataset": cfg["dataset"]["name"],
        "device": cfg["device"].get("resolved") or cfg["device"]["name"],
        **({"world_size": world_size} if world_size is not None else {}),
        "amp": cfg["amp"]["level"], "torch_version": torch.__version__,
        "global_batch_size": cfg["train"]["batch_size"], "lr": cfg["optim"]["lr"],
        "overrides": cfg.get("overrides", []), "mode": cfg["mode"],
        **({"slurm_job_id": job_id()} if job_id() else {}),
    }


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def record_failure(output_dir: Path, cfg: dict[str, Any], error: str, since: float) -> None:
    """Mark the run failed, without overwriting results that this invocation did not write.

    A results.json is ours to mark if it is absent, or if it says `running` and was written after
    `since` (this invocation's start).
    """
    path = output_dir / RESULTS
    previous = read(path)
    if previous is not None and not (previous.get("status") == "running"
                                     and path.stat().st_mtime >= since):
        return
    base = previous if previous is not None else identity(cfg, _planned_world_size(cfg))
    write_json_atomic(path, {**base, "status": "failed", "error": error})


def _planned_world_size(cfg: dict[str, Any]) -> int | None:
    """The world size the parent plans (an external torchrun's WORLD_SIZE included); None where
    the world itself cannot be planned: the error being recorded may be that one."""
    try:
        return plan_job(cfg["world"]).world_size
    except (ConfigError, ValueError, TypeError, OSError, subprocess.SubprocessError):
        return None
