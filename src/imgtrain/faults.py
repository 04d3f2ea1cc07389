"""Test-only: a crash at a chosen global step, for the restart and resume tests
(tests/test_distributed.py sets train.fault_at_step, fault_rank and fault_once_file).

The trainer's loop knows nothing of it: where a fault is asked for, the epoch's steps pass
through `InjectedFault.watch` on their way in.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from imgtrain.train_state import TrainState
    from imgtrain.config import TrainConfig


class InjectedFault:
    """This rank raises when it reaches global step `at_step`; with `once_file`, only the first
    time (the file marks that it has)."""

    def __init__(self, at_step: int, rank: int, once_file: str | None) -> None:
        self.at_step, self.rank, self.once_file = at_step, rank, once_file

    def watch(self, steps: Iterator[tuple[int, Any]],
              state: TrainState) -> Iterator[tuple[int, Any]]:
        """`steps` (step in the epoch, its batches) as they come, raising before the step that
        `state.global_step` says is the one."""
        for step, batches in steps:
            if state.global_step == self.at_step:
                self._fail(step)
            yield step, batches

    def _fail(self, step: int) -> None:
        marker = Path(self.once_file) if self.once_file else None
        if marker is not None and marker.exists():
            return
        if marker is not None:
            marker.touch()
        raise RuntimeError(f"injected fault at step {step} on rank {self.rank}")


def injected_fault(train: TrainConfig, rank: int) -> InjectedFault | None:
    """train.fault_at_step's fault where this rank is train.fault_rank, else None (every real
    run)."""
    if train.fault_at_step is None or rank != train.fault_rank:
        return None
    return InjectedFault(train.fault_at_step, rank, train.fault_once_file)
