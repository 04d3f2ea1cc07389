"""The config's schema: every key with its type and default, as Hydra structured configs.

The YAML groups under conf/ stay the place where recipes set values; this schema makes OmegaConf
check their types (`train.batch_size=abc` is refused with the key's name), and lists the keys that
exist, so that `+key=value` for a key imgtrain does not know is refused instead of ignored.
Keys that take a word or a value (`auto` or a number) are `Any` here: OmegaConf types a key by one
type only. choices.py checks them, and the keys that take one of a few words, once, when the
config is resolved: before any process starts.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


SCHEMA_NAME = "imgtrain_schema"
# The seed's rule: lr 0.1 for every 256 images of the global batch.
LINEAR_LR = "${imgtrain.linear_lr:${optim.lr_base},${train.batch_size},${optim.lr_base_size}}"


class Section:
    """A group of the schema. Sealed once the run is resolved (plan.py): every process reads the
    same values, and a module that wants another value derives it, visibly, instead of changing
    the config under the others."""

    _sealed = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._sealed:
            raise AttributeError(f"the resolved config is read-only; {type(self).__name__}."
                                 f"{name} cannot be set")
        object.__setattr__(self, name, value)

    def seal(self) -> None:
        for value in vars(self).values():
            if isinstance(value, Section):
                value.seal()
        object.__setattr__(self, "_sealed", True)


@dataclass
class TrainConfig(Section):
    epochs: int = 140
    batch_size: int = 256
    steps_per_epoch: Optional[int] = None
    seed: int = 49
    print_freq: int = 10
    fps_warmup_steps: int = 5
    log_images: bool = False  # TensorBoard's train/first_batch grid
    resume: Optional[str] = "auto"
    checkpoint_every_steps: Optional[int] = None
    checkpoint_every_minutes: Optional[float] = None
    keep_checkpoints: Optional[int] = None
    save_checkpoints: bool = True
    on_checkpoint_error: str = "fail"
    preempt_exit_code: int = 143
    max_requeues: int = 10               # a SLURM job requeued more often than this stops
    memory_check: bool = True  # estimate peak memory before training (memory.py)
    profile: bool = False
    profile_wait: int = 1
    profile_warmup: int = 1
    profile_active: int = 3
    profile_rank: int = 0
    label_smoothing: float = 0.0
    accumulate_steps: int = 1            # micro-steps per optimizer step; batch_size stays global
    clip_grad_norm: Optional[float] = None
    # Test hooks (tests/test_distributed.py): rank fault_rank raises at global step fault_at_step,
    # only the first time when fault_once_file is set.
    fault_at_step: Optional[int] = None
    fault_rank: int = 0
    fault_once_file: Optional[str] = None


@dataclass
class OptimConfig(Section):
    name: str = "sgd"
    lr: float = LINEAR_LR  # type: ignore[assignment]  # an interpolation until resolved
    lr_base: float = 0.1
    lr_base_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_weight_decay: Optional[float] = None  # null: optim.weight_decay
    bias_weight_decay: Optional[float] = None  # null: optim.weight_decay
    nesterov: bool = False
    fused: Any = "auto"  # auto | true | false (CHOICES)


@dataclass
class SchedConfig(Section):
    name: str = "cosine"
    warmup_epochs: float = 5
    warmup_start_factor: Optional[float] = None  # null: the seed's ramp, (step + 1) / warm-up steps
    step_epochs: int = 30
    gamma: float = 0.1


@dataclass
class AmpConfig(Section):
    level: str = "O2"
    dtype: str = "auto"
    loss_scale: Any = "auto"  # auto | dynamic | a number (CHOICES)


@dataclass
class DeviceConfig(Section):
    name: str = "auto"
    cudnn_benchmark: bool = True


@dataclass
class WorldConfig(Section):
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None
    max_restarts: int = 0
    start_method: str = "spawn"  # torchrun's --start-method: spawn | fork | forkserver
    gres: Optional[str] = None   # hydra/launcher=slurm: SLURM's name for a node's devices


@dataclass
class ModelConfig(Section):
    arch: str = "resnet152"
    weights: Optional[str] = None
    weights_key: Optional[str] = None
    freeze: str = "none"
    zero_init_residual: bool = False
    channels_last: Any = "auto"  # auto | true | false (CHOICES)
    compile: bool = False
    compile_backend: str = "inductor"  # a torch._dynamo backend: inductor, aot_eager, ...
    compile_mode: Optional[str] = None  # inductor's: default | reduce-overhead | max-autotune ...
    stem: str = "auto"  # auto (cifar for dataset=cifar10, else imagenet) | imagenet | cifar


@dataclass
class ResScheduleConfig(Section):
    """dataset.res_schedule: training sizes ramped over epochs (data/resolution.py); off while
    start, end, start_ramp and end_ramp are all null."""

    start: Optional[int] = None       # px up to and including epoch start_ramp (0-based)
    end: Optional[int] = None         # px from epoch end_ramp on
    start_ramp: Optional[int] = None
    end_ramp: Optional[int] = None
    step: int = 32                    # sizes in the ramp round to a multiple of it


@dataclass
class DatasetConfig(Section):
    """The keys of every dataset option; each option's YAML sets the ones it uses."""

    name: str = "imagenet"
    root: Optional[str] = None
    image_size: int = 224
    num_classes: Optional[int] = None
    workers: Any = "auto"  # auto | a number (CHOICES)
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 4
    reuse_batch_memory: bool = True
    skip_bad_images: bool = False
    download: bool = False
    train_size: int = 12800
    val_size: int = 1000
    noise: float = 1.0
    auto_augment: Optional[str] = None  # ta_wide | ra | augmix
    random_erase: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    val_resize_size: Optional[int] = None  # null: the validation crop / 0.875
    val_crop_size: Optional[int] = None    # null: image_size
    ra_reps: int = 1
    format: str = "folder"  # folder | shards (CHOICES): dataset=imagenet's store
    index_cache: Optional[str] = "auto"  # auto | a folder | null (data/index.py)
    # The training crop and flip, as timm's --hflip, --scale, --ratio (data/transforms.TrainCrop)
    hflip: float = 0.5                     # flip probability (0: never; digits, text)
    scale: Optional[list[float]] = field(default_factory=lambda: [0.08, 1.0])  # null: no crop
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    # Its keys null (or res_schedule=null): image_size every epoch
    res_schedule: Optional[ResScheduleConfig] = field(default_factory=ResScheduleConfig)


