"""model.weights: read weights from imgtrain and other trainers' files, always with weights_only=True.

Layouts understood (the dict each trainer writes):
- imgtrain: `model`, plus `identity` (arch, classes), `class_names` and `config`
- a bare state dict (torchvision's own files)
- the seed / pytorch/examples `checkpoint.pth.tar`: `state_dict` with DDP's `module.` prefix, next to
  `epoch`, `arch`, `best_acc1` (a device tensor) and `optimizer`, and the seed's apex `amp` state
- timm: `state_dict` and `state_dict_ema`, with the run's `args` as an argparse.Namespace
- torchvision's references: `model` and `model_ema` (an AveragedModel: `module.` keys, `n_averaged`)
"""
from __future__ import annotations

import argparse
import io
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgtrain.data.transforms import VAL_SIZE_KEYS
from imgtrain.config import override_key
from imgtrain.errors import ConfigError
from imgtrain.models import STEM_NAMES, resolve_stem, stem_of
from imgtrain.records import recorded_cwd

log = logging.getLogger("imgtrain")
# weights_only=True refuses every class it does not know. argparse.Namespace (timm's and
# torchvision's `args`) only carries plain attribute values, so exactly that class is allowed.
SAFE_CLASSES = [argparse.Namespace]
MODEL_KEYS = {"auto": ("model", "state_dict"), "ema": ("state_dict_ema", "model_ema")}
_PREFIXES = ("module.", "_orig_mod.")  # DDP / AveragedModel, torch.compile
_NOT_WEIGHTS = ("n_averaged",)          # AveragedModel's counter, not a model tensor
# (bottleneck blocks?, blocks per stage) -> torchvision arch
_ARCH_SHAPES = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
                (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101",
                (True, (3, 8, 36, 3)): "resnet152"}


@dataclass
class WeightsFile:
    """A model state dict and what its file says about it."""

    path: Path
    state: dict[str, torch.Tensor]
    key: str | None                    # where in the file the weights were (None: the file itself)
    arch: str | None
    class_names: list[str] | None
    image_size: int | None             # imgtrain checkpoints: the size they were trained at
    val_sizes: dict[str, int] = field(default_factory=dict)  # ... and validated at, where set
    dataset: dict[str, Any] = field(default_factory=dict)    # ... and their run's dataset keys

    @property
    def stem(self) -> str | None:
        """imagenet or cifar, from conv1's kernel (None: not a ResNet imgtrain knows)."""
        return stem_of(self.state)

    @property
    def num_classes(self) -> int | None:
        fc = self.state.get("fc.weight")
        return None if fc is None else int(fc.shape[0])


def read(path: str, weights_key: str | None = None) -> WeightsFile:
    """Load `path` with weights_only=True and pick the model's state dict out of it."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.weights file not found: {file}")
    payload = _load(file)
    if not isinstance(payload, dict) or not payload:
        raise ConfigError(f"model.weights {file} holds no model state dict "
                          f"(it holds a {type(payload).__name__})")
    key = _model_key(payload, weights_key or "auto", file)
    state = _clean(payload if key is None else payload[key], file, key)
    imgtrain = "format_version" in payload and isinstance(payload.get("identity"), dict)
    config = payload.get("config") if imgtrain and isinstance(payload.get("config"), dict) else {}
    names = payload.get("class_names")
    return WeightsFile(
        path=file, state=state, key=key, arch=infer_arch(state) or _stated_arch(payload),
        class_names=list(names) if isinstance(names, (list, tuple)) else None,
        image_size=config.get("dataset", {}).get("image_size"),
        val_sizes={key: config["dataset"][key] for key in VAL_SIZE_KEYS
                   if config.get("dataset", {}).get(key) is not None},
        dataset=dict(config.get("dataset") or {}))


def _load(file: Path) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):  # not a torch.save file at all
            raise ConfigError(f"model.weights {file} is not a PyTorch checkpoint or state dict "
                              f"({type(exc).__name__})") from None
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a {refused.group(1)} object" if refused else "objects"
        keys = ", ".join(peek_keys(file)) or "unknown"
        raise ConfigError(
            f"model.weights {file} cannot be loaded with weights_only=True: it holds {what} that "
            f"only running code could rebuild (keys found: {keys}); re-save just the state "
            "dict, e.g. torch.save(checkpoint['state_dict'], 'weights.pth')") from None
    except Exception as exc:
        raise ConfigError(f"model.weights {file} is not a PyTorch checkpoint or state dict "
                          f"({type(exc).__name__})") from None


class _Stub(dict):
    """Stands in for every class a peeked pickle names: nothing from the file is imported or run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":  # a stubbed function's result
        return _Stub()


