"""When a checkpoint is written, and a stop signal acted on: the mid-epoch intervals, the steps at
which every rank decides together, each rank's part of a save (its random state), and what a
resume says about settings that changed.

What a checkpoint holds is the Trainer's `state_dict()` / `load_state_dict()` pair (with
train_state.py's TrainState); the files themselves are checkpoint_files.py's.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from imgtrain.checkpoint_files import CheckpointWriter, rng_state, set_rng_state
from imgtrain.device import DeviceInfo
from imgtrain.distributed import World
from imgtrain.errors import Preempted
from imgtrain.preemption import StopSignals

if TYPE_CHECKING:
    from imgtrain.config import TrainConfig
    from imgtrain.plan import RunPlan
    from imgtrain.train_state import TrainState

log = logging.getLogger("imgtrain")


class CheckpointManager:
    """When to save and when to stop, decided alike on every rank; the writer of rank 0's files.

    Ranks exchange flags (a stop signal, rank 0's clock) only at agreed steps: every step on one
    process, else at print points, where the host syncs anyway.
    """

    def __init__(self, train: TrainConfig, folder: Path, *, world: World, device: DeviceInfo,
                 stop_signals: StopSignals, steps_per_epoch: int) -> None:
        self.writer = CheckpointWriter(folder, keep=train.keep_checkpoints,
                                       on_error=train.on_checkpoint_error,
                                       enabled=train.save_checkpoints)
        self.every_steps, self.every_minutes = (train.checkpoint_every_steps,
                                                train.checkpoint_every_minutes)
        self.print_freq, self.steps_per_epoch = train.print_freq, steps_per_epoch
        self.world, self.device, self.stop_signals = world, device, stop_signals

    def save(self, name: str, state_dict: Callable[[list[dict[str, Any]]], dict[str, Any]],
             best: bool = False) -> None:
        """Every rank calls this (the random states are gathered); rank 0 builds the checkpoint
        with `state_dict(every rank's random state)` and writes it as `name`."""
        rng_states = self.world.gather_objects(rng_state(self.device.module()))
        if self.world.is_main:
            self.writer.write(state_dict(rng_states), name, best)
        else:
            self.writer.last_attempt = time.monotonic()

    def restore_rng(self, saved: Any) -> None:
        """This rank's random generators as the checkpoint saved them."""
        states = saved if isinstance(saved, list) else [saved]  # one state: written by rank 0 only
        if self.world.rank < len(states):
            set_rng_state(states[self.world.rank], self.device.module())
        else:  # more processes than the run that saved: this rank's generators start afresh
            log.warning("resume: no saved random state for rank %d (the checkpoint has %d); it "
                        "keeps its fresh seed", self.world.rank, len(states))

    def after_step(self, step: int, state: TrainState, save: Callable[[str], float]) -> float:
        """After the epoch's `step`-th step: `save(name)` a checkpoint when one is due by
        train.checkpoint_every_steps|minutes, or when a stop signal is acted on, then stop
        (Preempted). Returns the seconds the save took."""
        if step >= self.steps_per_epoch:
            return 0.0  # the epoch's end writes its own checkpoint (and acts on a signal)
        due = bool(self.every_steps) and state.global_step % self.every_steps == 0
        agreed = self.world.world_size == 1 or step % self.print_freq == 0
        # Ranks must agree on when to save (the wall clock differs by rank): rank 0's clock decides.
        if self.every_minutes and agreed:
            due = due or self.world.any(
                self.world.is_main and time.monotonic() - self.writer.last_attempt
                >= self.every_minutes * 60, self.device.torch_device)
        stop = agreed and self.stop_requested()
        seconds = save(f"step-{state.global_step}.pt") if due or stop else 0.0
        if stop:
            self.world.barrier()
            raise Preempted(f"at epoch {state.epoch + 1} step {step}; {self.saved_or_not()}")
        return seconds

    def stop_requested(self) -> bool:
        """Whether any rank has a stop signal (a collective: every rank asks)."""
        return self.world.any(self.stop_signals.requested, self.device.torch_device)

    def saved_or_not(self) -> str:
        """What a stop line says of the checkpoint."""
        if not self.writer.enabled:
            return "no checkpoint (train.save_checkpoints=false)"
        if self.writer.last_written or not self.world.is_main:
            return "checkpoint saved"
        return "no checkpoint written now: resuming starts from the last one that was"


def log_resume_changes(old: dict[str, Any], plan: RunPlan) -> None:
    """Say which settings this run changes from the checkpoint's config (`old`, the saved dict,
    as files old and new hold it): this run's apply from here on."""
    optim, saved = plan.optim, old["optim"]
    for key in ("lr", "momentum", "weight_decay"):
        if saved.get(key) != getattr(optim, key):
            log.info("resume: optim.%s changed from %s to %s; using the new value", key,
                     saved.get(key), getattr(optim, key))
    if "lr_rule" not in saved and saved.get("lr") != optim.lr:
        log.warning("warning: this run was made before optim.lr followed the global batch; "
                    "its lr was %s, now %s (set optim.lr=%s to keep it)", saved["lr"],
                    optim.lr, saved["lr"])
    schedule = plan.record()["dataset"]["res_schedule"]
    if old["dataset"].get("res_schedule") != schedule:
        log.info("resume: dataset.res_schedule changed from %s to %s; the epochs from here "
                 "train at its sizes", old["dataset"].get("res_schedule"), schedule)
    if old["train"]["epochs"] != plan.train.epochs:
        log.info("resume: train.epochs changed from %s to %s", old["train"]["epochs"],
                 plan.train.epochs)
