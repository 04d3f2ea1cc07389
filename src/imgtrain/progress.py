"""What rank 0 shows on the console: progress with ETAs at print points, and run summaries.

On a terminal a live `rich` display shows the epoch's and validation's progress; elsewhere (a log
file, SLURM, CI) each print point is one plain line with the run's ETA. train.log always gets the
plain lines, never the display's control characters. The display is redrawn only at print
points, from numbers the trainer has already brought to the host: it adds no device sync.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

from imgtrain.memory import memory_scalars

log = logging.getLogger("imgtrain")
FILE_ONLY = {"file_only": True}  # `extra` for records the live display already shows


def console_is_live() -> bool:
    """True where stdout is an interactive terminal that can redraw a live display."""
    from rich.console import Console
    console = Console(file=sys.stdout)
    return console.is_terminal and not console.is_dumb_terminal


class ConsoleHandler(logging.Handler):
    """The console's log handler. On a terminal it prints through rich's console, so log lines
    appear above the live display instead of tearing it; records marked FILE_ONLY skip it."""

    def __init__(self) -> None:
        super().__init__()
        self.console = None
        if console_is_live():
            from rich.console import Console
            self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)

    def emit(self, record: logging.LogRecord) -> None:
        if self.console is not None and getattr(record, "file_only", False):
            return
        try:
            message = self.format(record)
            if self.console is None:
                sys.stdout.write(message + "\n")
                sys.stdout.flush()
            else:
                self.console.print(message, markup=False, emoji=False)
        except Exception:  # noqa: BLE001 - logging must never stop training
            self.handleError(record)


def live_console() -> Any:
    """The rich console of the live display, or None when stdout is not a terminal."""
    for handler in log.handlers:
        if isinstance(handler, ConsoleHandler):
            return handler.console
    return None


def duration(seconds: float | None) -> str:
    """0:04:05, or 1d 02:03:04 for runs of days; '?' before the first measurement."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class Eta:
    """Seconds left in the epoch and in the run, from the step time measured at print points.

    The step time is averaged from the epoch's first print point on, which leaves out the first
    window's warm-up (compilation, cold caches, loader start-up). An epoch ends with
    `val_passes` validation passes (two when the EMA's weights are evaluated too), each timed when
    it runs; before the first one, a validation batch (one micro-batch: a step is
    `micro_steps` of them) is guessed at a third of a training micro-step (forward only).
    """

    def __init__(self, epochs: int, steps_per_epoch: int, val_steps: int, val_passes: int = 1,
                 micro_steps: int = 1) -> None:
        self.epochs, self.steps_per_epoch, self.val_steps = epochs, steps_per_epoch, val_steps
        self.val_passes, self.micro_steps = val_passes, micro_steps
        self.seconds_per_step: float | None = None
        self.val_seconds: float | None = None  # the last validation pass's
        self._since: tuple[int, float] | None = None  # (step, time) of the epoch's first print point

    def start_epoch(self) -> None:
        self._since = None

    def measure(self, step: int, window_steps: int, window_seconds: float) -> None:
        now = time.perf_counter()
        if self._since is None or step <= self._since[0]:
            self.seconds_per_step = window_seconds / max(window_steps, 1)
            self._since = (step, now)
        else:
            self.seconds_per_step = (now - self._since[1]) / (step - self._since[0])

    def _val(self) -> float:
        """An epoch's validation: all its passes."""
        if self.val_seconds is not None:
            return self.val_passes * self.val_seconds
        per_batch = (self.seconds_per_step or 0.0) / self.micro_steps / 3
        return self.val_passes * self.val_steps * per_batch

    def epoch_left(self, step: int) -> float | None:
        if self.seconds_per_step is None:
            return None
        return (self.steps_per_epoch - step) * self.seconds_per_step

    def run_left(self, epoch: int, step: int) -> float | None:
        """After `step` steps of `epoch` (0-based): this epoch, its validation, the later epochs."""
        left = self.epoch_left(step)
        if left is None:
            return None
        later = self.epochs - epoch - 1
        return left + self._val() + later * (self.steps_per_epoch * self.seconds_per_step
                                             + self._val())