class _Peeker(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        return type(f"{module}.{name}", (_Stub,), {})

    def persistent_load(self, pid: Any) -> None:  # tensor storages: not needed for the keys
        return None


def peek_keys(file: Path) -> list[str]:
    """The top-level keys of a torch.save file, read without importing or calling anything."""
    try:
        with zipfile.ZipFile(file) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            payload = _Peeker(io.BytesIO(archive.read(name))).load()
    except Exception:  # not a zip checkpoint or an odd pickle: the keys stay unknown
        return []
    if not isinstance(payload, dict):
        return []
    return [_describe(key, value) for key, value in payload.items()]


def _describe(key: Any, value: Any) -> str:
    """A key, with the class of its value where that class is what weights_only refuses."""
    kind = type(value).__name__
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in SAFE_CLASSES}
    plain = not isinstance(value, _Stub) or type(value) is _Stub or kind in allowed or \
        kind.startswith(("torch.", "collections."))
    return str(key) if plain else f"{key} ({kind})"


def _model_key(payload: dict[str, Any], setting: str, file: Path) -> str | None:
    """Which entry of the file holds the model (None: the file is a bare state dict)."""
    if setting == "auto" and all(torch.is_tensor(v) for v in payload.values()):
        return None
    for key in MODEL_KEYS.get(setting, (setting,)):
        if isinstance(payload.get(key), dict):
            return key
    wanted = " or ".join(repr(k) for k in MODEL_KEYS.get(setting, (setting,)))
    raise ConfigError(f"model.weights {file} has no {wanted} entry with model weights (keys "
                      f"found: {', '.join(map(str, payload))}); set model.weights_key to the key "
                      "that holds them")


def _clean(state: dict[str, Any], file: Path, key: str | None) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and non-weight entries; every value left must be a tensor."""
    cleaned = {}
    for name, value in state.items():
        name = str(name)
        while name.startswith(_PREFIXES):
            name = next(name[len(p):] for p in _PREFIXES if name.startswith(p))
        if name not in _NOT_WEIGHTS:
            cleaned[name] = value
    where = f"{file}" + (f" ['{key}']" if key else "")
    if not cleaned or not all(torch.is_tensor(v) for v in cleaned.values()):
        raise ConfigError(f"model.weights {where} holds no model state dict")
    return cleaned


def infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet whose layout these keys have (None if none does)."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{stage}.")})
                   for stage in range(1, 5))
    return _ARCH_SHAPES.get(("layer1.0.conv3.weight" in state, blocks))


def _stated_arch(payload: dict[str, Any]) -> str | None:
    """The arch a foreign checkpoint names (pytorch/examples' `arch`, timm's `args.model`)."""
    arch = payload.get("arch") or getattr(payload.get("args"), "model", None)
    return arch if isinstance(arch, str) else None


def check_class_names(weights: WeightsFile, dataset_names: list[str] | None) -> None:
    """Evaluating on other classes than the checkpoint's gives a meaningless accuracy: refuse it."""
    theirs = weights.class_names
    if theirs and dataset_names and len(theirs) == len(dataset_names) and \
            list(theirs) != list(dataset_names):
        differ = [f"{a!r} vs {b!r}" for a, b in zip(theirs, dataset_names) if a != b]
        raise ConfigError(f"model.weights {weights.path} was trained on other classes than this "
                          f"dataset's ({len(differ)} of {len(theirs)} differ, e.g. "
                          f"{differ[0]})")


def load_into(model: nn.Module, weights: WeightsFile, arch: str, allow_new_fc: bool) -> None:
    """Copy the weights into `model`; a different class count gets a new fc if `allow_new_fc`."""
    state, expected = dict(weights.state), model.state_dict()
    if weights.arch and weights.arch != arch:
        raise ConfigError(f"model.weights {weights.path} holds {weights.arch} weights, but "
                          f"model.arch is {arch}; use model={weights.arch}")
    stem = stem_of(expected)
    if weights.stem and stem and weights.stem != stem:
        raise ConfigError(f"model.weights {weights.path} holds {arch} weights with the "
                          f"{STEM_NAMES[weights.stem]}, but the model has the {STEM_NAMES[stem]}; "
                          f"use model.stem={weights.stem}")
    fc, theirs, ours = "fc.weight", weights.state.get("fc.weight"), expected["fc.weight"]
    if theirs is not None and theirs.shape != ours.shape:
        if theirs.shape[1] != ours.shape[1]:
            raise ConfigError(f"model.weights {weights.path}: its fc takes {theirs.shape[1]} "
                              f"features, {arch}'s takes {ours.shape[1]}; the arch differs")
        if not allow_new_fc:
            raise ConfigError(f"model.weights {weights.path} was trained for {theirs.shape[0]} "
                              f"classes, but this dataset has {ours.shape[0]}")
        state.pop(fc), state.pop("fc.bias", None)
        log.info("loaded %d-class weights, new %d-class fc", theirs.shape[0], ours.shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.startswith("fc.") and fc not in state)]
    if missing or unexpected:
        raise ConfigError(f"model.weights {weights.path} does not match {arch}: {len(missing)} "
                          f"missing and {len(unexpected)} unexpected keys (e.g. "
                          f"{(missing or unexpected)[0]})")


def explicit_keys(overrides: list[str]) -> set[str]:
    """The config keys (and groups) set on the command line."""
    return {override_key(item) for item in overrides}


