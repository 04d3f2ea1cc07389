"""The run as resolved once, in the parent: the typed config and every value derived from it.

run.py composes the config with Hydra; resolve.py turns it into a `RunPlan` (checking everything
that can be checked before a process starts) and the plan is what every process receives.
Workers read it and never change it: the config inside is sealed, and a value derived from the
config (world size, batches, AMP, the weights' arch and sizes, validation sizes) is a field here,
computed once. This module holds only the plan's shape: every module may read a plan.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from imgtrain.config import (Config, DatasetConfig, EmaConfig, EvalConfig,
                             ExportConfig, ModelConfig, OptimConfig, PredictConfig, SchedConfig,
                             TrainConfig)
from imgtrain.jobenv import Job
from imgtrain.names import dataset_label


@dataclass(frozen=True)
class Batches:
    """Images per step at each level. mode=eval's batch is its own (eval.batch_size, else
    train.batch_size) and it takes no optimizer steps."""

    global_batch: int      # one optimizer step's images over every process
    accumulate_steps: int  # loader batches (micro-steps) per optimizer step
    per_rank: int          # one optimizer step's images on one process
    micro: int             # one loader batch: what a device holds at once
    val_per_rank: int      # one validation loader batch on one process

    def steps_per_epoch(self, loader_batches: int, cap: int | None) -> int:
        """Optimizer steps in an epoch of `loader_batches` micro-batches, capped by
        train.steps_per_epoch if set."""
        steps = loader_batches // self.accumulate_steps
        return min(steps, cap) if cap else steps


@dataclass(frozen=True)
class Amp:
    """amp=O0|O1|O2 resolved for the device: the half dtype (None: fp32) and the loss scale
    (None: no scaler, 'dynamic', or a static scale)."""

    level: str
    dtype: torch.dtype | None
    loss_scale: float | str | None


@dataclass(frozen=True)
class Launch:
    """What the parent decided about this command's run folder, for the workers' summaries."""

    run_dir_reason: str = ""  # the start summary's note on why this folder (rundir.reason)
    resume_hint: str = ""     # a stop line's last words: how to resume
    requeue_hint: str = ""    # ... after a preemption, in a SLURM job that requeues itself


@dataclass(frozen=True)
class RunPlan:
    cfg: Config                      # the composed config, typed and sealed
    overrides: tuple[str, ...]       # the command line's, as Hydra read them
    device: str                      # device.name resolved: npu, gpu or cpu
    job: Job                         # world size and ranks' origin (jobenv.py)
    batches: Batches
    amp: Amp
    lr_rule: str                     # how optim.lr was chosen, for the summary
    channels_last: bool
    fused_sgd: bool
    num_classes: int | None          # None where no dataset is read (predict, export)
    val_resize_size: int             # validation's (and predict's, export's) short side
    val_crop_size: int               # ... and centre crop
    adopted: tuple[str, ...] = ()    # what was taken from model.weights, said in train.log
    launch: Launch = Launch()
    # dataset=imagenet: {split: the folder of its sample index build} (data/index.py), listed
    # once for the job; empty with dataset.index_cache=null (each process lists the tree).
    sample_index: dict[str, str] = field(default_factory=dict)
    # mode=eval's test sizes, (resize, crop) each (eval_sweep.py); () without a sweep. The val
    # sizes above are then the first pair's.
    eval_sizes: tuple[tuple[int, int], ...] = ()
    # Each epoch's training crop (dataset.res_schedule's, else image_size); () where no mode trains
    train_sizes: tuple[int, ...] = ()
    scheduled_sizes: bool = False    # dataset.res_schedule is on (data/resolution.py)

    # The config's groups, read as plan.train.epochs rather than plan.cfg.train.epochs.
    @property
    def mode(self) -> str:
        return self.cfg.mode

    @property
    def train(self) -> TrainConfig:
        return self.cfg.train

    @property
    def optim(self) -> OptimConfig:
        return self.cfg.optim

    @property
    def sched(self) -> SchedConfig:
        return self.cfg.sched

    @property
    def model(self) -> ModelConfig:
        return self.cfg.model

    @property
    def dataset(self) -> DatasetConfig:
        return self.cfg.dataset

    @property
    def ema(self) -> EmaConfig:
        return self.cfg.ema

    @property
    def eval(self) -> EvalConfig:
        return self.cfg.eval

    @property
    def predict(self) -> PredictConfig:
        return self.cfg.predict

    @property
    def export(self) -> ExportConfig:
        return self.cfg.export

    @property
    def dataset_label(self) -> str:
        """The dataset as results, HParams and the report name it (`imagefolder:digits`)."""
        return dataset_label(self.cfg.dataset.name, self.cfg.dataset.root)

    @property
    def world_size(self) -> int:
        return self.job.world_size

    @property
    def trains(self) -> bool:
        return self.cfg.mode == "train"

    def train_size(self, epoch: int) -> int:
        """The training crop of 0-based `epoch`; past train.epochs (mode=bench_data reads on),
        the last epoch's."""
        if not self.train_sizes:
            return int(self.cfg.dataset.image_size)
        return self.train_sizes[min(epoch, len(self.train_sizes) - 1)]

    @property
    def largest_train_size(self) -> int:
        """What memory is planned for: the training step's and the batch pools'."""
        return max(self.train_sizes, default=int(self.cfg.dataset.image_size))

    def with_launch(self, launch: Launch) -> "RunPlan":
        return dataclasses.replace(self, launch=launch)

    def at_val_sizes(self, resize: int, crop: int) -> "RunPlan":
        """This plan validating at another size: one row of eval_sizes."""
        return dataclasses.replace(self, val_resize_size=resize, val_crop_size=crop)

    def record(self) -> dict[str, Any]:
        """The config as checkpoints and failure records keep it: plain data, with the values
        resolved from it where readers of older files look for them."""
        record = dataclasses.asdict(self.cfg)
        record["overrides"] = list(self.overrides)
        record["optim"]["lr_rule"] = self.lr_rule
        record["device"]["resolved"] = self.device
        record["world"].update(node_rank=self.job.node_rank, master_addr=self.job.master_addr,
                               master_port=self.job.master_port)
        # The val sizes stay as set (null: derived): weights.py takes set ones as the run's own.
        record["dataset"]["num_classes"] = self.num_classes
        record["eval"]["batch_size"] = (self.batches.global_batch if self.cfg.mode == "eval"
                                        else self.cfg.eval.batch_size)
        return record


@dataclass(frozen=True)
class Identity:
    """What the run is, known before its checks: a failure record names it (results.identity)."""

    cfg: Config
    overrides: tuple[str, ...]
    device: str
    job: Job
    lr_rule: str
