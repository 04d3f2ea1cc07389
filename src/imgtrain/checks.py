"""What can be wrong with a config, checked once, in the parent, before any process starts.

resolve.py calls these in order while it derives the run's values; each raises ConfigError
with the key and the fix. A check of one group's own keys lives with that group's module
(data/, optim.py, ema.py, models.py); what spans groups, or belongs to no module, is here.
"""
from __future__ import annotations

from imgtrain.config import Config
from imgtrain.data import SPLITS, check_dataset
from imgtrain.data.mixing import check_mixing
from imgtrain.data.resolution import check_res_schedule
from imgtrain.data.transforms import val_sizes
from imgtrain.distributed import check_world
from imgtrain.ema import check_ema
from imgtrain.errors import ConfigError
from imgtrain.jobenv import Job, prepares_shared_files
from imgtrain.models import check_arch, check_compile, check_freeze
from imgtrain.optim import check_schedule
from imgtrain.slurm import requeue_count

MODES = ("train", "eval", "bench_data", "predict", "export")
NO_DATASET = ("predict", "export")  # they read images or nothing, not dataset.root
CHECKPOINT_ERRORS = ("fail", "warn")


def mode_and_model(config: Config) -> None:
    if config.mode not in MODES:
        raise ConfigError(f"unknown mode {config.mode!r}; choose one of {', '.join(MODES)}")
    check_arch(config.model.arch)
    check_freeze(config.model.freeze)
    check_compile(config.model)


def world(config: Config, job: Job, device: str) -> None:
    """The processes: how many, where, and that a training batch splits across them."""
    check_world(job, device, None if config.mode == "eval" else config.train.batch_size)


def train_batch(config: Config, world_size: int) -> None:
    """train.batch_size splits into processes x micro-steps."""
    train = config.train
    if train.accumulate_steps < 1:
        raise ConfigError(f"train.accumulate_steps={train.accumulate_steps} must be at least 1")
    micro_steps = world_size * train.accumulate_steps
    if train.batch_size % micro_steps:
        raise ConfigError(f"train.batch_size={train.batch_size} does not split into "
                          f"{world_size} process(es) x train.accumulate_steps="
                          f"{train.accumulate_steps}; use a multiple of {micro_steps}")


def eval_batch(config: Config, world_size: int) -> int | None:
    """eval.batch_size (global), and mode=eval's batch resolved: eval.batch_size, else
    train.batch_size, never checked against the training set (which mode=eval does not read).
    None: training validates with its micro-step's batch."""
    batch, key = config.eval.batch_size, "eval.batch_size"
    if batch is None:
        if config.mode != "eval":
            return None
        key, batch = "train.batch_size", config.train.batch_size
    if batch < 1 or batch % world_size:
        raise ConfigError(f"{key}={batch} must be a positive multiple of the {world_size} "
                          "process(es)")
    return batch


def train_settings(config: Config) -> None:
    """The training keys no type check catches; the recipe's only where the mode trains."""
    train = config.train
    for key in ("epochs", "print_freq"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(train, key)} must be at least 1")
    if config.mode != "eval":
        recipe(config)
    check_ema(config.ema)  # mode=eval builds the average too
    requeues(config)
    if train.on_checkpoint_error not in CHECKPOINT_ERRORS:
        raise ConfigError("train.on_checkpoint_error must be fail or warn")


def recipe(config: Config) -> None:
    train, optim = config.train, config.optim
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing={train.label_smoothing} must be in [0, 1)")
    if train.clip_grad_norm is not None and not train.clip_grad_norm > 0:
        raise ConfigError(f"train.clip_grad_norm={train.clip_grad_norm} must be positive "
                          "(null: no clipping)")
    for key in ("weight_decay", "norm_weight_decay", "bias_weight_decay"):
        if (getattr(optim, key) or 0.0) < 0:
            raise ConfigError(f"optim.{key}={getattr(optim, key)} must not be negative")
    check_schedule(config.sched)
    check_mixing(config.dataset)
    check_res_schedule(config.dataset, train.epochs)


def requeues(config: Config) -> None:
    """A job that keeps dying would otherwise be requeued by its scheduler for ever."""
    count, limit = requeue_count(), config.train.max_requeues
    if count > limit:
        raise ConfigError(f"this job has been requeued {count} times, more than "
                          f"train.max_requeues={limit}; it stops here (look at train.log for why "
                          "it keeps ending, or raise train.max_requeues)")


def data_for_mode(config: Config, job: Job) -> tuple[int | None, dict[str, str]]:
    """The dataset's files, for the splits the mode reads: its number of classes (None where
    the mode reads no dataset) and its splits' sample indexes (data/index.py), listed by the
    job's one builder (jobenv.prepares_shared_files) while its other processes wait."""
    if config.mode in NO_DATASET:
        if job.world_size > 1:
            raise ConfigError(f"mode={config.mode} runs in one process; drop world=8p")
        val_sizes(config.dataset)  # predict's preprocessing, export's input size
        return None, {}
    return check_dataset(config.dataset, ("val",) if config.mode == "eval" else SPLITS,
                         builds_index=prepares_shared_files(job))
