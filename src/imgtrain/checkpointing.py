"""What a checkpoint holds, and when one is written: the Trainer's state_dict / load_state_dict
pair, mid-epoch checkpoints, stop signals and the divergence check. The Trainer inherits this."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgtrain import checkpoint
from imgtrain.errors import ConfigError, Preempted
from imgtrain.optim import build_scheduler, group_weight_decay, load_optimizer_state
from imgtrain.precision import bare_model

log = logging.getLogger("imgtrain")


@dataclass
class TrainState:
    """Where training stands: all a checkpoint needs beyond the modules' own state dicts."""

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


class Checkpointing:
    """The checkpoint half of the Trainer (its attributes are the Trainer's)."""

    # ---- what a checkpoint holds ----------------------------------------------------------
    def state_dict(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything a resume needs; `rng_states` holds every rank's generators, by rank."""
        s = self.state
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "model": self.precision.full_precision_state(self.model),
            **({"model_ema": self.ema.state_dict()} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "state": {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
                      "global_step": s.global_step, "epoch_layout": s.epoch_layout,
                      "best_acc1": s.best_acc1,
                      "best_ema_acc1": s.best_ema_acc1,
                      "history": s.history, "timed_images": s.timed_images,
                      "timed_seconds": s.timed_seconds, "train_seconds": s.train_seconds,
                      "restarts": s.restarts},
            "identity": {"arch": self.cfg["model"]["arch"],
                         "num_classes": self.loaders.num_classes,
                         "global_batch_size": self.global_batch,
                         "freeze": self.cfg["model"].get("freeze", "none")},
            "class_names": self.loaders.class_names,  # for mode=predict|export
            "rng": rng_states,
            "config": self.cfg,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore a `state_dict()`: weights, optimizer, scale, position and this rank's RNG.

        This run's optim settings and train.epochs apply from here on (a changed lr is logged),
        and the schedule continues at the saved step with them.
        """
        self.precision.load_full_precision_state(self.model, saved["model"])
        load_optimizer_state(self.optimizer, saved["optimizer"])
        self.precision.load_state_dict(saved["precision"])
        self._load_ema(saved.get("model_ema"))
        self.state = TrainState(**saved["state"])
        self._restore_rng(saved["rng"])
        optim, old = self.cfg["optim"], saved["config"]
        for key in ("lr", "momentum", "weight_decay"):
            if old["optim"].get(key) != optim[key]:
                log.info("resume: optim.%s changed from %s to %s; using the new value", key,
                         old["optim"].get(key), optim[key])
        if "lr_rule" not in old["optim"] and old["optim"].get("lr") != optim["lr"]:
            log.warning("warning: this run was made before optim.lr followed the global batch; "
                        "its lr was %s, now %s (set optim.lr=%s to keep it)", old["optim"]["lr"],
                        optim["lr"], old["optim"]["lr"])
        if old["train"]["epochs"] != self.train_cfg["epochs"]:
            log.info("resume: train.epochs changed from %s to %s", old["train"]["epochs"],
                     self.train_cfg["epochs"])
        for group in self.optimizer.param_groups:
            group.update(momentum=optim["momentum"], initial_lr=optim["lr"],
                         weight_decay=group_weight_decay(group.get("kind", "other"), optim))
        self.scheduler = build_scheduler(self.optimizer, self.cfg["sched"],
                                         self.train_cfg["epochs"], self.steps_per_epoch,
                                         start_step=self.state.global_step)

    def _load_ema(self, saved: dict[str, torch.Tensor] | None) -> None:
        if self.ema is not None and saved is not None:
            self.ema.load_state_dict(saved)
        elif self.ema is not None:
            log.info("resume: the checkpoint has no EMA weights; the average starts from the "
                     "resumed weights")
            self.ema.restart()

    def _restore_rng(self, saved: Any) -> None:
        states = saved if isinstance(saved, list) else [saved]  # one state: written by rank 0 only
        if self.world.rank < len(states):
            checkpoint.set_rng_state(states[self.world.rank], self.device.module())
        else:  # more processes than the run that saved: this rank's generators start afresh
            log.warning("resume: no saved random state for rank %d (the checkpoint has %d); it "
                        "keeps its fresh seed", self.world.rank, len(states))

    # ---- checkpoints and preemption -------------------------------------------------------
    def save_checkpoint(self, name: str, best: bool = False) -> float:
        """Every rank calls this (the RNG states are gathered); rank 0 writes. A model whose
        weights are not finite is never written: the run stops as diverged instead.
        Returns the seconds it took."""
        start = time.perf_counter()
        self._sync_buffers()
        self._check_finite(f"step {self.state.global_step}")
        rng_states = self.world.gather_objects(checkpoint.rng_state(self.device.module()))
        if self.world.is_main:
            self.checkpoints.write(self.state_dict(rng_states), name, best)
        else:
            self.checkpoints.last_attempt = time.monotonic()
        return time.perf_counter() - start

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every rank, as DDP gives them at each training forward:
        each rank's last step updated its own copy from its own batch. Then all ranks evaluate,
        and judge finiteness, with the statistics that the checkpoint saves."""
        modules = [bare_model(self.model), *([self.ema.module] if self.ema is not None else [])]
        self.world.broadcast_from_main([b for module in modules for b in module.buffers()
                                        if b.is_floating_point()])

    def _check_finite(self, where: str) -> None:
        """Stop as diverged when a weight or BatchNorm statistic is inf or NaN.

        A step the loss scaler skipped leaves the weights as they were; only a non-finite value
        that reached the weights is divergence. DDP keeps the weights equal on every rank, so
        every rank reaches the same verdict without exchanging it.
        """
        bare = bare_model(self.model)
        named = [*zip((name for name, _ in bare.named_parameters()),
                      self.precision.master_params(self.model)),
                 *((name, b) for name, b in bare.named_buffers() if b.is_floating_point())]
        if torch.stack([t.isfinite().all() for _, t in named]).all():  # one host sync
            return
        name, bad = next((name, t) for name, t in named if not t.isfinite().all())
        kind = "nan" if bad.isnan().any() else "inf"
        raise ConfigError(f"training diverged: {kind} in {name} at {where} "
                          f"(optim.lr={self.cfg['optim']['lr']}); lower the lr or check the data; "
                          "no checkpoint was written from these weights")

    def _maybe_checkpoint_mid_epoch(self, step: int) -> float:
        """Write a mid-epoch checkpoint when one is due, or stop on a signal; the seconds spent."""
        if step >= self.steps_per_epoch:
            return 0.0  # the epoch's end writes its own checkpoint (and acts on a signal)
        every_steps = self.train_cfg["checkpoint_every_steps"]
        every_minutes = self.train_cfg["checkpoint_every_minutes"]
        due = bool(every_steps) and self.state.global_step % every_steps == 0
        agreed = self._agreed_at_boundary(step)
        # Ranks must agree on when to save (the wall clock differs by rank): rank 0's clock decides.
        if every_minutes and agreed:
            due = due or self.world.any(
                self.world.is_main and time.monotonic() - self.checkpoints.last_attempt
                >= every_minutes * 60, self.device.torch_device)
        stop = agreed and self.world.any(self.stop_signals.requested, self.device.torch_device)
        seconds = self.save_checkpoint(f"step-{self.state.global_step}.pt") if due or stop else 0.0
        if stop:
            self.world.barrier()
            raise Preempted(f"at epoch {self.state.epoch + 1} step {step}; "
                            f"{self._saved_or_not()}")
        return seconds

    def _saved_or_not(self) -> str:
        if not self.checkpoints.enabled:
            return "no checkpoint (train.save_checkpoints=false)"
        if self.checkpoints.last_written or not self.world.is_main:
            return "checkpoint saved"
        return "no checkpoint written now: resuming starts from the last one that was"

    def _agreed_at_boundary(self, step: int) -> bool:
        """Steps at which all ranks exchange flags: every step on one process, else at print points."""
        return self.world.world_size == 1 or step % self.train_cfg["print_freq"] == 0

    def _fault_injection(self, step: int) -> None:
        """Test-only: `train.fault_at_step=N` makes rank `train.fault_rank` (0) raise at global
        step N; with `train.fault_once_file=PATH` only the first time (for restart tests)."""
        fault_at = self.train_cfg.get("fault_at_step")
        if fault_at is None or self.state.global_step != fault_at or \
                self.world.rank != (self.train_cfg.get("fault_rank") or 0):
            return
        marker = self.train_cfg.get("fault_once_file")
        if marker and Path(marker).exists():
            return
        if marker:
            Path(marker).touch()
        raise RuntimeError(f"injected fault at step {step} on rank {self.world.rank}")
