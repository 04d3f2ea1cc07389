"""model.weights from other trainers: each file is written the way its trainer writes it, then loaded
with weights_only=True and evaluated on real validation JPEGs."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torchvision

from imgtrain import weights
from imgtrain.data.imagefolder import JpegFolder
from imgtrain.data.transforms import Normalizer
from imgtrain.errors import ConfigError
from imgtrain.models import build_model
from imgtrain.plan import RunPlan
from imgtrain.resolve import resolve

# torchvision 0.29 announces its decoders' deprecation on every call; JpegFolder still uses them.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _model(seed: int, num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    for name, buffer in model.named_buffers():  # BatchNorm statistics as training leaves them
        if "running" in name:
            buffer.uniform_(0.5, 1.5)
    return model.eval()


def _prefixed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What DDP's (and torchvision's AveragedModel's) state_dict keys look like."""
    return {f"module.{k}": v for k, v in model.state_dict().items()}


def _namespace() -> argparse.Namespace:
    return argparse.Namespace(model="resnet18", lr=0.1, epochs=90, sched="cosine", amp=True,
                              mean=(0.485, 0.456, 0.406), data_dir=None)


def seed_pth_tar(model: torch.nn.Module, ema: torch.nn.Module, path: Path) -> None:
    """The seed's / pytorch/examples' save_checkpoint: a DDP model, best_acc1 as a tensor, and the
    seed's apex amp state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": _prefixed(model),
                "best_acc1": torch.tensor(71.5), "optimizer": optimizer.state_dict(),
                "amp": {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 0}}}, path)


def timm_checkpoint(model: torch.nn.Module, ema: torch.nn.Module, path: Path) -> None:
    """timm's CheckpointSaver: state_dict, state_dict_ema, the run's args as a Namespace."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"epoch": 12, "arch": "resnet18", "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "version": 2, "args": _namespace(),
                "amp_scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
                "state_dict_ema": ema.state_dict(), "metric": 71.5}, path)


def torchvision_reference(model: torch.nn.Module, ema: torch.nn.Module, path: Path) -> None:
    """torchvision's references/classification/train.py: model, model_ema (an AveragedModel with
    `module.` keys and `n_averaged`), lr_scheduler, args."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averaged = torch.optim.swa_utils.AveragedModel(ema, use_buffers=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 30)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": 5, "args": _namespace(),
                "model_ema": averaged.state_dict()}, path)


def bare_state_dict(model: torch.nn.Module, ema: torch.nn.Module, path: Path) -> None:
    torch.save(model.state_dict(), path)


def _val_batch(root: Path) -> torch.Tensor:
    val = JpegFolder(str(root), "val", 32, train=False)
    return torch.stack([val[i][0] for i in range(0, len(val), 4)])  # 8 images, 2 a class


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(Normalizer(torch.device("cpu"), False)(images))


@pytest.mark.parametrize("write, key, from_ema", [
    (seed_pth_tar, None, False), (timm_checkpoint, None, False), (timm_checkpoint, "ema", True),
    (torchvision_reference, None, False), (torchvision_reference, "ema", True),
    (bare_state_dict, None, False)])
def test_foreign_checkpoints_load_and_evaluate(write, key: str | None, from_ema: bool,
                                                image_folder: Path, tmp_path: Path) -> None:
    trained, averaged = _model(1), _model(2)
    path = tmp_path / "checkpoint.pth.tar"
    write(trained, averaged, path)
    loaded = weights.read(str(path), key)
    assert loaded.arch == "resnet18" and loaded.num_classes == 4
    model = build_model("resnet18", 4)
    weights.load_into(model, loaded, "resnet18", allow_new_fc=False)
    expected = averaged if from_ema else trained
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    images = _val_batch(image_folder)
    assert torch.equal(_logits(model, images), _logits(expected, images))


class Payload:
    """A class weights_only must refuse: unpickling it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()


def test_unsafe_file_is_refused_naming_the_class_and_keys(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": _model(0).state_dict(), "hook": Payload(marker)}, path)
    with pytest.raises(ConfigError) as info:
        weights.read(str(path))
    message = str(info.value)
    assert "weights_only=True" in message and "test_weights.Payload" in message
    assert "state_dict" in message and "hook" in message  # the keys found
    assert not marker.exists()  # neither the load nor the peek at its keys ran anything


def test_missing_entry_lists_the_keys_found(tmp_path: Path) -> None:
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": _model(0).state_dict(), "epoch": 3}, path)
    with pytest.raises(ConfigError, match=r"no 'state_dict_ema' or 'model_ema'.*state_dict, epoch"):
        weights.read(str(path), "ema")


def test_eval_modes_take_arch_and_size_from_the_checkpoint(tmp_path: Path, compose) -> None:
    path = tmp_path / "imgtrain.pt"
    torch.save({"format_version": 1, "model": _model(0).state_dict(),
                "identity": {"arch": "resnet18", "num_classes": 4}, "class_names": list("abcd"),
                "config": {"dataset": {"image_size": 48}}}, path)

    def plan(*overrides: str) -> RunPlan:
        """mode=predict's plan, from the defaults (model.arch=resnet152, 224 px) and `overrides`
        given on the command line."""
        given = ["mode=predict", "device=cpu", f"model.weights={path}", *overrides]
        return resolve(compose(*given), given)

    assert weights.read(str(path)).class_names == list("abcd")
    predicting = plan()
    assert predicting.model.arch == "resnet18" and predicting.dataset.image_size == 48
    assert "using model.arch=resnet18 from imgtrain.pt" in predicting.adopted
    predicting = plan("dataset.image_size=64")  # given on the command line: kept
    assert predicting.dataset.image_size == 64
    with pytest.raises(ConfigError, match="holds resnet18 weights, but model.arch=resnet50"):
        plan("model=resnet50")
    model = build_model("resnet18", 10)
    with pytest.raises(ConfigError, match="trained for 4 classes, but this dataset has 10"):
        weights.load_into(model, weights.read(str(path)), "resnet18", allow_new_fc=False)
    with pytest.raises(ConfigError, match="holds resnet18 weights, but model.arch is resnet50"):
        weights.load_into(build_model("resnet50", 4), weights.read(str(path)), "resnet50", False)
