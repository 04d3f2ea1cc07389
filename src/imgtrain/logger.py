"""Rank-0 side effects in one object: console, train.log, TensorBoard and results.json.

Other ranks get `NullLogger`, whose methods do nothing, so training code never asks its rank.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from imgtrain.fileio import write_json_atomic
from imgtrain.progress import ConsoleHandler

log = logging.getLogger("imgtrain")
# TensorBoard's landing page (Time Series) groups the tags by their first part, in name order
# (digits and "/" first), and opens only the first two groups. So accuracy/ and throughput/ come
# first and open; the rest sort after them, closed: time/, train/ (loss, lr, loss scale, memory),
# val/ (loss). The image grid, when asked for, is train/first_batch, not a group of its own.
# HParams lists the same tags as metrics, in name order, and shows the first five: validation's
# accuracies (Acc@1 first), then images/sec. So training's print-point Acc@1 is train/acc1,
# beside train/loss: named accuracy/train_acc1 it would be HParams' first metric.
LOSS_READABLE_FROM_EPOCH = 2  # val/loss_from_epoch_2: the layout's val loss leaves epoch 1 out
LAYOUT = {
    "accuracy": {
        "Acc@1 (train and val)": ["Multiline", [r"^train/acc1$", r"^accuracy/val_acc1$",
                                                r"^accuracy/val_ema_acc1$"]],
        "Acc@5 (val)": ["Multiline", [r"^accuracy/val_acc5$", r"^accuracy/val_ema_acc5$"]],
    },
    "throughput": {
        "images/sec (train)": ["Multiline", [r"^throughput/images_per_sec$"]],
        "% of step time waiting for data": ["Multiline", [r"^throughput/loader_wait_percent$"]],
    },
    "loss and time": {
        # The first epoch's val loss can be 100x the rest (BatchNorm statistics still settling
        # under a warm-up lr) and would flatten the chart: val/loss has it, this chart not.
        "loss (train, and val from epoch 2)": ["Multiline", [r"^train/loss$",
                                                             r"^val/loss_from_epoch_2$"]],
        "hours left": ["Multiline", [r"^time/eta_hours$"]],
    },
}


def epoch_scalars(epoch: int, train: dict[str, float], val: dict[str, Any]) -> dict[str, float]:
    """The tags written at the end of `epoch` (0-based) from its train and val metrics."""
    values = {"accuracy/val_acc1": val["acc1"], "accuracy/val_acc5": val["acc5"],
              "val/loss": val["loss"], "train/epoch_loss": train["loss"],
              "throughput/epoch_images_per_sec": train["images_per_sec"]}
    if "image_size" in train:  # the epoch's training crop (dataset.res_schedule ramps it)
        values["train/image_size"] = train["image_size"]
    if "ema_acc1" in val:
        values.update({"accuracy/val_ema_acc1": val["ema_acc1"],
                       "accuracy/val_ema_acc5": val["ema_acc5"], "val/ema_loss": val["ema_loss"]})
    if epoch + 1 >= LOSS_READABLE_FROM_EPOCH:
        values["val/loss_from_epoch_2"] = val["loss"]
    return values


def _hparam(value: Any) -> bool | float | str:
    """A value as HParams stores it: a bool, a number, or text (None as `none`)."""
    if isinstance(value, (bool, int, float)):
        return value
    return "none" if value is None else str(value)


GRID_IMAGES = 32  # train/first_batch shows at most this many of the first batch


def setup_logging(output_dir: Path | None, is_main: bool) -> None:
    """Console (and train.log) for rank 0; other ranks print only warnings, prefixed by rank."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = ConsoleHandler() if is_main else logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if is_main and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Opened at the first line: a command that fails before logging leaves the log untouched.
        file = logging.FileHandler(output_dir / "train.log", delay=True)
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file)


def close_logging() -> None:
    """Detach the run's console and train.log handlers: a process that runs several jobs (a
    sweep's launcher, an in-process caller) must not write one run's lines into another's log."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.propagate = True


class RunLogger:
    """What global rank 0 records about a run."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self._writer = None
        self.results_path = output_dir / "results.json"

    @property
    def writer(self) -> Any:
        if self._writer is None:  # imported lazily: TensorBoard is slow to import
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(self.output_dir))
        return self._writer

    def info(self, message: str, *args: Any) -> None:
        log.info(message, *args)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def hparams(self, params: dict[str, Any], trial: str) -> None:
        """Declare this run's hyperparameters in its own event file (not add_hparams' sub-run),
        as the trial `trial` (HParams' Trial ID: without one it shows the run's whole path, cut
        to its date).

        No experiment summary is written: TensorBoard would take the first run's as every run's
        (its columns, which of them differ), hiding the keys of runs started otherwise. Without
        one it gathers the columns of all the runs it shows, marks those whose values differ
        (a sweep's keys) and shows them first; the metrics are the runs' scalar tags.
        """
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
        from torch.utils.tensorboard.summary import hparams

        _, start, end = hparams({key: _hparam(value) for key, value in params.items()}, {})
        plugin_data = start.value[0].metadata.plugin_data  # torch's hparams() takes no trial name
        info = HParamsPluginData.FromString(plugin_data.content)
        info.session_start_info.group_name = trial
        plugin_data.content = info.SerializeToString()
        for summary in (start, end):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_custom_scalars(LAYOUT)

    def batch_grid(self, images: Any, step: int) -> None:
        """train/first_batch (train.log_images): the first uint8 batch as the loader gives it,
        after augmentation and before the device normalises it, so the colours and crops are the
        network's input."""
        from torchvision.utils import make_grid
        grid = make_grid(images[:GRID_IMAGES].detach().cpu(), nrow=8, padding=2)
        self.writer.add_image("train/first_batch", grid, step)

    def results(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.results_path, data)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class NullLogger(RunLogger):
    """For ranks other than 0: every side effect is a no-op."""

    def __init__(self) -> None:  # noqa: D107 - no output directory to hold
        self._writer = None

    def info(self, message: str, *args: Any) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def hparams(self, params: dict[str, Any], trial: str) -> None:
        pass

    def batch_grid(self, images: Any, step: int) -> None:
        pass

    def results(self, data: dict[str, Any]) -> None:
        pass
