"""The keys that take a word or a value (`auto` or a number), and the keys that take one of a few
words: what each takes, checked once, when the run is resolved (resolve.identify), before any
process starts. OmegaConf types a key by one type only, so the schema gives these `Any` or str.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from imgtrain.config import Config
from imgtrain.errors import ConfigError


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_size(value: Any) -> bool:
    return _is_count(value) and value >= 1


def _is_scale(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


@dataclass(frozen=True)
class Choice:
    """What a key takes: one of `words`, or else a value that `accepts` (described by `value`)."""

    words: tuple[str, ...]
    value: str = ""
    accepts: Optional[Callable[[Any], bool]] = None

    def allows(self, setting: Any) -> bool:
        if isinstance(setting, str) and setting in self.words:
            return True
        return self.accepts is not None and self.accepts(setting)

    def describe(self) -> str:
        options = [*self.words, *([self.value] if self.value else [])]
        return ", ".join(options[:-1]) + " or " + options[-1]


# Every key that takes `auto` (or another word) or a value, with what it takes. A typo there would
# otherwise pass the schema (`Any`, or any str) and be read as something else (`bool("maybe")`) or
# fail deep inside a worker (`int("many")`).
CHOICES: dict[str, Choice] = {
    "optim.fused": Choice(("auto",), "true or false", _is_bool),
    "model.channels_last": Choice(("auto",), "true or false", _is_bool),
    "dataset.workers": Choice(("auto",), "a number of loader processes (0 or more)", _is_count),
    "amp.loss_scale": Choice(("auto", "dynamic"), "a positive number (a static scale)", _is_scale),
    "export.batch": Choice(("dynamic",), "a batch size (1 or more)", _is_size),
    "amp.dtype": Choice(("auto", "float16", "bfloat16")),
    "device.name": Choice(("auto", "npu", "gpu", "cpu")),
    "export.exporter": Choice(("auto", "dynamo", "torchscript")),
    "dataset.format": Choice(("folder", "shards")),
    "model.stem": Choice(("auto", "imagenet", "cifar")),
}


def check_choices(config: Config) -> None:
    """Refuse a value that a key of CHOICES does not take, naming the key and what it takes."""
    for key, choice in CHOICES.items():
        group, name = key.split(".")
        setting = getattr(getattr(config, group), name)
        if not choice.allows(setting):
            shown = {True: "true", False: "false", None: "null"}.get(setting, setting) \
                if isinstance(setting, (bool, type(None))) else setting
            raise ConfigError(f"{key} takes {choice.describe()}, not {shown}")
