"""Rank-0 side effects in one object: console, train.log, TensorBoard and results.json.

Other ranks get `NullLogger`, whose methods do nothing, so training code never asks its rank.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from imgtrain.checkpoint import write_json_atomic
from imgtrain.progress import ConsoleHandler

log = logging.getLogger("imgtrain")
# HParams metrics name tags the run writes anyway: the table shows their last values.
HPARAM_METRICS = ("val/acc1", "val/acc5", "val/loss", "train/images_per_sec")
# The Custom Scalars tab's first screen: throughput and accuracy, whatever the Scalars tab's order.
LAYOUT = {
    "throughput": {
        "images/sec (train)": ["Multiline", [r"^train/images_per_sec$"]],
        "data loading % of step time": ["Multiline", [r"^time/data_loading_percent$"]],
    },
    "accuracy": {
        "Acc@1 (train and val)": ["Multiline", [r"^train/acc1$", r"^val/acc1$"]],
        "Acc@5 (val)": ["Multiline", [r"^val/acc5$"]],
    },
    "loss and time": {
        "loss (train and val)": ["Multiline", [r"^train/loss$", r"^val/loss$"]],
        "hours left": ["Multiline", [r"^time/eta_hours$"]],
    },
}
GRID_IMAGES = 32  # images/train_batch shows at most this many of the first batch


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

    def hparams(self, params: dict[str, Any], first: Iterable[str] = ()) -> None:
        """Declare this run's hyperparameters in its own event file (not add_hparams' sub-run),
        with the metrics pointing at existing tags, and the Custom Scalars layout.

        TensorBoard orders the HParams columns by `differs`, then by name, and shows the first
        few: the `first` keys (the run's overrides) are marked as differing so that they lead.
        """
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams
        experiment, start, end = hparams(params, {tag: 0.0 for tag in HPARAM_METRICS})
        value = experiment.value[0]
        data = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
        leading = set(first)
        for info in data.hparam_infos:
            info.differs = info.name in leading
        value.metadata.plugin_data.content = metadata.create_summary_metadata(
            plugin_data_pb2.HParamsPluginData(experiment=data)).plugin_data.content
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_custom_scalars(LAYOUT)

    def batch_grid(self, images: Any, step: int) -> None:
        """images/train_batch: the first uint8 batch as the loader gives it, after augmentation
        and before the device normalises it, so the colours and crops are the network's input."""
        from torchvision.utils import make_grid
        grid = make_grid(images[:GRID_IMAGES].detach().cpu(), nrow=8, padding=2)
        self.writer.add_image("images/train_batch", grid, step)

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

    def hparams(self, params: dict[str, Any], first: Iterable[str] = ()) -> None:
        pass

    def batch_grid(self, images: Any, step: int) -> None:
        pass

    def results(self, data: dict[str, Any]) -> None:
        pass
