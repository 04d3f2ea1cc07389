"""From the composed config to the run's plan, once, in the parent, before any process starts.

`identify` reads what the run is (the typed config, its device, its processes: what a failure
record names); `resolve` checks the rest (checks.py, and each group's own checks) and derives
every value a run needs into a sealed `RunPlan` (plan.py).
"""
from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imgtrain import checks, device as devices, weights as model_weights
from imgtrain.choices import check_choices
from imgtrain.cli import config_error_line
from imgtrain.config import Config, lr_rule, unknown_key_line, unknown_keys
from imgtrain.data.resolution import active as active_schedule, train_sizes
from imgtrain.data.transforms import val_sizes
from imgtrain.errors import ConfigError
from imgtrain.eval_sweep import sweep_sizes
from imgtrain.jobenv import plan_job
from imgtrain.models import resolve_stem
from imgtrain.optim import head_recipe, resolve_fused
from imgtrain.plan import Amp, Batches, Identity, RunPlan
from imgtrain.precision import resolve_dtype, resolve_loss_scale


def typed(cfg: DictConfig) -> Config:
    """The composed config as the schema's dataclasses, interpolations resolved (optim.lr's
    linear rule among them)."""
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(unknown_key_line(extra[0], added=True))
    try:
        sections = {field.name: OmegaConf.to_object(cfg[field.name]) if field.name != "mode"
                    else cfg.mode for field in dataclasses.fields(Config)}
    except OmegaConfBaseException as exc:  # e.g. optim.lr_base_size=0, or a mistyped ${...}
        raise ConfigError(config_error_line(exc)) from None
    return Config(**sections)


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
    config.model.weights = model_weights.in_run_folder(config.model.weights)
    checks.mode_and_model(config)
    given = model_weights.explicit_keys(list(run.overrides))
    adopted = _adopt_weights(config, given)  # before the checks of what it takes (arch, data)
    config.model.stem = resolve_stem(config.model.stem, config.dataset.name)
    rule = head_recipe(config, given) or run.lr_rule
    info = devices.DeviceInfo(device)
    dtype = resolve_dtype(config.amp.level, str(config.amp.dtype), info)
    scale = resolve_loss_scale(config.amp.level, dtype, config.amp.loss_scale)
    checks.world(config, job, device)
    batches = plan_batches(config, job.world_size)
    checks.train_settings(config)
    num_classes, sample_index = checks.data_for_mode(config, job)
    resize, crop = val_sizes(config.dataset)
    test_sizes = sweep_sizes(config, given)
    resize, crop = test_sizes[0] if test_sizes else (resize, crop)
    sizes = train_sizes(config.dataset, config.train.epochs) if config.mode in TRAINS else ()
    config.seal()
    return RunPlan(
        cfg=config, overrides=run.overrides, device=device, job=job, batches=batches,
        amp=Amp(config.amp.level, dtype, scale), lr_rule=rule,
        channels_last=(device == "gpu" if config.model.channels_last == "auto"
                       else bool(config.model.channels_last)),
        fused_sgd=resolve_fused(config.optim.fused, info, loss_scaled=scale is not None),
        num_classes=num_classes, val_resize_size=resize, val_crop_size=crop,
        adopted=tuple(adopted), sample_index=sample_index, eval_sizes=test_sizes,
        train_sizes=sizes,
        scheduled_sizes=bool(sizes) and active_schedule(config.dataset) is not None)


TRAINS = ("train", "bench_data")  # the modes that read training batches


def _adopt_weights(config: Config, given: set[str]) -> list[str]:
    """mode=eval|predict|export, and training from model.weights (a fine-tune): the checkpoint
    names its model (model_weights.adopt); the lines saying what was taken from it, which the
    worker logs to train.log."""
    if config.mode not in ("eval", "predict", "export") and not (
            config.mode == "train" and config.model.weights):
        return []
    return model_weights.adopt(config, given)


def plan_batches(config: Config, world_size: int) -> Batches:
    """Images per step at each level, the training batch checked to split across the processes
    and micro-steps. mode=eval's batch is its own and it takes no optimizer steps."""
    if config.mode == "eval":
        per_rank = checks.eval_batch(config, world_size) // world_size
        return Batches(per_rank * world_size, 1, per_rank, per_rank, per_rank)
    global_batch, steps = config.train.batch_size, config.train.accumulate_steps
    checks.train_batch(config, world_size)
    per_rank = global_batch // world_size
    micro = per_rank // steps
    val = checks.eval_batch(config, world_size)
    return Batches(global_batch, steps, per_rank, micro, val // world_size if val else micro)
