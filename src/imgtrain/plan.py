"""The run as resolved once, in the parent: the typed config and every value derived from it.

run.py composes the config with Hydra; `resolve` turns it into a `RunPlan` (checking everything
that can be checked before a process starts, in checks.py) and the plan is what every process
receives. Workers read it and never change it: the config inside is sealed, and a value derived
from the config (world size, batches, AMP, the weights' arch and sizes, validation sizes) is a
field here, computed once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imgtrain import checks, device as devices, weights as model_weights
from imgtrain.config import (AmpConfig, Config, DatasetConfig, EmaConfig, EvalConfig,
                             ExportConfig, ModelConfig, OptimConfig, PredictConfig, SchedConfig,
                             TrainConfig, check_choices, lr_rule, unknown_keys)
from imgtrain.data.transforms import val_sizes
from imgtrain.errors import ConfigError
from imgtrain.jobenv import Job, plan_job
from imgtrain.optim import resolve_fused
from imgtrain.precision import resolve_dtype, resolve_loss_scale



@dataclass(frozen=True)
class Batches:
    """Images per step at each level. mode=eval's batch is its own (eval.batch_size, else
    train.batch_size) and it takes no optimizer steps."""

    global_batch: int      # one optimizer step's images over every process
    accumulate_steps: int  # loader batches (micro-steps) per optimizer step
    per_rank: int          # one optimizer step's images on one process
    micro: int             # one loader batch: what a device holds at once
    val_per_rank: int      # one validation loader batch on one process

    @classmethod
    def plan(cls, cfg: Config, world_size: int) -> "Batches":
        if cfg.mode == "eval":
            per_rank = checks.eval_batch(cfg, world_size) // world_size
            return cls(per_rank * world_size, 1, per_rank, per_rank, per_rank)
        global_batch, steps = cfg.train.batch_size, cfg.train.accumulate_steps
        checks.train_batch(cfg, world_size)
        per_rank = global_batch // world_size
        micro = per_rank // steps
        val = checks.eval_batch(cfg, world_size)
        return cls(global_batch, steps, per_rank, micro, val // world_size if val else micro)

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
    def world_size(self) -> int:
        return self.job.world_size

    @property
    def trains(self) -> bool:
        return self.cfg.mode == "train"

    def with_launch(self, launch: Launch) -> "RunPlan":
        return dataclasses.replace(self, launch=launch)

    def record(self) -> dict[str, Any]:
        """The config as checkpoints and failure records keep it: plain data, with the values
        resolved from it where readers of older files look for them."""
        record = dataclasses.asdict(self.cfg)
        record["overrides"] = list(self.overrides)
        record["optim"]["lr_rule"] = self.lr_rule
        record["device"]["resolved"] = self.device
        record["world"].update(node_rank=self.job.node_rank, master_addr=self.job.master_addr,
                               master_port=self.job.master_port)
        record["dataset"].update(num_classes=self.num_classes,
                                 val_resize_size=self.val_resize_size,
                                 val_crop_size=self.val_crop_size)
        record["eval"]["batch_size"] = (self.batches.global_batch if self.cfg.mode == "eval"
                                        else self.cfg.eval.batch_size)
        return record


def typed(cfg: DictConfig) -> Config:
    """The composed config as the schema's dataclasses, interpolations resolved (optim.lr's
    linear rule among them)."""
    extra = unknown_keys(cfg)
    if extra:
        from imgtrain.config import unknown_key_line
        raise ConfigError(unknown_key_line(extra[0], added=True))
    try:
        sections = {field.name: OmegaConf.to_object(cfg[field.name]) if field.name != "mode"
                    else cfg.mode for field in dataclasses.fields(Config)}
    except OmegaConfBaseException as exc:  # e.g. optim.lr_base_size=0, or a mistyped ${...}
        from imgtrain.cli import config_error_line
        raise ConfigError(config_error_line(exc)) from None
    return Config(**sections)


@dataclass(frozen=True)
class Identity:
    """What the run is, known before its checks: a failure record names it (results.identity)."""

    cfg: Config
    overrides: tuple[str, ...]
    device: str
    job: Job
    lr_rule: str


def identify(cfg: DictConfig, overrides: list[str]) -> Identity:
    """The typed config, its device and its processes; ConfigError where even those are wrong."""
    config = typed(cfg)
    check_choices(config)
    return Identity(cfg=config, overrides=tuple(overrides),
                    device=devices.resolve_name(config.device.name),
                    job=plan_job(config.world), lr_rule=lr_rule(cfg))


def resolve(run: DictConfig | Identity, overrides: list[str] | None = None) -> RunPlan:
    """Check the config and derive every value a run needs, once, before any process starts; a
    mistake raises ConfigError naming it. `run`: the composed config (with the command line's
    `overrides`), or what `identify` made of it."""
    if not isinstance(run, Identity):
        run = identify(run, overrides or [])
    config, device, job = run.cfg, run.device, run.job
    checks.mode_and_model(config)
    info = devices.DeviceInfo(device)
    dtype = resolve_dtype(config.amp.level, str(config.amp.dtype), info)
    scale = resolve_loss_scale(config.amp.level, dtype, config.amp.loss_scale)
    checks.world(config, job, device)
    batches = Batches.plan(config, job.world_size)
    checks.train_settings(config)
    num_classes = checks.data_for_mode(config, job)
    adopted = _adopt_weights(config, run.overrides)
    resize, crop = val_sizes(config.dataset)
    config.seal()
    return RunPlan(
        cfg=config, overrides=run.overrides, device=device, job=job, batches=batches,
        amp=Amp(config.amp.level, dtype, scale), lr_rule=run.lr_rule,
        channels_last=(device == "gpu" if config.model.channels_last == "auto"
                       else bool(config.model.channels_last)),
        fused_sgd=resolve_fused(config.optim.fused, info, loss_scaled=scale is not None),
        num_classes=num_classes, val_resize_size=resize, val_crop_size=crop,
        adopted=tuple(adopted))


def _adopt_weights(config: Config, overrides: tuple[str, ...]) -> list[str]:
    """mode=eval|predict|export: the checkpoint names its model (model_weights.adopt); the lines
    saying what was taken from it, which the worker logs to train.log."""
    if config.mode not in ("eval", "predict", "export"):
        return []
    return model_weights.adopt(config, model_weights.explicit_keys(list(overrides)))
