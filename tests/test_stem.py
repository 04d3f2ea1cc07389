"""model.stem: the CIFAR stem (3x3 stride-1 conv1, no max-pool) for dataset=cifar10, the ImageNet
stem elsewhere; recorded in checkpoints, taken from them by eval, predict, export and fine-tunes,
and refused in one line where a command asks for the other."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import TINY, read_results, run_cli
from imgtrain import memory, weights
from imgtrain.data.transforms import Normalizer
from imgtrain.errors import ConfigError
from imgtrain.models import build_model
from imgtrain.resolve import resolve
from test_tools import run_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's decoders
CIFAR_STEM = "model      resnet18, CIFAR stem (3x3/1 conv, no max-pool)"


@pytest.fixture(scope="module")
def cifar_run(cifar_root: Path, module_dir: Path) -> dict:
    """dataset=cifar10 trained briefly from a working directory that names its data relatively,
    as a user's `dataset.root=data/cifar` does."""
    cwd = module_dir / "project"
    (cwd / "data").mkdir(parents=True)
    (cwd / "data" / "cifar").symlink_to(cifar_root)
    run_dir = module_dir / "run"
    proc = run_cli("dataset=cifar10", "dataset.root=data/cifar", *TINY, "train.epochs=1",
                   "train.batch_size=16", "train.steps_per_epoch=2", "eval.batch_size=50",
                   f"hydra.run.dir={run_dir}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return {"run_dir": run_dir, "stdout": proc.stdout, "best": run_dir / "checkpoints/best.pt"}


def test_cifar10_trains_with_the_cifar_stem_and_records_it(cifar_run: dict) -> None:
    assert CIFAR_STEM in cifar_run["stdout"]
    saved = torch.load(cifar_run["best"], weights_only=True)
    assert saved["identity"]["stem"] == "cifar" and saved["config"]["model"]["stem"] == "cifar"
    assert saved["model"]["conv1.weight"].shape == (64, 3, 3, 3)


def test_the_stem_follows_the_dataset_unless_set(compose, cifar_root: Path) -> None:
    def stem(*overrides: str) -> str:
        given = ["device=cpu", *overrides]
        return resolve(compose(*given), given).model.stem

    cifar = ["dataset=cifar10", f"dataset.root={cifar_root}"]
    assert stem(*cifar) == "cifar"
    assert stem("experiment=quickstart") == "imagenet"  # the quickstart keeps its stem and time
    assert stem(*cifar, "model.stem=imagenet") == "imagenet"
    assert stem("experiment=quickstart", "model.stem=cifar") == "cifar"
    with pytest.raises(ConfigError, match="model.stem takes auto, imagenet or cifar, not vgg"):
        stem("experiment=quickstart", "model.stem=vgg")


def test_cifar_stem_keeps_the_maps_large_and_the_estimate_sees_it() -> None:
    shapes = {}
    for stem in ("imagenet", "cifar"):
        model = build_model("resnet18", 10, stem=stem).eval()
        model.layer4.register_forward_hook(
            lambda _module, _inputs, out, s=stem: shapes.update({s: out.shape}))
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
    assert shapes == {"imagenet": (1, 512, 1, 1), "cifar": (1, 512, 4, 4)}
    imagenet, cifar = (memory.estimate("resnet18", 10, 32, "O0", False, stem=stem)
                       for stem in ("imagenet", "cifar"))
    assert cifar.per_image > 5 * imagenet.per_image  # 16x the pixels from layer1 on


def test_eval_takes_the_stem_and_the_recorded_dataset(cifar_run: dict, tmp_path: Path) -> None:
    """No dataset= nor dataset.root: the run's CIFAR-10, found from where the run was started."""
    proc = run_cli("mode=eval", "device=cpu", "amp=O0", "dataset.workers=0",
                   f"model.weights={cifar_run['best']}", f"hydra.run.dir={tmp_path / 'eval'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    root = (cifar_run["run_dir"].parent / "project/data/cifar")
    assert f"using dataset=cifar10 dataset.root={root} from best.pt's run" in proc.stdout
    evaluated, trained = read_results(tmp_path / "eval"), read_results(cifar_run["run_dir"])
    assert evaluated["dataset"] == "cifar10" and evaluated["val_samples"] == 100
    assert evaluated["final_acc1"] == pytest.approx(trained["final_acc1"])


def test_export_and_predict_build_the_checkpoint_s_stem(cifar_run: dict, tmp_path: Path) -> None:
    import onnxruntime
    from PIL import Image
    run_app(tmp_path / "export", "device=cpu", "mode=export", f"model.weights={cifar_run['best']}",
            f"export.dir={tmp_path / 'export'}")  # not beside the fixture's checkpoint
    model = build_model("resnet18", 10, stem="cifar")
    weights.load_into(model, weights.read(str(cifar_run["best"])), "resnet18", allow_new_fc=False)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.eval()(Normalizer(torch.device("cpu"), False)(images))
    session = onnxruntime.InferenceSession(str(tmp_path / "export/model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": (images.float() / 255).numpy()})
    assert abs(logits - expected.numpy()).max() <= 1e-3
    image = tmp_path / "one.png"
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(image)
    run_app(tmp_path / "predict", "device=cpu", "mode=predict", f"predict.inputs={image}",
            f"model.weights={cifar_run['best']}")
    with open(tmp_path / "predict/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4", "5"]
    assert all(row["class_name"] == f"c{row['class_index']}" for row in rows)  # the run's names


def test_the_other_stem_is_refused_in_one_line(cifar_run: dict, compose) -> None:
    given = ["mode=eval", "device=cpu", "model.stem=imagenet", f"model.weights={cifar_run['best']}"]
    with pytest.raises(ConfigError, match=r"holds weights with the CIFAR stem \(3x3/1 conv, no "
                       r"max-pool\), but model.stem=imagenet was asked for"):
        resolve(compose(*given), given)
    with pytest.raises(ConfigError, match="use model.stem=cifar"):
        weights.load_into(build_model("resnet18", 10), weights.read(str(cifar_run["best"])),
                          "resnet18", allow_new_fc=False)


def test_fine_tune_takes_arch_stem_and_size_from_the_checkpoint(cifar_run: dict,
                                                                image_folder: Path,
                                                                tmp_path: Path) -> None:
    """The README's fine-tune with none of model=, model.stem= or dataset.image_size= (the
    defaults: resnet152, the ImageNet stem, 224 px): the checkpoint's resnet18, CIFAR stem and
    32 px, said in train.log, with what is frozen and what trains."""
    run_app(tmp_path, "device=cpu", "amp=O0", "dataset.workers=0", f"dataset.root={image_folder}",
            f"model.weights={cifar_run['best']}", "model.freeze=backbone", "train.epochs=1",
            "train.batch_size=16", "train.steps_per_epoch=2", "train.save_checkpoints=false")
    log = (tmp_path / "train.log").read_text()
    for line in ("using model.arch=resnet18 from best.pt", "using model.stem=cifar from best.pt",
                 "using dataset.image_size=32 from best.pt (as it was trained)", CIFAR_STEM,
                 "frozen     backbone (11,168,832 parameters), training: fc (2,052 parameters)"):
        assert line in log, line
    assert read_results(tmp_path)["arch"] == "resnet18"
