"""Every option of every config group composes, and the defaults are the seed's recipe."""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_image_folder
from imgtrain import device as devices
from imgtrain.assembly import build_trainer
from imgtrain.errors import ConfigError
from imgtrain.models import build_model
from imgtrain.plan import RunPlan
from imgtrain.resolve import resolve

GROUPS = {group.name: sorted(p.stem for p in group.glob("*.yaml"))
          for group in (REPO / "conf").iterdir() if group.is_dir()}
SHRINK = ["device=cpu", "dataset.image_size=32", "dataset.workers=0", "train.batch_size=4"]


def test_defaults_reproduce_the_seed_recipe(compose) -> None:
    cfg = compose()
    assert cfg.model.arch == "resnet152" and cfg.dataset.name == "imagenet"
    assert cfg.train.batch_size == 256 and cfg.optim.lr == 0.1
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    assert cfg.sched.name == "cosine" and cfg.sched.warmup_epochs == 5
    assert cfg.train.epochs == 140 and cfg.train.seed == 49
    assert cfg.amp.level == "O2" and cfg.amp.loss_scale == "auto"
    eight = compose("world=8p")
    assert eight.world.nproc_per_node == 8 and eight.train.batch_size == 2048
    assert eight.optim.lr == 0.8
    assert compose("sched=step").sched.step_epochs == 30


def _synthetic_size(option_group: str) -> list[str]:
    if option_group == "dataset":
        return []
    return ["dataset=synthetic", "dataset.num_classes=4", "dataset.train_size=8",
            "dataset.val_size=4"]


def _dataset_overrides(option: str, tmp_path: Path, cifar_root: Path) -> list[str]:
    if option == "imagenet":
        root = make_image_folder(tmp_path / "img", num_classes=2, per_class=4, val_per_class=2)
        return [f"dataset.root={root}"]
    if option == "cifar10":
        return [f"dataset.root={cifar_root}"]
    return ["dataset.num_classes=4", "dataset.train_size=8", "dataset.val_size=4"]


def _build_one_step(plan: RunPlan, out: Path) -> None:
    """Build what a worker builds (on the plan's device) and take one optimisation step."""
    trainer = build_trainer(plan, out)
    model, precision = trainer.model, trainer.precision
    images, target = next(iter(trainer.loaders.train))
    assert images.dtype == torch.uint8 and images.shape[-1] == plan.dataset.image_size
    images, target = (t.to(trainer.device.torch_device) for t in (images, target))
    with precision.autocast():
        loss = torch.nn.functional.cross_entropy(model(images.float() / 255).float(), target)
    precision.backward(loss)
    precision.step(trainer.optimizer)
    trainer.scheduler.step()
    assert torch.isfinite(loss)


def _present(device: str) -> bool:
    """Whether this host has the device: every test must pass on GPU and NPU hosts too."""
    if device == "gpu":
        return torch.cuda.is_available()
    if device == "npu":
        try:
            return bool(importlib.util.find_spec("torch_npu")) and \
                devices.resolve_name("npu") == "npu"
        except ConfigError:
            return False
    return True


OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_builds(compose, group: str, option: str, tmp_path: Path,
                                   cifar_root: Path) -> None:
    overrides = [f"{group}={option}", *SHRINK, *_synthetic_size(group)]
    if group != "model":
        overrides += ["model=resnet18"]
    if group not in ("amp", "experiment"):  # float32: a bfloat16 step takes ~1 s on such a CPU
        overrides += ["amp=O0"]
    if group == "dataset":
        overrides += _dataset_overrides(option, tmp_path, cifar_root)
    if group == "world":
        overrides += ["world.nproc_per_node=1"]
    if group == "experiment":
        overrides += ["train.batch_size=4", "model=resnet18"]
    if option in ("resnet152_v2", "resnet152_lowres"):  # ImageFolder recipes: validation sizes
        overrides = [o for o in overrides if not o.startswith("dataset")] + [
            *(["dataset.res_schedule=null"] if option == "resnet152_lowres" else []),
            "dataset.image_size=32", "dataset.workers=0", "dataset.val_resize_size=36",
            "dataset.val_crop_size=32", *_dataset_overrides("imagenet", tmp_path, cifar_root)]
    if group == "device":
        overrides.remove("device=cpu")
    cfg = compose(*overrides)
    if group == "device" and not _present(option):
        with pytest.raises(ConfigError, match=f"device={option}"):
            resolve(cfg, [])
        return
    plan = resolve(cfg, [])
    if group == "model":  # the big ResNets: building and a forward pass are enough, and quick
        with torch.no_grad():
            logits = build_model(option, 4).eval()(torch.rand(1, 3, 32, 32))
        assert logits.shape == (1, 4)
        return
    _build_one_step(plan, tmp_path / "run")


def test_auto_workers_fit_the_dataset_and_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-memory data is made in the training process on the CPU, where the model needs the cores;
    JPEGs, and anything feeding an accelerator, get the process's share of the cores (at most 8)."""
    from imgtrain import data
    monkeypatch.setattr(data, "cpu_cores", lambda: 32)
    assert data.default_workers("synthetic", 1, accelerator=False) == 0
    assert data.default_workers("cifar10", 1, accelerator=False) == 0
    assert data.default_workers("imagenet", 1, accelerator=False) == 8
    assert data.default_workers("synthetic", 8, accelerator=True) == 4
    assert data.default_workers("imagenet", 64, accelerator=True) == 1


@pytest.mark.parametrize("overrides,message", [
    (["model.compile_backend=inductr"], "unknown model.compile_backend 'inductr'; registered: "),
    (["model.compile_mode=fastest"], "unknown model.compile_mode 'fastest'; choose one of "),
    (["model.compile_backend=aot_eager", "model.compile_mode=max-autotune"],
     "model.compile_mode=max-autotune is an inductor setting"),
])
def test_compile_settings_are_checked_before_anything_starts(compose, overrides: list[str],
                                                             message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        resolve(compose("device=cpu", "dataset=synthetic", "model.compile=true", *overrides), [])
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    # The settings matter only to a compiled model.
    resolve(compose("device=cpu", "dataset=synthetic", "model.compile=false", *overrides), [])


def test_the_resolved_config_is_read_only_and_workers_get_the_parents_plan(compose) -> None:
    """Workers read the plan and never change it (#29): the config inside is sealed, and what a
    spawned worker receives (the plan, pickled) is the parent's, sealed too."""
    overrides = ["device=cpu", "dataset=synthetic", "model=resnet18", "train.epochs=3"]
    plan = resolve(compose(*overrides), overrides)
    for section, key, value in ((plan.train, "epochs", 5), (plan.cfg.train, "epochs", 5),
                                (plan.dataset, "image_size", 64), (plan.cfg, "mode", "eval")):
        with pytest.raises(AttributeError, match="read-only"):
            setattr(section, key, value)
    with pytest.raises(AttributeError):
        plan.batches = None  # the plan itself is frozen
    assert plan.train.epochs == 3 and plan.dataset.image_size == 224 and plan.mode == "train"
    received = pickle.loads(pickle.dumps(plan))
    assert received == plan and received.record() == plan.record()
    assert received.overrides == tuple(overrides)
    with pytest.raises(AttributeError, match="read-only"):
        received.train.epochs = 5