class Progress:
    """Rank 0's console view of training; `NullProgress` stands in on the other ranks."""

    def __init__(self, epochs: int, steps_per_epoch: int, val_steps: int, device: Any,
                 print_freq: int = 1, val_passes: int = 1, micro_steps: int = 1) -> None:
        self.eta = Eta(epochs, steps_per_epoch, val_steps, val_passes, micro_steps)
        self.print_freq = print_freq
        self.epochs, self.steps_per_epoch, self.val_steps = epochs, steps_per_epoch, val_steps
        self.device = device
        self.console = live_console()
        self._live: Any = None
        self._train_task = self._val_task = None
        self._first_step = self._last_step = 0
        self._last_data_time = self._val_start = 0.0

    @classmethod
    def for_trainer(cls, trainer: Any) -> "Progress":
        if not trainer.world.is_main:
            return NullProgress()
        return cls(trainer.train_cfg["epochs"], trainer.steps_per_epoch, len(trainer.loaders.val),
                   trainer.device, trainer.train_cfg["print_freq"],
                   val_passes=1 if trainer.ema is None else 2,  # the EMA's weights are evaluated too
                   micro_steps=trainer.loaders.accumulate_steps)

    # ---- the live display (terminals only) -----------------------------------------------
    def __enter__(self) -> "Progress":
        if self.console is not None and self._live is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Live,
                                       TextColumn)
            # No auto-refresh thread: the display changes only when the trainer reports.
            self._live = Live(TextColumn("{task.description}"), BarColumn(bar_width=30),
                              MofNCompleteColumn(), TextColumn("{task.fields[text]}"),
                              console=self.console, auto_refresh=False, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _show(self, task: Any, completed: int, text: str) -> None:
        if self._live is not None and task is not None:
            self._live.update(task, completed=completed, text=text)
            self._live.refresh()

    # ---- training ------------------------------------------------------------------------
    def start_epoch(self, epoch: int, first_step: int) -> None:
        self.eta.start_epoch()
        self._first_step, self._last_step, self._last_data_time = first_step, first_step, 0.0
        if self._live is not None:
            self._train_task = self._live.add_task(f"epoch {epoch + 1}/{self.epochs}",
                                                   total=self.steps_per_epoch,
                                                   completed=first_step, text="starting")
            self._live.refresh()

    def train_update(self, epoch: int, step: int, values: dict[str, float], seconds: float,
                     data_time: float) -> dict[str, float]:
        """Show a print point's numbers; return the time/ and memory/ scalars to log with them.

        `seconds` is the window since the last print point; `data_time` the mean seconds per step
        spent waiting for the loader, over this epoch's steps so far.
        """
        window_steps = step - self._last_step
        data_time = data_time * (step - self._first_step)  # the epoch's total so far
        data_percent = 100.0 * (data_time - self._last_data_time) / max(seconds, 1e-9)
        self._last_step, self._last_data_time = step, data_time
        self.eta.measure(step, window_steps, seconds)
        epoch_left, run_left = self.eta.epoch_left(step), self.eta.run_left(epoch, step)
        numbers = (f"loss {values['train/loss']:.4f} acc1 {values['train/acc1']:.2f} "
                   f"img/s {values['train/images_per_sec']:.1f} lr {values['train/lr']:.5f} "
                   f"data {data_percent:.0f}%")
        line = (f"epoch {epoch + 1} [{step}/{self.steps_per_epoch}] {numbers} | "
                f"ETA epoch {duration(epoch_left)} run {duration(run_left)}")
        log.info(line, extra=FILE_ONLY if self._live is not None else None)
        self._show(self._train_task, step, f"{numbers} | ETA {duration(epoch_left)} epoch, "
                                           f"{duration(run_left)} run")
        scalars = {"time/data_loading_percent": data_percent}
        if run_left is not None:
            scalars["time/eta_hours"] = run_left / 3600
        scalars.update(memory_scalars(self.device))
        return scalars

    # ---- validation ----------------------------------------------------------------------
    def start_val(self) -> None:
        self._val_start = time.perf_counter()
        if self._live is not None:
            self._val_task = self._live.add_task("validation", total=self.val_steps,
                                                 text="")
            self._live.refresh()

    def val_update(self, batches: int) -> None:
        """Called after every validation batch (a host counter, no device sync); redrawn about
        ten times a pass, at most every print_freq batches."""
        every = max(1, min(self.print_freq, self.val_steps // 10))
        if self._live is not None and (batches % every == 0 or batches == self.val_steps):
            elapsed = time.perf_counter() - self._val_start
            left = elapsed / max(batches, 1) * (self.val_steps - batches)
            self._show(self._val_task, batches, f"ETA {duration(left)}")

    def end_val(self) -> None:
        self.eta.val_seconds = time.perf_counter() - self._val_start
        if self._live is not None:
            for task in (self._train_task, self._val_task):
                if task is not None:
                    self._live.remove_task(task)
            self._train_task = self._val_task = None
            self._live.refresh()


class NullProgress(Progress):
    """For ranks other than 0: shows nothing, returns no scalars."""

    def __init__(self) -> None:  # noqa: D107 - nothing to show
        self._live = None

    def __enter__(self) -> "NullProgress":
        return self

    def close(self) -> None:
        pass

    def start_epoch(self, epoch: int, first_step: int) -> None:
        pass

    def train_update(self, epoch: int, step: int, values: dict[str, float], seconds: float,
                     data_time: float) -> dict[str, float]:
        return {}

    def start_val(self) -> None:
        pass

    def val_update(self, batches: int) -> None:
        pass

    def end_val(self) -> None:
        pass
