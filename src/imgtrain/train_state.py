"""Where training stands: the epoch and step, the best accuracy, the history, the time spent.
All a checkpoint needs beyond the modules' own state dicts (Trainer.state_dict)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    epoch: int = 0            # the epoch being (or next to be) trained
    step_in_epoch: int = 0    # steps of `epoch` already done
    global_step: int = 0
    best_acc1: float = 0.0
    best_ema_acc1: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    # [first step, micro-batches per step] of each run that trained part of `epoch`: how
    # repeated augmentation dealt those steps' images (data/samplers.py)
    epoch_layout: list[list[int]] = field(default_factory=list)
    timed_images: float = 0.0   # images/sec bookkeeping over the whole run
    timed_seconds: float = 0.0
    train_seconds: float = 0.0
    restarts: int = 0           # how often the run has been resumed (preemption.restart_count)
    # {crop px: [timed images, their seconds]}: throughput per size under dataset.res_schedule
    timed_by_size: dict[str, list[float]] = field(default_factory=dict)

    def saved(self) -> dict[str, Any]:
        """The checkpoint's "state" entry (its keys in the order files have always had)."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "epoch_layout": self.epoch_layout,
                "best_acc1": self.best_acc1, "best_ema_acc1": self.best_ema_acc1,
                "history": self.history, "timed_images": self.timed_images,
                "timed_seconds": self.timed_seconds, "train_seconds": self.train_seconds,
                "restarts": self.restarts, "timed_by_size": self.timed_by_size}

    def add_time(self, timed_images: float, timed_seconds: float, seconds: float,
                 image_size: int | None = None) -> None:
        """An epoch's throughput window (images and seconds) and its whole time; `image_size`:
        the crop it trained at, whose own images/sec it adds to."""
        self.timed_images += timed_images
        self.timed_seconds += timed_seconds
        self.train_seconds += seconds
        if image_size is not None:
            # JSON keys are strings: a resumed state's dict and this one's must agree.
            images, secs = self.timed_by_size.get(str(image_size), (0.0, 0.0))
            self.timed_by_size[str(image_size)] = [images + timed_images, secs + timed_seconds]

    def images_per_sec_by_size(self) -> dict[str, float]:
        """{crop px: training images/sec at that size} over the run so far, smallest first."""
        return {size: images / seconds for size, (images, seconds) in
                sorted(self.timed_by_size.items(), key=lambda item: int(item[0])) if seconds}

    def end_epoch(self, epoch: int, train: dict[str, float], val: dict[str, float]) -> bool:
        """Record the finished `epoch`'s metrics (the EMA's, ema_*, where there is one); return
        whether its model is the best so far."""
        is_best = val["acc1"] > self.best_acc1 or not self.history
        self.best_acc1 = max(self.best_acc1, val["acc1"])
        self.best_ema_acc1 = max(self.best_ema_acc1, val.get("ema_acc1", 0.0))
        self.epoch, self.step_in_epoch = epoch + 1, 0
        ema = {key: val[key] for key in ("ema_acc1", "ema_acc5", "ema_loss") if key in val}
        self.history.append({"epoch": epoch + 1, "acc1": val["acc1"], "acc5": val["acc5"],
                             "loss": val["loss"], "samples": val["samples"],
                             "train_loss": train["loss"],
                             "images_per_sec": train["images_per_sec"],
                             **({"image_size": train["image_size"]} if "image_size" in train
                                else {}), **ema})
        return is_best
