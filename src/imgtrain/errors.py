"""The exception types a user can cause, and the one line each shows. A leaf: it imports nothing
of imgtrain. How the command line presents them (Hydra's messages, Ctrl-C, exit codes): cli.py."""
from __future__ import annotations

from hydra.errors import CompactHydraException


class ConfigError(Exception):
    """Bad input: a config value, a path, a file. Shown as one `error:` line, never a traceback."""


class JobFailed(CompactHydraException):
    """A sweep job failed: Hydra prints just this line, runs the other jobs, then exits non-zero."""


class Preempted(Exception):
    """A stop signal (preemption.py) stopped the run at an agreed step, after a checkpoint.

    The Trainer raises it with where it stopped; the launcher with the signal its elastic agent
    caught (`signal`), when the workers have said where.
    """

    def __init__(self, message: str, signal: int | None = None) -> None:
        super().__init__(message)
        self.signal = signal


def one_line(message: str) -> str:
    """The user-facing line of an error, also when it crossed a process boundary.

    DataLoader workers and elastic agents re-raise a child's error with its whole traceback in the
    message; the last line of that traceback is the child's own `ConfigError: ...` text.
    """
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    last = lines[-1] if len(lines) > 1 else lines[0]
    prefix = "ConfigError: "
    if prefix in last:
        last = last.split(prefix, 1)[1]
    return last
