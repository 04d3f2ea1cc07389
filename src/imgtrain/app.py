"""What run.py runs, once, in the parent process: resolve the plan, launch, and say how it ended.

`run` never exits the process: it returns an `Outcome` (the exit code, the lines for stderr, the
value a sweeper maximises), which run.py's command line (cli.py) turns into an exit. So every
way a run can end is testable in-process.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from imgtrain import job_nodes, preemption, records, rundir, slurm
from imgtrain.data import cpu_cores
from imgtrain.data.survey import small_data_warning
from imgtrain.distributed import RENDEZVOUS_TIMEOUT_S, WorkerFailed, launch
from imgtrain.errors import ConfigError, Preempted, one_line
from imgtrain.plan import Launch, RunPlan
from imgtrain.resolve import identify, resolve
from imgtrain.results import (RESULTS, as_written, identity, mark_failed, read as read_results,
                              record_failure)
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
    # A SLURM task whose part of a stopped step is over (it requeued the job, or told node 0 it
    # stopped, which then requeues it): the requeue ends the step at once, and would cut an
    # interpreter's shutdown halfway, its handlers reset (a task `Terminated`, not the preempt
    # code). run.py exits at once after its lines.
    exit_at_once: bool = False


def run(cfg: DictConfig, output_dir: str, overrides: list[str], multirun: bool) -> Outcome:
    """Run one job and say how it ended."""
    started = time.time()
    failure_identity = as_written(OmegaConf.to_container(cfg, resolve=False))
    _console()
    plan: RunPlan | None = None
    early = preemption.startup_signals()
    try:
        with early or contextlib.nullcontext():
            run_identity = identify(cfg, overrides)
            failure_identity = identity(run_identity)
            plan = resolve(run_identity)
            check_directory(plan, output_dir)
            warn_about(plan)
            announce_launch(plan)
            plan = plan.with_launch(Launch(run_dir_reason=rundir.reason(output_dir),
                                           resume_hint=_resume_hint(plan, output_dir, multirun),
                                           requeue_hint=_requeue_hint(plan)))
            _meet_node0(plan, output_dir)
            with early.launching() if early else contextlib.nullcontext(), \
                    rundir.hold(output_dir) if plan.trains else contextlib.nullcontext():
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
            return _ended(plan, output_dir, stopped["status"], stopped["exit_code"])
        if not exc.user_error and _restarted_at_start(output_dir, started):
            again = _requeue_after_failed_start(plan, output_dir, str(exc))
            if again:
                return again
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
        return _ended(plan, output_dir, results["status"], results["exit_code"])  # rank 0's
    job_nodes.report(output_dir, "completed")
    if plan.mode == "export":  # its files are beside the checkpoint: no folder of its own
        records.discard_startup(output_dir, started, keep_error_record=False)
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
    small_data = (small_data_warning(plan.dataset, plan.model.arch, plan.sample_index.get("train"))
                  if plan.trains else None)
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


def _requeue_hint(plan: RunPlan) -> str:
    """A preempted SLURM job requeues itself (app._ended): its stop line says so, not how to
    resume by hand, unless train.max_requeues is spent."""
    job = slurm.job_id()
    if not job or not plan.train.save_checkpoints or \
            slurm.requeue_count() >= plan.train.max_requeues:
        return ""
    return (f"SLURM job {job} requeues itself and resumes from here (restart "
            f"{slurm.requeue_count() + 1}; unless it is being cancelled)")


def _meet_node0(plan: RunPlan, output_dir: str) -> None:
    """In a SLURM job step across nodes: node 0 says that its checks passed and it starts (it
    hosts the store); another node waits for that word, and stops at once with node 0's error
    when node 0 failed at its start."""
    if plan.job.node_rank == 0:
        job_nodes.report(output_dir, "starting")
    elif job_nodes.several_nodes() is not None:
        problem = job_nodes.wait_for_node0(output_dir, RENDEZVOUS_TIMEOUT_S)
        if problem:
            raise ConfigError(problem)


def _restarted_at_start(output_dir: str, started: float) -> bool:
    """A requeued SLURM job that failed before training went on: results.json is still what the
    stopped step left, not rewritten by this one."""
    if slurm.requeue_count() == 0:
        return False
    path = Path(output_dir) / RESULTS
    previous = read_results(path)
    return previous is not None and previous.get("status") in preemption.STOPPED and \
        path.stat().st_mtime < started


def _requeue_after_failed_start(plan: RunPlan | None, output_dir: str,
                                error: str) -> Outcome | None:
    """A requeued job whose workers failed at their start (not a user error: a node that could
    not join, a signal meant for the old step) goes back in the queue, within
    train.max_requeues, instead of leaving a `preempted` run that nobody resumes."""
    if not slurm.first_task():
        job_nodes.report(output_dir, "failed", error)
        return Outcome(1, stderr=(f"error: {error}",), exit_at_once=True)
    job_nodes.wait_for_others(output_dir)  # past its bound, the requeue ends what is left
    requeued = requeue_self(plan.train.max_requeues if plan else 10)
    if requeued and requeued.startswith("requeued"):
        return Outcome(1, stderr=(f"the restarted job failed at its start: {error}",
                                  requeued), exit_at_once=True)
    return None


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
        return _ended(plan, output_dir, status, code)
    records.discard_startup(output_dir, started, keep_error_record=False)
    when = "before training started" if mode == "train" else f"(mode={mode})"
    kept = (Path(output_dir) / "checkpoints" / "last.pt").is_file()  # a resumed run's
    hints = (plan.launch.requeue_hint if status == "preempted" else "",
             plan.launch.resume_hint) if plan else ()
    after = next((hint for hint in hints if hint), "its checkpoint is kept")
    line = f"{status} by {preemption.name(sig)} {when}; " \
        f"{after if kept else 'nothing to resume'} (exit code {code})"
    ended = _ended(plan, output_dir, status, code)
    return replace(ended, stderr=(line, *ended.stderr))


def _ended(plan: RunPlan | None, output_dir: str, status: str, code: int) -> Outcome:
    """A stopped run. A preempted SLURM job goes back in the queue, to run again and resume:
    once every node has said its processes exited (a requeue ends the step on all of them)."""
    if not slurm.first_task():
        job_nodes.report(output_dir, status)
        return Outcome(code, exit_at_once=job_nodes.several_nodes() is not None)
    if status == "preempted":
        lines = []
        missing = job_nodes.wait_for_others(output_dir)
        if missing:
            lines.append(f"warning: node(s) {', '.join(map(str, missing))} did not say they "
                         f"stopped within {job_nodes.STOP_WAIT_S} s; requeueing the job ends them")
        requeued = requeue_self(plan.train.max_requeues if plan else 10)
        return Outcome(code, stderr=(*lines, *([requeued] if requeued else [])),
                       exit_at_once=bool(requeued and requeued.startswith("requeued")))
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
    leaves nothing behind. In a job across nodes the others hear of it (job_nodes); a requeued
    SLURM job's results.json says failed with the error (not the `preempted` of the step before,
    which would promise a restart that never comes)."""
    job_nodes.report(output_dir, "failed", error)
    if not slurm.first_task():  # node 0's task keeps the run's records; its log gets the line
        return Outcome(1, stderr=(f"error: {error}",) if multirun else (), error=error)
    if slurm.requeue_count() > 0:
        mark_failed(Path(output_dir), error)
    if not records.discard_startup(output_dir, started, keep_error_record=multirun):
        _record(identity_, output_dir, error, started)
    return Outcome(1, error=error)
