"""The one exception type for mistakes a user can fix."""


class ConfigError(Exception):
    """Bad input: a config value, a path, a file. Shown as one `error:` line, never a traceback."""


class Preempted(Exception):
    """A SIGTERM/SIGUSR1 stopped the run after a checkpoint; it exits with train.preempt_exit_code."""


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
