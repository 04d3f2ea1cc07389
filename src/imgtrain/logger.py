"""Rank-0 side effects in one object: console, train.log, TensorBoard and results.json.

Other ranks get `NullLogger`, whose methods do nothing, so training code never asks its rank.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from imgtrain.checkpoint import write_json_atomic

log = logging.getLogger("imgtrain")
HPARAM_METRICS = ("hparams/best_acc1", "hparams/final_acc1", "hparams/final_acc5",
                  "hparams/images_per_sec")


def setup_logging(output_dir: Path | None, is_main: bool) -> None:
    """Console (and train.log) for rank 0; other ranks print only warnings, prefixed by rank."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
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

    def hparams(self, params: dict[str, Any]) -> None:
        """Declare this run's hyperparameters in its own event file (not add_hparams' sub-run)."""
        from torch.utils.tensorboard.summary import hparams
        experiment, start, end = hparams(params, {tag: 0.0 for tag in HPARAM_METRICS})
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)

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

    def hparams(self, params: dict[str, Any]) -> None:
        pass

    def results(self, data: dict[str, Any]) -> None:
        pass
