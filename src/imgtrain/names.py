"""Short, readable names: a run's folder, its TensorBoard trial, and its dataset.

A run folder is `outputs/<date>/<time>_<short name>` (a sweep job's `<sweep>/<job num>_<short
name>`): the experiment, then the few overrides given besides it, values alone where the key is
obvious (`quickstart_lr0.2_bs64`), never more than SHORT_NAME_CHARS. What does not fit is
replaced by a hash of the whole command (`quickstart_lr0.2_+3fa9c1`), so that the points of a
sweep, and two commands, never share a name. The full overrides stay in the run's
`.hydra/overrides.yaml`; folders, sweep points and TensorBoard's run list stay readable.

The name is pasted back into overrides (`hydra.run.dir=...`, `model.weights=.../best.pt`), where
Hydra's grammar reads = , [ ] ( ) { } : and quote marks as syntax (and a shell splits at spaces):
it keeps letters, digits and _ . + @ % - only. Nothing here imports the rest of imgtrain.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import PurePath
from typing import Any, Iterable

SHORT_NAME_CHARS = 50  # with `HH-MM-SS_` in front, a run folder's name stays within 60
_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_.+@%-]")
_VALUE_CHARS = 16  # one value's share of the name (a path or a list is cut)
HASH_CHARS = 6
IMAGE_FOLDER = "imagenet"  # the dataset group whose data is an ImageFolder at dataset.root
# Config groups and keys whose value alone says what it sets (`resnet50`, `O1`, `cifar10`).
VALUE_ONLY = ("experiment", "model", "model.arch", "amp", "amp.level", "dataset", "dataset.name",
              "device", "device.name", "world", "sched", "sched.name", "optim", "mode",
              "dataset.auto_augment")
# Keys a short prefix makes obvious, in the order a name lists them (the usual sweep axes first).
ABBREVIATIONS = {
    "optim.lr": "lr", "train.batch_size": "bs", "train.epochs": "ep", "optim.weight_decay": "wd",
    "optim.lr_base": "lrbase", "optim.momentum": "mom", "dataset.image_size": "px",
    "sched.warmup_epochs": "wu", "train.label_smoothing": "ls", "ema.decay": "ema",
    "train.accumulate_steps": "accum", "train.seed": "seed", "world.nproc_per_node": "np",
    "world.nnodes": "nodes", "dataset.train_size": "ntrain", "dataset.val_size": "nval",
    "train.steps_per_epoch": "steps", "eval.batch_size": "evalbs",
}
# Keys that change how a run runs, not what it computes: left out of its name (they are in its
# record). A sweep over one of them still gets distinct folders from the job numbers.
NOT_IN_THE_NAME = (
    "train.print_freq", "dataset.workers", "train.memory_check", "train.log_images",
    "train.profile", "train.profile_wait", "train.profile_warmup", "train.profile_active",
    "train.profile_rank", "train.checkpoint_every_steps", "train.checkpoint_every_minutes",
    "train.keep_checkpoints", "train.on_checkpoint_error", "train.max_requeues",
    "train.preempt_exit_code", "train.fps_warmup_steps", "world.master_addr", "world.master_port",
    "world.node_rank", "world.start_method", "world.gres", "world.max_restarts",
    "device.cudnn_benchmark", "predict.topk",
)
_JOB = re.compile(r"^\d+_")  # a sweep job's folder: `<job num>_<short name>`
TIME_PREFIX = re.compile(r"^\d\d-\d\d-\d\d_")  # a run folder's `<time>_` before its short name
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".bin", ".ckpt", ".safetensors")
_WEIGHTS_CHARS = 24  # the weights' run's share of an eval, predict or export name


def _key(override: str) -> str:
    """`+key=value` -> `key` (config.override_key, without importing the config)."""
    return override.partition("=")[0].lstrip("+~")


def dataset_label(name: str, root: Any) -> str:
    """The dataset as runs are compared by it: an ImageFolder by its folder's name
    (`imagefolder:digits` for dataset.root=/data/digits), synthetic and cifar10 by theirs."""
    if name != IMAGE_FOLDER or not root:
        return name
    return f"imagefolder:{_folder(root)}"


def _folder(root: Any) -> str:
    path = PurePath(str(root).rstrip("/\\"))
    return path.name or str(root)


def _clean(text: str) -> str:
    return _NOT_IN_A_NAME.sub("-", text.strip("[]()'\" ")).strip("-")


def _value(text: str) -> str:
    value = _clean(text)
    return value if len(value) <= _VALUE_CHARS else value[:_VALUE_CHARS]


def _token(key: str, value: str) -> str:
    """One override as a name token: `optim.lr=0.2` -> `lr0.2`, `model=resnet50` -> `resnet50`,
    `train.clip_grad_norm=1` -> `clip_grad_norm1`, `model.zero_init_residual=true` ->
    `zero_init_residual`."""
    if key in VALUE_ONLY:
        return _value(value)
    prefix = ABBREVIATIONS.get(key, key.rsplit(".", 1)[-1])
    if value.lower() in ("true", "false"):
        return prefix if value.lower() == "true" else f"no{prefix}"
    return f"{prefix}{_value(value)}"


def _order(key: str) -> tuple[int, int, str]:
    """Groups chosen first, then the abbreviated keys in their order, then the rest by key."""
    if key in VALUE_ONLY:
        return (0, VALUE_ONLY.index(key), key)
    if key in ABBREVIATIONS:
        return (1, list(ABBREVIATIONS).index(key), key)
    return (2, 0, key)


def short_name(overrides: Iterable[Any], excluded: Iterable[Any], arch: str, dataset: str,
               root: Any) -> str:
    """A run's name from its command: the experiment (else `<arch>_<dataset>`; mode=eval,
    predict or export: the mode and the weights' run), the dataset's folder when one is given,
    then the other overrides' tokens, within SHORT_NAME_CHARS."""
    overrides, excluded = [str(override) for override in overrides], set(map(str, excluded))
    given = {_key(o): o.partition("=")[2] for o in overrides if not o.startswith("~")}
    named = {key: value for key, value in given.items() if key not in excluded
             and not key.startswith("hydra") and key not in NOT_IN_THE_NAME}
    base = _base(named, given, arch, dataset, root)
    tokens = [_token(key, named[key]) for key in sorted(named, key=_order)]
    name = "_".join(token for token in [*base, *tokens] if token) or "run"
    if len(name) <= SHORT_NAME_CHARS:
        return name
    # Of the command as rundir.py compares commands: paths (and train.resume) aside.
    digest = hashlib.sha1("\n".join(sorted(o for o in overrides if _key(o) not in excluded))
                          .encode()).hexdigest()
    suffix = f"_+{digest[:HASH_CHARS]}"
    kept = name[:SHORT_NAME_CHARS - len(suffix) + 1]
    return kept.rsplit("_", 1)[0] + suffix  # whole tokens only