@dataclass
class EmaConfig(Section):
    decay: Optional[float] = None  # null: no EMA of the weights
    steps: int = 32


@dataclass
class EvalConfig(Section):
    batch_size: Optional[int] = None  # global; null: train.batch_size's (a micro-step's)
    # mode=eval over several sizes (worker's sweep): crops with resize = crop / crop_ratio, or
    # explicit [resize, crop] pairs
    crop_sizes: list[int] = field(default_factory=list)
    crop_ratio: float = 0.875
    sizes: list[list[int]] = field(default_factory=list)


@dataclass
class PredictConfig(Section):
    # A list, or one path (predict.inputs=cat.jpg, the natural first try); predict.gather reads it.
    inputs: Any = field(default_factory=list)
    topk: int = 5


@dataclass
class ExportConfig(Section):
    format: str = "onnx"
    opset: int = 18
    exporter: str = "auto"
    batch: Any = "dynamic"  # dynamic | a batch size (CHOICES)
    dir: Optional[str] = None  # where model.onnx and classes.json go; null: beside the checkpoint


@dataclass
class Config(Section):
    mode: str = "train"
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def linear_lr(base: float, global_batch: int, base_size: int) -> float:
    return float(base) * int(global_batch) / int(base_size)


def micro_steps(global_batch: int, nproc_per_node: int, nnodes: int, per_device: int) -> int:
    """train.accumulate_steps that keeps `per_device` images per device and micro-step: a recipe's
    global batch on fewer devices (experiment/resnet152_v2.yaml)."""
    return max(1, int(global_batch) // (int(nproc_per_node) * int(nnodes) * int(per_device)))


def register() -> None:
    """Put the schema in Hydra's ConfigStore (conf/config.yaml names it first in its defaults)
    and the resolvers it uses; safe to call more than once."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
    if not OmegaConf.has_resolver("imgtrain.linear_lr"):
        OmegaConf.register_new_resolver("imgtrain.linear_lr", linear_lr)
    if not OmegaConf.has_resolver("imgtrain.micro_steps"):
        OmegaConf.register_new_resolver("imgtrain.micro_steps", micro_steps)


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys in `cfg` that the schema lacks: what `+key=value` added (Hydra lets `+` add any key)."""
    return _extra(OmegaConf.to_container(cfg, resolve=False),
                  OmegaConf.to_container(OmegaConf.structured(Config), resolve=False), "")


def schema_keys() -> list[str]:
    """Every key of the schema, dotted (`optim.lr`, `train.batch_size`, ...)."""
    def walk(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return [prefix.rstrip(".")]
        return [key for name, value in node.items() for key in walk(value, f"{prefix}{name}.")]
    return walk(OmegaConf.to_container(OmegaConf.structured(Config), resolve=False), "")


def unknown_key_line(key: str, added: bool = False) -> str:
    """The error for a key the schema lacks, with the nearest known key where one is close
    (`optim.lrr` -> optim.lr, `train.epoch` -> train.epochs)."""
    close = difflib.get_close_matches(key, schema_keys(), n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else " (added with +)" if added else ""
    return (f"unknown config key {key}{hint}; python run.py --help lists the groups, and conf/ "
            "holds every key")


def _extra(actual: Any, schema: Any, prefix: str) -> list[str]:
    if not isinstance(actual, dict) or not isinstance(schema, dict):
        return []
    found = []
    for key, value in actual.items():
        path = f"{prefix}{key}"
        if key not in schema:
            found.append(path)
        else:
            found.extend(_extra(value, schema[key], path + "."))
    return found


def lr_rule(cfg: DictConfig) -> str:
    """How optim.lr was chosen, for the log: the linear rule, or set explicitly."""
    optim = cfg.optim
    if OmegaConf.is_interpolation(optim, "lr") and "imgtrain.linear_lr" in str(
            optim._get_node("lr")._value()):
        return (f"optim.lr_base {optim.lr_base} x global batch {cfg.train.batch_size} / "
                f"{optim.lr_base_size} (the seed's linear rule; set optim.lr to override)")
    return "set by optim.lr"


def override_key(override: str) -> str:
    """The key a command-line override sets: `train.epochs` of `++train.epochs=3`, `model` of
    `model=resnet18`. The one parser of override keys (rundir, weights, report, hparams use it)."""
    return str(override).partition("=")[0].lstrip("+~")
