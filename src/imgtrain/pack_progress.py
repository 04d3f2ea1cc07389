"""What `python -m imgtrain.pack` shows while it packs: a rich progress bar on a terminal, plain
lines elsewhere (a log file, a SLURM job), one per finished shard."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from imgtrain.data.shard_format import Manifest
from imgtrain.data.shard_writer import ShardTask
from imgtrain.eta import duration


def _gb(size: float) -> str:
    """Bytes as a person reads them: 1.23 GB, 456.7 MB, 89.0 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{size / 1e3:.1f} kB"


class PackProgress:
    def __init__(self, started: float) -> None:
        from rich.console import Console
        self.console = Console(file=sys.stderr, highlight=False)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.started, self.bar, self.task_id = started, None, None
        self.total_bytes = self.done_bytes = self.resumed_bytes = 0
        self.total_shards = self.done_shards = 0

    def _line(self, text: str) -> None:
        print(f"pack: {text}", file=sys.stderr, flush=True)

    def stage(self, what: str, where: Path) -> None:
        self._line(f"{what} {where}")

    def start(self, tasks: list[ShardTask], done: list[ShardTask]) -> None:
        self.total_shards, self.done_shards = len(tasks), len(done)
        self.total_bytes = sum(task.bytes for task in tasks)
        self.done_bytes = self.resumed_bytes = sum(task.bytes for task in done)
        images = sum(len(task.paths) for task in tasks)
        kept = f"; {len(done)} finished earlier, kept" if done else ""
        self._line(f"{images:,} images into {len(tasks)} shards, {_gb(self.total_bytes)}{kept}")
        if self.live and len(done) < len(tasks):
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)
            self.bar = Progress(TextColumn("packing"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[shards]}"), console=self.console)
            self.task_id = self.bar.add_task("pack", total=self.total_bytes,
                                             completed=self.done_bytes, shards=self._shards())
            self.bar.start()

    def _shards(self) -> str:
        return f"{self.done_shards}/{self.total_shards} shards"

    def finished(self, name: str, samples: int, written: int) -> None:
        self.done_shards += 1
        self.done_bytes += written
        if self.bar is not None:
            self.bar.update(self.task_id, completed=self.done_bytes, shards=self._shards())
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (self.done_bytes - self.resumed_bytes) / elapsed
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0.0
        self._line(f"{name} ({samples:,} images, {_gb(written)}) | {self._shards()}, "
                   f"{_gb(self.done_bytes)} of {_gb(self.total_bytes)}, {_gb(rate)}/s, "
                   f"ETA {duration(left)}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def done(self, out: Path, manifest: Manifest) -> None:
        self.stop()
        counts = ", ".join(f"{split} {len(shards)} shards" for split, shards in
                           manifest.splits.items())
        self._line(f"done in {duration(time.monotonic() - self.started)}: {out} ({counts}, "
                   f"{len(manifest.classes)} classes); train with dataset.format=shards "
                   f"dataset.root={out}")