def _base(named: dict[str, str], given: dict[str, str], arch: str, dataset: str,
          root: Any) -> list[str]:
    """The name's first tokens (taken out of `named`): what the run is before its settings."""
    mode = named.pop("mode", "train")
    experiment = named.pop("experiment", None)
    if mode != "train":
        base = [_value(mode), _weights_label(given.get("model.weights"))]
    else:
        base = [_value(experiment or arch)]
    if not experiment and mode == "train":
        for key in ("model", "model.arch"):  # the base names the arch
            named.pop(key, None)
    chosen = [key for key in ("dataset", "dataset.name") if key in named]
    if (not experiment and mode == "train") or chosen or "dataset.root" in given:
        for key in chosen:
            named.pop(key)
        base.append(_value(_folder(root) if dataset == IMAGE_FOLDER and root else dataset))
    return base


def _weights_label(weights: str | None) -> str:
    """model.weights as a name: the short name of the run it comes from, with the file's name
    when it names one (`quickstart-best`); another file by its name without the suffix."""
    if not weights:
        return ""
    path = PurePath(weights.strip("'\""))
    file = path.suffix in CHECKPOINT_SUFFIXES
    run = path.parent.parent if file and path.parent.name == "checkpoints" else (
        path.parent if path.name == "checkpoints" else None if file else path)
    stem = path.name.split(".", 1)[0] if file else ""
    if run is None or not run.name:
        return _value(stem)
    name = TIME_PREFIX.sub("", run.name)
    return _clean(f"{name[:_WEIGHTS_CHARS]}-{stem}" if stem else name[:_WEIGHTS_CHARS])


def run_label(output_dir: Any) -> str:
    """A run as TensorBoard's HParams (its Trial ID), results.json and the report name it: its
    folder's name (`20-01-02_quickstart_lr0.2`), a sweep job's with its sweep's
    (`20-01-02/0_quickstart_lr0.1`). Short, and distinct between runs of different times."""
    path = PurePath(str(output_dir))
    if _JOB.match(path.name) and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("imgtrain.short_name"):
        OmegaConf.register_new_resolver("imgtrain.short_name", short_name)
