"""How long a run has left: the ETAs the console shows and TensorBoard's time/eta_hours."""
from __future__ import annotations

import time


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
    window's warm-up (compilation, cold caches, loader start-up). An epoch ends with one
    validation pass, timed when it runs, in which `val_models` models see each batch (two when
    the EMA's weights are evaluated too); before the first one, a validation batch is guessed
    from its images: a third of the time a training step takes for as many (forward only), for
    each model. `val_batch_share` is a validation batch's images over a training step's
    (1 / train.accumulate_steps, unless eval.batch_size).
    """

    def __init__(self, epochs: int, steps_per_epoch: int, val_steps: int, val_models: int = 1,
                 val_batch_share: float = 1.0) -> None:
        self.epochs, self.steps_per_epoch, self.val_steps = epochs, steps_per_epoch, val_steps
        self.val_models, self.val_batch_share = val_models, val_batch_share
        self.seconds_per_step: float | None = None
        self.val_seconds: float | None = None  # the last validation's
        # (step, time) of the epoch's first print point
        self._since: tuple[int, float] | None = None

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
        """An epoch's validation pass, every model's forward passes in it."""
        if self.val_seconds is not None:
            return self.val_seconds
        per_batch = (self.seconds_per_step or 0.0) * self.val_batch_share / 3
        return self.val_models * self.val_steps * per_batch

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
