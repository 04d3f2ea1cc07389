"""The command line's presentation: Hydra's and OmegaConf's errors, a failed sweep job's and
Ctrl-C before the run as one line each, with their exit codes. The top floor, for run.py (and app.py
where it words Hydra's errors): it may import any of imgtrain."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Any, Callable, Iterator

from hydra.errors import HydraException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from imgtrain import install
from imgtrain.config import unknown_key_line
from imgtrain.preemption import INTERRUPTED_EXIT_CODE
from imgtrain.rundir import discard_unstarted
from imgtrain.wrap import wrap_text


_HYDRA_DETAIL = ("full_key:", "reference_type=", "object_type=", "Set the environment variable",
                 "To append to your config")


def config_error_line(exc: BaseException) -> str:
    """One line from a Hydra or OmegaConf error about the command line or the config files.

    Their messages span several lines (the failing override, OmegaConf's reason, the key's types,
    a group's options, the search path); the line keeps what names the problem.
    """
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if "not in" in str(cause) and getattr(cause, "full_key", None):
        return unknown_key_line(cause.full_key)
    texts = [str(exc)] + ([str(exc.__cause__)] if exc.__cause__ is not None else [])
    parts: list[str] = []
    options: list[str] = []
    for text in texts:
        for raw in text.split("Config search path")[0].splitlines():
            line = raw.strip()
            if not line or line.startswith(_HYDRA_DETAIL) or line in parts:
                continue
            if raw.startswith("\t"):  # Hydra lists a group's options one per tab-indented line
                options.append(line)
            else:
                parts.append(line.rstrip(":") if line.startswith("Available options") else line)
    if options:
        parts[-1] += ": " + ", ".join(options)
    return "; ".join(parts) or type(exc).__name__


def override_error_line(exc: OverrideParseException, argv: list[str]) -> str:
    """Hydra's parse error ("mismatched input '=' expecting <EOF>") names neither the argument
    nor the fix; the usual cause is a path with = or , in it, such as another tool's run folder."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    reason = str(exc).strip().splitlines()[0]
    parser = OverridesParser.create()
    for argument in (a for a in argv if "=" in a and not a.startswith("-")):
        try:
            parser.parse_overrides([argument])
        except HydraException:
            key = argument.split("=", 1)[0]
            return (f"cannot read the override {argument} ({reason}): a value with = , [ ] ( ) "
                    f"or {{ }} in it needs quotes, as in \"{key}='...'\"")
    return config_error_line(exc)


class _OneLineJobErrors:
    """stderr for a sweep: a failed job's `error: ...` line without Hydra's frame around it.

    Hydra prints "Error executing job with overrides: [...]" before a failed job's exception
    and "Set the environment variable HYDRA_FULL_ERROR=1 ..." after it. For imgtrain's own
    one-line errors (which already name the job) both are dropped; a crash's traceback keeps them.
    """

    _HEADER = "Error executing job with overrides:"
    _HINT = "Set the environment variable HYDRA_FULL_ERROR=1"

    def __init__(self, stream: Any) -> None:
        self.stream, self.pending, self.after_error = stream, "", False

    def write(self, text: str) -> int:
        for line in text.splitlines(keepends=True):
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        if self.after_error and (not line.strip() or line.startswith(self._HINT)):
            return
        self.after_error = False
        if line.startswith(self._HEADER):
            self.pending = line
            return
        if self.pending and line.startswith("error: "):
            self.pending, self.after_error = "", True
        elif self.pending:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.write(line)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def one_line_job_errors() -> Iterator[None]:
    """While run.py runs: a failed sweep job prints one `error:` line."""
    original = sys.stderr
    sys.stderr = _OneLineJobErrors(original)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = original


def stop_line(line: str) -> str:
    """A stop line for stderr: wrapped at word and path boundaries on a terminal (wrap.py),
    whole in a file or a pipe."""
    if not sys.stderr.isatty():
        return line
    return wrap_text(line, shutil.get_terminal_size().columns)


@contextlib.contextmanager
def _ctrl_c_before_the_run() -> Iterator[None]:
    """Ctrl-C while Hydra starts (imports, composing, the run folder): nothing to save yet, so
    one line, exit 130, and no run folder left behind. Once a run trains, preemption.py's
    handlers take Ctrl-C instead."""
    try:
        yield
    except KeyboardInterrupt:
        discard_unstarted()
        sys.stderr.write(stop_line(f"interrupted by SIGINT before training started; nothing to "
                                   f"resume (exit code {INTERRUPTED_EXIT_CODE})") + "\n")
        sys.exit(INTERRUPTED_EXIT_CODE)


def exit_on_install_mismatch() -> None:
    """torch and torchvision (or torch_npu) that do not belong together: one `error:` line naming
    both and the pair to install, and exit 1, before Hydra makes a run folder. Later, the first
    import of torchvision would fail with a traceback (install.py)."""
    problem = install.mismatch()
    if problem:
        sys.stderr.write(f"error: {problem}\n")
        sys.exit(1)


def run_main(main: Callable[[], Any]) -> None:
    """run.py's `main` with Hydra's errors as one `error:` line, and a failed sweep job's too.

    Hydra prints a bad override or config error over several lines: told HYDRA_FULL_ERROR=1, it
    re-raises instead, and the line is made here. A user who set it gets Hydra's full report.
    """
    with one_line_job_errors(), _ctrl_c_before_the_run():
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            main()
            return
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            main()
        except (HydraException, OmegaConfBaseException) as exc:
            message = (override_error_line(exc, sys.argv[1:])
                       if isinstance(exc, OverrideParseException) else config_error_line(exc))
            sys.stderr.write(message if message.startswith("error: ") else f"error: {message}")
            sys.stderr.write("\n")
            sys.exit(1)
