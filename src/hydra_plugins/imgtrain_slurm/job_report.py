"""What hydra/launcher=slurm says of each job as it ends, and of the sweep at its end: the job's
id, how it ended, how often SLURM restarted it, its final Acc@1 or its error, and where its log
is; then the results table of the sweep's runs (imgtrain.report's).

A job's run is found by the SLURM job id its results.json records (the same after a requeue).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def run_of(sweep_dir: Path, job_id: str) -> tuple[Path, dict[str, Any]] | None:
    """The run folder and results of SLURM job `job_id` in the sweep, if it wrote any."""
    for path in sorted(sweep_dir.glob("*/results.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if str(results.get("slurm_job_id")) == str(job_id):
            return path.parent, results
    return None


def restarts(job_id: str, results: dict[str, Any] | None) -> str:
    """SLURM's count of the job's requeues (`scontrol`), else the resumed run's own record."""
    from imgtrain import slurm

    count = slurm.job_states([job_id]).get(job_id, {}).get("Restarts")
    if count is None and results:
        count = (results.get("resumed") or {}).get("restart", 0)
    return "?" if count is None else str(count)


def job_line(job_id: str, slurm_state: str, results: dict[str, Any] | None,
             error: str | None, log_path: Any) -> str:
    """`SLURM job 6 completed: restarts 1, final Acc@1 98.400; log .../6_0_log.out`."""
    status = (results or {}).get("status") or slurm_state.lower()
    if error is None and status == "failed":
        error = (results or {}).get("error")
    if error:
        outcome = error if error.startswith("error: ") else f"error: {error}"
    elif results and results.get("final_acc1") is not None:
        outcome = f"final Acc@1 {float(results['final_acc1']):.3f}"
    else:
        outcome = "no Acc@1"
    if error and status in ("completed", "running", "preempted"):
        status = "failed"
    return (f"SLURM job {job_id} {status}: restarts {restarts(job_id, results)}, {outcome}; "
            f"log {log_path}")


def sweep_table(run_dirs: Sequence[Path]) -> str:
    """The results table (imgtrain.report) of the sweep's runs, or '' when none wrote results."""
    from imgtrain import report

    runs = report.load_runs(report.find_results([d / "results.json" for d in run_dirs]))
    if not runs:
        return ""
    header, rows = report.table(runs)
    return report.markdown(header, rows)
