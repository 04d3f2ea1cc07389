"""results.json: one machine-readable summary per run, written by rank 0 (and by run.py on failure)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgtrain.fileio import write_json_atomic
from imgtrain.names import dataset_label
from imgtrain.slurm import job_id

if TYPE_CHECKING:
    from imgtrain.plan import Identity, RunPlan

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
        "throughput_by_size": state.images_per_sec_by_size(),  # {crop px: img/s}
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


def identity(run: RunPlan | Identity) -> dict[str, Any]:
    """What the run is, known before any process starts. mode=predict and export record no
    training settings: they use none (no AMP, batch or lr; one process)."""
    config = run.cfg
    if config.mode in WEIGHTS_ONLY:
        return {"arch": config.model.arch, "device": run.device, "weights": config.model.weights,
                "torch_version": _torch_version(), "overrides": list(run.overrides),
                "mode": config.mode}
    return {
        "arch": config.model.arch,
        "dataset": dataset_label(config.dataset.name, config.dataset.root), "device": run.device,
        "world_size": run.job.world_size, "amp": config.amp.level,
        "torch_version": _torch_version(),
        # train.batch_size even for mode=eval, whose own batch run_results records once it runs
        "global_batch_size": config.train.batch_size, "lr": config.optim.lr,
        "overrides": list(run.overrides), "mode": config.mode,
        **({"slurm_job_id": job_id()} if job_id() else {}),
    }


def as_written(composed: dict[str, Any]) -> dict[str, Any] | None:
    """The identity of a run whose config could not even be identified (an unknown key, a bad
    value for a key of few choices, no such device), from the composed config's values as
    written (optim.lr may be its ${...} rule); None where not even those can be read."""
    try:
        model, mode, device = composed["model"], composed["mode"], composed["device"]["name"]
        if mode in WEIGHTS_ONLY:
            return {"arch": model["arch"], "device": device, "weights": model["weights"],
                    "torch_version": _torch_version(), "overrides": [], "mode": mode}
        # No world_size: the processes are unknown until the job is planned (jobenv.plan_job).
        return {
            "arch": model["arch"], "device": device,
            "dataset": dataset_label(composed["dataset"]["name"], composed["dataset"].get("root")),
            "amp": composed["amp"]["level"], "torch_version": _torch_version(),
            "global_batch_size": composed["train"]["batch_size"], "lr": composed["optim"]["lr"],
            "overrides": [], "mode": mode, **({"slurm_job_id": job_id()} if job_id() else {}),
        }
    except (KeyError, TypeError):
        return None


def _torch_version() -> str:
    # Imported here: the report and the SLURM launcher read results.json without torch.
    import torch
    return torch.__version__


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def record_failure(output_dir: Path, run_identity: dict[str, Any] | None, error: str,
                   since: float) -> None:
    """Mark the run failed, without overwriting results that this invocation did not write.

    A results.json is ours to mark if it is absent, or if it says `running` and was written after
    `since` (this invocation's start). `run_identity` (`identity`, or `as_written` before
    one) is written where there are no results to mark; None: then nothing is written.
    """
    path = output_dir / RESULTS
    previous = read(path)
    if previous is not None and not (previous.get("status") == "running"
                                     and path.stat().st_mtime >= since):
        return
    base = previous if previous is not None else run_identity
    if base is not None:
        write_json_atomic(path, {**base, "status": "failed", "error": error})


def mark_failed(output_dir: Path, error: str) -> None:
    """A requeued SLURM job that failed: its results.json, left `preempted` or `running` by the
    step before, says failed with the error (the checkpoints stay, to resume by hand)."""
    path = output_dir / RESULTS
    previous = read(path)
    if previous is not None and previous.get("status") in ("preempted", "running"):
        write_json_atomic(path, {**previous, "status": "failed", "error": error})
