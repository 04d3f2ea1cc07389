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

from imgtrain.eta import Eta, duration
from imgtrain.memory import memory_scalars
from imgtrain.wrap import wrap_text

log = logging.getLogger("imgtrain")
FILE_ONLY = {"file_only": True}  # `extra` for records the live display already shows


def console_is_live() -> bool:
    """True where stdout is an interactive terminal that can redraw a live display."""
    from rich.console import Console
    console = Console(file=sys.stdout)
    return console.is_terminal and not console.is_dumb_terminal


class ConsoleHandler(logging.Handler):
    """The console's log handler. On a terminal it prints through rich's console, so log lines
    appear above the live display instead of tearing it, each wrapped to the terminal's width as
    it is then, at word and path boundaries (wrap.py); records marked FILE_ONLY skip it."""

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
                self.console.print(wrap_text(message, self.console.width), markup=False,
                                   emoji=False)
        except Exception:  # noqa: BLE001 - logging must never stop training
            self.handleError(record)


def live_console() -> Any:
    """The rich console of the live display, or None when stdout is not a terminal."""
    for handler in log.handlers:
        if isinstance(handler, ConsoleHandler):
            return handler.console
    return None


BAR_WIDTHS = (5, 10, 30)  # the live bar: its least, its least beside optional fields, its most
# What a narrow terminal gives up first goes last: epoch, step, bar, loss and the run's ETA stay.
OPTIONAL_FIELDS = ("acc1", "epoch ETA", "img/s", "data", "lr")


def fit_row(width: int, fixed: int, render: Any) -> tuple[int, str]:
    """The bar's width and the text after it on a live row of `width` columns, `fixed` of which
    the description, the step count and the gaps take. `render(kept)` writes the text with the
    optional fields named in `kept`: they are kept in OPTIONAL_FIELDS' order while they leave the
    bar BAR_WIDTHS[1] columns; what is left widens the bar."""
    room = width - fixed
    kept: set[str] = set()
    for field in OPTIONAL_FIELDS:
        if len(render(kept | {field})) + BAR_WIDTHS[1] > room:
            break
        kept.add(field)
    text = render(kept)
    return max(BAR_WIDTHS[0], min(BAR_WIDTHS[2], room - len(text))), text


class Progress:
    """Rank 0's console view of training; `NullProgress` stands in on the other ranks."""

    def __init__(self, epochs: int, steps_per_epoch: int, val_steps: int, device: Any,
                 print_freq: int = 1, val_models: int = 1, val_batch_share: float = 1.0) -> None:
        self.eta = Eta(epochs, steps_per_epoch, val_steps, val_models, val_batch_share)
        self.print_freq = print_freq
        self.epochs, self.steps_per_epoch, self.val_steps = epochs, steps_per_epoch, val_steps
        self.device = device
        self.console = live_console()
        self._live: Any = None
        self._bar: Any = None
        self._train_task = self._val_task = None
        self._first_step = self._last_step = 0
        self._last_data_time = self._val_start = 0.0

    @classmethod
    def for_trainer(cls, trainer: Any) -> "Progress":
        if not trainer.world.is_main:
            return NullProgress()
        train, val = trainer.plan.train, trainer.loaders.val
        return cls(train.epochs, trainer.steps_per_epoch, len(val), trainer.device,
                   train.print_freq,
                   # The EMA sees each validation batch too, where there is one.
                   val_models=1 if trainer.ema is None else 2,
                   val_batch_share=val.batch_size / trainer.plan.batches.per_rank)

    # ---- the live display (terminals only) -----------------------------------------------
    def __enter__(self) -> "Progress":
        if self.console is not None and self._live is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Live,
                                       TextColumn)
            # No auto-refresh thread: the display changes only when the trainer reports.
            self._bar = BarColumn(bar_width=BAR_WIDTHS[2])
            self._live = Live(TextColumn("{task.description}"), self._bar,
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

    def _show_train(self, epoch: int, step: int, render: Any) -> None:
        """The training row, fitted to the terminal's width as it is now: its description and
        step count (and the validation row's, drawn with the same columns) stay whole."""
        if self._live is None:
            return
        description = max(len(f"epoch {epoch + 1}/{self.epochs}"), len("validation"))
        counts = 2 * len(str(max(self.steps_per_epoch, self.val_steps))) + 1
        # Three gaps between the four columns, and the last column left free: a line that
        # fills the terminal's width makes some terminals wrap.
        self._bar.bar_width, text = fit_row(self.console.width, description + counts + 4, render)
        self._show(self._train_task, step, text)

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
        """Show a print point's numbers; return the scalars to log with them: the wait for data,
        the ETA and memory (as train/memory_*: logger.py says why tags are named so).

        `seconds` is the window since the last print point; `data_time` the mean seconds per step
        spent waiting for the loader, over this epoch's steps so far.
        """
        window_steps = step - self._last_step
        data_time = data_time * (step - self._first_step)  # the epoch's total so far
        data_percent = 100.0 * (data_time - self._last_data_time) / max(seconds, 1e-9)
        self._last_step, self._last_data_time = step, data_time
        self.eta.measure(step, window_steps, seconds)
        epoch_left, run_left = self.eta.epoch_left(step), self.eta.run_left(epoch, step)
        fields = {"acc1": f"acc1 {values['train/acc1']:.2f}",
                  "img/s": f"img/s {values['throughput/images_per_sec']:.1f}",
                  "lr": f"lr {values['train/lr']:.5f}", "data": f"data {data_percent:.0f}%"}

        def numbers(kept: Any) -> str:
            return " ".join([f"loss {values['train/loss']:.4f}"]
                            + [fields[name] for name in ("acc1", "img/s", "lr", "data")
                               if name in kept])

        line = (f"epoch {epoch + 1} [{step}/{self.steps_per_epoch}] {numbers(fields)} | "
                f"ETA epoch {duration(epoch_left)} run {duration(run_left)}")
        log.info(line, extra=FILE_ONLY if self._live is not None else None)
        self._show_train(epoch, step, lambda kept: f"{numbers(kept)} | ETA " + (
            f"{duration(epoch_left)} epoch, " if "epoch ETA" in kept else "")
            + f"{duration(run_left)} run")
        scalars = {"throughput/loader_wait_percent": data_percent}
        if run_left is not None:
            scalars["time/eta_hours"] = run_left / 3600
        scalars.update({f"train/{tag.replace('/', '_')}": value
                        for tag, value in memory_scalars(self.device).items()})
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