def adopt(config: Any, given: set[str]) -> list[str]:
    """mode=eval|predict|export, and a fine-tune (mode=train from model.weights): read
    model.weights and take its arch, stem and image size (unless given on the command line), so
    the checkpoint alone says what model it holds; mode=eval also takes the dataset its run
    validated on. Called once, by resolve.py, before the config is sealed; returns the lines that
    say what was taken."""
    mode, model = config.mode, config.model
    if not model.weights:
        raise ConfigError(f"mode={mode} needs model.weights=<checkpoint or state-dict file>")
    weights = read(model.weights, model.weights_key)
    lines = []
    if weights.arch and weights.arch != model.arch:
        if given & {"model", "model.arch"}:
            raise ConfigError(f"model.weights {weights.path} holds {weights.arch} weights, but "
                              f"model.arch={model.arch} was asked for; drop that override "
                              "to use the checkpoint's arch")
        lines.append(f"using model.arch={weights.arch} from {weights.path.name}")
        model.arch = weights.arch
    if mode == "eval":
        lines += _take_dataset(config, weights, given)
    lines += _take_stem(config, weights, given)
    size = weights.image_size
    # CIFAR-10's images are 32 px whatever the checkpoint was trained at: its size stays.
    if size and size != config.dataset.image_size and "dataset.image_size" not in given and \
            config.dataset.name != "cifar10":
        lines.append(f"using dataset.image_size={size} from {weights.path.name} "
                     "(as it was trained)")
        config.dataset.image_size = size
    return lines + _take_val_sizes(config, weights, given)


def _take_stem(config: Any, weights: WeightsFile, given: set[str]) -> list[str]:
    """The checkpoint's stem, which its conv1 fixes: a stem asked for on the command line that
    differs is refused here, in one line, rather than by a mismatched load in every rank."""
    model = config.model
    if weights.stem is None:
        return []
    wanted = resolve_stem(model.stem, config.dataset.name)
    model.stem = weights.stem
    if weights.stem == wanted:
        return []
    if "model.stem" in given:
        raise ConfigError(f"model.weights {weights.path} holds weights with the "
                          f"{STEM_NAMES[weights.stem]}, but model.stem={wanted} was asked for; "
                          "drop that override to use the checkpoint's stem")
    return [f"using model.stem={weights.stem} from {weights.path.name}"]


def _take_dataset(config: Any, weights: WeightsFile, given: set[str]) -> list[str]:
    """mode=eval of an imgtrain checkpoint without dataset.root (nor dataset=, experiment=): the
    dataset its run trained on, where that was a folder (an ImageFolder tree or CIFAR-10's
    pickles). A root recorded relative to the run's working directory is found from the run's
    record."""
    name, root = weights.dataset.get("name"), weights.dataset.get("root")
    if given & {"dataset", "dataset.root", "experiment"} or not root or \
            name not in ("imagenet", "cifar10"):
        return []
    path = Path(str(root)).expanduser()
    run_dir = weights.path.resolve().parent.parent  # <run>/checkpoints/<file>
    started_in = recorded_cwd(run_dir) if weights.path.parent.name == "checkpoints" else None
    if not path.is_absolute() and started_in is not None:
        path = started_in / path
    if not path.exists():
        raise ConfigError(f"model.weights {weights.path} was trained on dataset.root={root}, "
                          f"which is not at {path}; give dataset.root= (and dataset=) to evaluate")
    config.dataset.name, config.dataset.root = name, str(path)
    return [f"using dataset={name} dataset.root={path} from {weights.path.name}'s run"]


def _take_val_sizes(config: Any, weights: WeightsFile, given: set[str]) -> list[str]:
    """Validate and predict as the checkpoint's run validated, unless the command line sets a
    size itself (then all sizes are its own) or evaluates another dataset than imagenet (whose
    images are not resized)."""
    sizes = {"dataset.image_size", *(f"dataset.{key}" for key in VAL_SIZE_KEYS),
             "eval.crop_sizes", "eval.sizes"}  # a sweep's sizes are its own too
    if not weights.val_sizes or given & sizes or (
            config.mode in ("eval", "train") and config.dataset.name != "imagenet"):
        return []
    for key, value in weights.val_sizes.items():
        setattr(config.dataset, key, value)
    return [f"using {', '.join(f'dataset.{key}={value}' for key, value in weights.val_sizes.items())}"
            f" from {weights.path.name} (as it was validated)"]


def in_run_folder(weights: str | None) -> str | None:
    """model.weights=<an imgtrain run folder> (or its checkpoints/ folder): the run's best.pt,
    else its last.pt; any other value as given."""
    if not weights or not Path(str(weights)).expanduser().is_dir():
        return weights
    folder = Path(str(weights)).expanduser()
    for candidate in (folder / "checkpoints" / "best.pt", folder / "checkpoints" / "last.pt",
                      folder / "best.pt", folder / "last.pt"):
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"model.weights={weights} is a folder without checkpoints/best.pt or "
                      "last.pt: give a run folder or a checkpoint file")
