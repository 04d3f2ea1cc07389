"""Stop signals: the one place that knows them by name.

SIGTERM, SIGUSR1 and SIGUSR2 are a scheduler's notice: SLURM's `--signal` (USR1 by custom),
submitit's default preempt signal (USR2), and the TERM that precedes a kill. SIGINT is Ctrl-C.
Each means the same stop: at a step all ranks agree on, after a checkpoint. What differs is how
the run ends: `preempted` with train.preempt_exit_code, or `interrupted` with 130, as a shell
expects of Ctrl-C. A handler only records the request, so a second signal during the save (or
the same signal sent to the process group and forwarded by the elastic agent) changes nothing.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator

from imgtrain import slurm
from imgtrain.errors import Preempted

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
CTRL_C = signal.SIGINT
STOP_SIGNALS = (*PREEMPT_SIGNALS, CTRL_C)
# What the elastic agent catches and forwards to the workers (then SIGKILL after a grace time);
# SIGHUP and SIGQUIT as torchrun has them.
AGENT_SIGNALS = ",".join(sig.name for sig in (*STOP_SIGNALS, signal.SIGHUP, signal.SIGQUIT))
INTERRUPTED_EXIT_CODE = 128 + CTRL_C  # 130: what a shell reports for Ctrl-C
STOPPED = ("preempted", "interrupted")  # results.json statuses of a run stopped by a signal


def outcome(sig: int | None, preempt_exit_code: int) -> tuple[str, int]:
    """results.json's status and the exit code of a run stopped by `sig` (None: another rank's
    signal, which rank 0 only learnt of when the ranks agreed to stop)."""
    if sig == CTRL_C:
        return "interrupted", INTERRUPTED_EXIT_CODE
    return "preempted", int(preempt_exit_code)


def name(sig: int | None) -> str:
    return signal.Signals(sig).name if sig else "a signal on another rank"


class StopSignals:
    """Within `with`: the stop signals set `received` instead of ending the process. Entering
    again (the Trainer inside the worker that installed it) keeps the outer installation."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}
        self._depth = 0

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _request(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> "StopSignals":
        self._depth += 1
        if self._depth == 1:
            for sig in self.signals:
                if sig == CTRL_C and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # a background job (`cmd &` in a script): Ctrl-C is not for it
                try:
                    self._previous[sig] = signal.signal(sig, self._request)
                except ValueError:  # not the main thread (a launcher's job thread): leave them
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()


class StartupSignals(StopSignals):
    """startup_signals' handlers. Until `launching()`, a signal is recorded, and acted on as
    the launch begins; while launching (the nodes' rendezvous, before torch's agent puts its
    own handlers in place as its ranks start, or a single rank's setup) it ends the launch at
    once, as the agent's own handler would."""

    _launching = False

    def _request(self, signum: int, frame: Any) -> None:
        super()._request(signum, frame)
        if self._launching:
            self._launching = False
            raise Preempted("during start-up", signal=signal.Signals(signum))

    @contextlib.contextmanager
    def launching(self) -> Iterator[None]:
        if self.received:
            raise Preempted("during start-up", signal=self.received)
        self._launching = True
        try:
            yield
        finally:
            self._launching = False


def startup_signals() -> StartupSignals | None:
    """In a SLURM job, from the parent's start until the ranks take over: a scheduler's signal
    stops the run before training (and requeues it), where it would otherwise kill the task
    (USR1's default action under sbatch) or meet submitit's own handler, which requeues from
    task 0 alone while the other nodes run on. None outside SLURM."""
    return StartupSignals(PREEMPT_SIGNALS) if slurm.in_job() else None


def ignore_stop_signals() -> None:
    """For DataLoader worker processes. A scheduler signals every process of a job step and a
    terminal's Ctrl-C the whole foreground group: a loader worker that died of it (USR2's default
    action, or Ctrl-C's KeyboardInterrupt) would fail the training process's next batch."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def restart_count(saved_restarts: int) -> int:
    """Which restart a resumed run is: SLURM's count of its job's requeues when it runs in one
    (the same across a requeued job's steps), else one more than the checkpoint's own count."""
    requeued = slurm.restarts()
    return saved_restarts + 1 if requeued is None else requeued


@contextlib.contextmanager
def agent_signals() -> Iterator[None]:
    """Around an elastic launch, in the agent's process. torch's agent turns each of
    AGENT_SIGNALS into a SignalException, forwards it to the ranks, and leaves its handler in
    place after the launch: a later signal (SLURM ending the job step at a requeue, a second
    scancel) would then raise from wherever the process is, a finaliser's traceback included.
    The handlers from before the launch come back after it (in a SLURM job, startup_signals':
    a late signal is only recorded)."""
    deaf_resource_tracker()
    try:
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread: the agent installs no handlers either
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


def deaf_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with USR1 and USR2 ignored.

    Spawned ranks and loader workers register their semaphores and shared memory with it. It
    ignores SIGINT and SIGTERM itself, but USR1/USR2, which a scheduler sends to every process
    of a job step, would kill it; its successor then gets an unregister for every segment it
    never saw and prints a KeyError traceback for each. An ignored signal stays ignored across
    exec, so the tracker started here keeps ignoring them; the ranks inherit its pipe."""
    from multiprocessing import resource_tracker

    try:
        previous = {sig: signal.signal(sig, signal.SIG_IGN)
                    for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    except ValueError:  # not the main thread: start it as it comes
        previous = {}
    try:
        resource_tracker.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
