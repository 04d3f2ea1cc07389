"""dataset.res_schedule: the training resolution as a function of the epoch alone (progressive
resizing, as FFCV's ImageNet recipes train: low resolution for most epochs, ramped up late).

An epoch e (0-based: the console's epoch e + 1) trains at `start` px up to and including epoch
`start_ramp`, at `end` px from epoch `end_ramp` on, and in between at the straight line from one
to the other rounded to the nearest multiple of `step` (FFCV's `get_resolution`, with its
min_res, max_res, start_ramp, end_ramp and its multiple of 32). The parent derives every
epoch's size once (plan.train_sizes); the sampler hands each item its epoch's size, so loader
workers, persistent or not, need no state and a resume at any step decodes what the
uninterrupted run decoded. Validation keeps its own sizes (dataset.val_resize_size and
val_crop_size, by default from dataset.image_size).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from imgtrain.errors import ConfigError

if TYPE_CHECKING:
    from imgtrain.config import DatasetConfig, ResScheduleConfig

KEY = "dataset.res_schedule"
REQUIRED = ("start", "end", "start_ramp", "end_ramp")
EXAMPLE = f"{KEY}={{start:160,end:192,start_ramp:65,end_ramp:76}}"


def active(dataset: DatasetConfig) -> ResScheduleConfig | None:
    """dataset.res_schedule where it is on: null, or all four of its sizes and epochs null, is
    off (the seed's recipe: image_size every epoch)."""
    schedule = dataset.res_schedule
    if schedule is None or all(getattr(schedule, key) is None for key in REQUIRED):
        return None
    return schedule


def size_at(schedule: ResScheduleConfig, epoch: int) -> int:
    """The training size of 0-based `epoch` under a checked schedule."""
    start, end = int(schedule.start), int(schedule.end)
    if epoch <= schedule.start_ramp:
        return start
    if epoch >= schedule.end_ramp:
        return end
    fraction = (epoch - schedule.start_ramp) / (schedule.end_ramp - schedule.start_ramp)
    # round() halves to even, as FFCV's np.round does: the same sizes for the same settings.
    return int(round((start + fraction * (end - start)) / schedule.step)) * int(schedule.step)


def train_sizes(dataset: DatasetConfig, epochs: int) -> tuple[int, ...]:
    """Every epoch's training size: dataset.image_size throughout without a schedule."""
    schedule = active(dataset)
    if schedule is None:
        return (int(dataset.image_size),) * epochs
    return tuple(size_at(schedule, epoch) for epoch in range(epochs))


def check_res_schedule(dataset: DatasetConfig, epochs: int) -> None:
    """A schedule that cannot be meant, refused with the key and the fix."""
    schedule = active(dataset)
    if schedule is None:
        return
    missing = [key for key in REQUIRED if getattr(schedule, key) is None]
    if missing:
        raise ConfigError(f"{KEY} needs {', '.join(missing)} (e.g. {EXAMPLE}; step defaults "
                          "to 32)")
    step = schedule.step
    if step < 1:
        raise ConfigError(f"{KEY}.step={step} must be at least 1 (FFCV rounds to 32)")
    for key in ("start", "end"):
        size = getattr(schedule, key)
        if size < step or size % step:
            raise ConfigError(f"{KEY}.{key}={size} must be a positive multiple of "
                              f"{KEY}.step={step}")
    if schedule.start > schedule.end:
        raise ConfigError(f"{KEY}.start={schedule.start} is larger than end={schedule.end}: "
                          "the schedule ramps the training size up (swap them)")
    if not 0 <= schedule.start_ramp <= schedule.end_ramp:
        raise ConfigError(f"{KEY}.start_ramp={schedule.start_ramp} and end_ramp="
                          f"{schedule.end_ramp} must satisfy 0 <= start_ramp <= end_ramp")
    if schedule.end_ramp > epochs - 1:
        raise ConfigError(f"{KEY}.end_ramp={schedule.end_ramp} is past the last epoch "
                          f"(train.epochs={epochs}: epochs 0 to {epochs - 1}), so training "
                          f"would never reach end={schedule.end} px; lower end_ramp")


def describe(sizes: tuple[int, ...], scheduled: bool) -> str:
    """The start summary's words for the training sizes: `224 px`, or the ramp's epochs."""
    if not scheduled or len(set(sizes)) == 1:
        return f"{sizes[0]} px" if sizes else ""
    runs: list[list[int]] = []  # [size, first epoch, last epoch], 1-based as the console counts
    for epoch, size in enumerate(sizes, start=1):
        if runs and runs[-1][0] == size:
            runs[-1][2] = epoch
        else:
            runs.append([size, epoch, epoch])
    return "train " + ", ".join(
        f"{size} px (epoch {first})" if first == last else f"{size} px (epochs {first}-{last})"
        for size, first, last in runs)
