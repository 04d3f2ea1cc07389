"""What run.py runs, once, in the parent process: resolve the plan, launch, and say how it ended.

`run` never exits the process: it returns an `Outcome` (the exit code, the lines for stderr, the
value a sweeper maximises), which run.py's command line (cli.py) turns into an exit. So every
way a run can end is testable in-process.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from imgtrain import preemption, records, rundir
from imgtrain.data import cpu_cores
from imgtrain.data.survey import small_data_warning
from imgtrain.distributed import WorkerFailed, launch
from imgtrain.errors import ConfigError, Preempted, one_line
from imgtrain.plan import Launch, RunPlan
from imgtrain.resolve import identify, resolve
from imgtrain.results import RESULTS, as_written, identity, read as read_results, record_failure
from imgtrain.slurm import requeue_self

log = logging.getLogger("imgtrain")


@dataclass(frozen=True)
class Outcome:
    """How a command ended: its exit code, the lines it leaves on stderr, and for a sweep the
    job's best Acc@1 (what Optuna maximises) or its one-line error."""

    exit_code: int = 0
    best_acc1: float | None = None
    stderr: tuple[str, ...] = ()
    error: str | None = None       # a user error, as one line without `error: `
    traceback: str = field(default="", repr=False)  # a worker's bug: where it happened


def run(cfg: DictConfig, output_dir: str, overrides: list[str], multirun: bool) -> Outcome:
    """Run one job and say how it ended."""
    started = time.time()
    failure_identity = as_written(OmegaConf.to_container(cfg, resolve=False))
    _console()
    plan: RunPlan | None = None
    try:
        run_identity = identify(cfg, overrides)
        failure_identity = identity(run_identity)
        plan = resolve(run_identity)
        check_directory(plan, output_dir)
        warn_about(plan)
        announce_launch(plan)
        plan = plan.with_launch(Launch(run_dir_reason=rundir.reason(output_dir),
                                       resume_hint=_resume_hint(plan, output_dir, multirun)))
        with rundir.hold(output_dir) if plan.trains else contextlib.nullcontext():
            results = launch(_worker_entry(), plan, output_dir)
    except ConfigError as exc:
        return _fail(failure_identity, output_dir, one_line(str(exc)), started, multirun)
    except Preempted as exc:  # the elastic agent caught the signal; its workers have stopped
        return _stopped(plan, cfg.mode, output_dir, exc.signal, started)
    except KeyboardInterrupt:  # Ctrl-C before a worker's handlers were in place
        return _stopped(plan, cfg.mode, output_dir, preemption.CTRL_C, started)
    except WorkerFailed as exc:
        stopped = _stop_reported(output_dir, started)
        if stopped:  # ranks stopped by a signal the agent did not get (sent to them alone)
            return _ended(plan, stopped["status"], stopped["exit_code"])
        failed = _fail(failure_identity, output_dir, str(exc), started, multirun)
        if not exc.user_error and exc.traceback:  # a bug in a worker: show where
            return Outcome(failed.exit_code, stderr=failed.stderr, error=failed.error,
                           traceback=exc.traceback)
        return failed
    except Exception as exc:  # a bug or a crash: keep its traceback, but record the failure first
        _record(failure_identity, output_dir, f"{type(exc).__name__}: {one_line(str(exc))}",
                started)
        raise
    if results is not None and results.get("status") in preemption.STOPPED:
        return _ended(plan, results["status"], results["exit_code"])  # rank 0 said where
    return Outcome(best_acc1=None if results is None else results.get("best_acc1"))


def check_directory(plan: RunPlan, output_dir: str) -> None:
    """A run directory belongs to the mode that made it: an eval never replaces a training run's
    results.json, nor a training run an eval's."""
    previous = read_results(Path(output_dir) / RESULTS)
    if previous and previous.get("mode", "train") != plan.mode:
        raise ConfigError(f"{output_dir} holds a mode={previous.get('mode', 'train')} run; "
                          f"mode={plan.mode} writes its own results, in a new directory "
                          "(leave hydra.run.dir out)")


def warn_about(plan: RunPlan) -> None:
    """Settings that work but are probably not what was meant."""
    warmup, epochs = plan.sched.warmup_epochs, plan.train.epochs
    if plan.trains and warmup >= epochs:
        log.warning("warning: sched.warmup_epochs=%s is not shorter than train.epochs=%s: the lr "
                    "never reaches optim.lr=%s", warmup, epochs, plan.optim.lr)
    small_data = small_data_warning(plan.dataset, plan.model.arch) if plan.trains else None
    if small_data:
        log.warning("%s", small_data)
    processes, cores = plan.job.nproc_per_node, cpu_cores()
    if plan.device == "cpu" and processes > cores and plan.job.launcher != "torchrun":
        log.warning("warning: %d processes on %d CPU cores are oversubscribed: each imports torch "
                    "and trains on a share of a core, so they start slowly (minutes) and train "
                    "slower than world.nproc_per_node=%d would", processes, cores, cores)


def announce_launch(plan: RunPlan) -> None:
    """Ranks take seconds each to start (each imports torch, then all rendezvous): a line says
    what is starting before that silence."""
    job = plan.job
    if job.launches_ranks:
        node = f" on node {job.node_rank} of {job.nnodes}" if job.nnodes > 1 else ""
        follows = "the start summary" if plan.trains else "rank 0's output"
        log.info("starting %s processes%s (%s); %s follows once all have joined",
                 job.nproc_per_node, node, job.start_method, follows)


def _console() -> None:
    """This process's lines (warn_about's) print as the workers' do, `warning: ...`, not under the
    `[date][HYDRA]` prefix of the root logger that Hydra sets up."""
    if not log.handlers:
        from imgtrain.logger import setup_logging
        setup_logging(None, is_main=True)


def _resume_hint(plan: RunPlan, output_dir: str, multirun: bool) -> str:
    """What a stopped run's last line says: the same command finds its unfinished run
    (rundir.py), except a sweep's, which its folder alone names (with the job's overrides)."""
    if not plan.train.save_checkpoints:
        return "nothing to resume from"
    if multirun:
        return f"to resume this job: python run.py hydra.run.dir={output_dir}"
    return f"to resume, run the same command again (or python run.py hydra.run.dir={output_dir})"


def _stop_reported(output_dir: str, started: float) -> dict[str, Any] | None:
    """results.json as rank 0 left it after a stop in this command, else None."""
    path = Path(output_dir) / RESULTS
    previous = read_results(path)
    if previous and previous.get("status") in preemption.STOPPED and \
            path.stat().st_mtime >= started:
        return previous
    return None


def _stopped(plan: RunPlan | None, mode: str, output_dir: str, sig: int | None,
             started: float) -> Outcome:
    """A stop signal. Rank 0 reports a stop during training; one before it (setup, a mode that
    does not train, or before the plan was made) has nothing to resume, and leaves nothing it
    started."""
    exit_code = plan.train.preempt_exit_code if plan else 143
    status, code = preemption.outcome(sig, exit_code)
    if _stop_reported(output_dir, started):
        return _ended(plan, status, code)
    records.discard_startup(output_dir, started, keep_error_record=False)
    when = "before training started" if mode == "train" else f"(mode={mode})"
    kept = (Path(output_dir) / "checkpoints" / "last.pt").is_file()  # a resumed run's
    after = (plan.launch.resume_hint if plan else "") or "its checkpoint is kept"
    line = f"{status} by {preemption.name(sig)} {when}; " \
        f"{after if kept else 'nothing to resume'} (exit code {code})"
    ended = _ended(plan, status, code)
    return Outcome(code, stderr=(line, *ended.stderr))


def _ended(plan: RunPlan | None, status: str, code: int) -> Outcome:
    """A preempted SLURM job goes back in the queue first, to run again and resume."""
    if status == "preempted":
        requeued = requeue_self(plan.train.max_requeues if plan else 10)
        if requeued:
            return Outcome(code, stderr=(requeued,))
    return Outcome(code)


def _worker_entry() -> Any:
    from imgtrain.worker import worker
    return worker


def _record(identity_: dict[str, Any] | None, output_dir: str, error: str, started: float) -> None:
    try:
        record_failure(Path(output_dir), identity_, error, since=started)
    except (OSError, KeyError, TypeError):
        pass  # never mask the original error with a bookkeeping one


def _fail(identity_: dict[str, Any] | None, output_dir: str, error: str, started: float,
          multirun: bool) -> Outcome:
    """A user error. A sweep job keeps an error record; a single run that changed nothing
    leaves nothing behind."""
    if not records.discard_startup(output_dir, started, keep_error_record=multirun):
        _record(identity_, output_dir, error, started)
    return Outcome(1, error=error)
