"""Fine-tuning, mode=eval|export|predict from a checkpoint alone, and train.profile, on real JPEG
folders: through run.py's own `app.run` in this process (no interpreter start-up per run), and
`python run.py ...` where the test is about what the user sees."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from conftest import CONF, TINY, assert_clean_error, read_results, run_cli
from imgtrain import app, weights
from imgtrain.data.imagefolder import JpegFolder
from imgtrain.data.transforms import Normalizer
from imgtrain.device import DeviceInfo
from imgtrain.errors import ConfigError
from imgtrain.models import build_model
from imgtrain.resolve import resolve
from imgtrain.predict import predict

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's decoders
NO_AMP = [item for item in TINY if not item.startswith("amp=")]
FOLDER = ["dataset=imagenet", "dataset.image_size=32", "train.batch_size=16", "optim.lr=0.05",
          "sched.warmup_epochs=0"]


def run_app(run_dir: Path, *overrides: str, succeed: bool = True) -> app.Outcome:
    """What run.py does with these command-line overrides, in this process: how it ended
    (`succeed`: asserted to have ended well)."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    outcome = app.run(cfg, str(run_dir), list(overrides), multirun=False)
    if succeed:
        assert outcome.exit_code == 0, outcome.error or outcome.traceback
    return outcome


def resnet18_with_statistics_of(image_folder: Path, num_classes: int,
                                seed: int = 0) -> torch.nn.Module:
    """A resnet18 (in eval mode) whose BatchNorm statistics are these images' (as training or
    pretraining leaves them): its outputs differ from image to image and from size to size."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes).train()
    train = JpegFolder(str(image_folder), "train", 32, train=False)
    images = torch.stack([train[i][0] for i in range(0, len(train), 3)])
    with torch.no_grad():
        for _ in range(3):
            model(Normalizer(torch.device("cpu"), False)(images))
    return model.eval()


def _pretrained_pth_tar(image_folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """A 10-class resnet18 in the seed's / pytorch/examples' checkpoint.pth.tar layout, with
    BatchNorm statistics of this kind of image (as pretraining leaves them)."""
    model = resnet18_with_statistics_of(image_folder, 10)
    state = model.state_dict()
    torch.save({"epoch": 90, "arch": "resnet18", "best_acc1": torch.tensor(70.0),
                "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}, path)
    return state


@pytest.fixture(scope="module")
def fine_tuned(image_folder: Path, module_dir: Path) -> dict:
    """One epoch fine-tuning a frozen backbone, then a resume for a second epoch."""
    base = module_dir
    source = _pretrained_pth_tar(image_folder, base / "checkpoint.pth.tar")
    run_dir = base / "run"
    args = [*TINY, *FOLDER, f"dataset.root={image_folder}",
            f"model.weights={base / 'checkpoint.pth.tar'}", "model.freeze=backbone"]
    run_app(run_dir, *args, "train.epochs=1")
    after_first = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["model"]
    run_app(run_dir, *args, "train.epochs=2")
    return {"source": source, "run_dir": run_dir, "log": (run_dir / "train.log").read_text(),
            "after_first": after_first, "root": image_folder}


def test_fine_tune_trains_only_a_new_fc(fine_tuned: dict) -> None:
    assert fine_tuned["log"].count("loaded 10-class weights, new 4-class fc") == 1
    # Any ImageFolder tree, not necessarily ImageNet: named as what it is, with its folder.
    assert f"data       imagefolder {fine_tuned['root']}:" in fine_tuned["log"]
    assert "resumed from epoch 2 step 0" in fine_tuned["log"]
    saved = torch.load(fine_tuned["run_dir"] / "checkpoints/last.pt", weights_only=True)
    source, model = fine_tuned["source"], saved["model"]
    backbone = [k for k in source if not k.startswith("fc.")]
    assert backbone and all(torch.equal(model[k], source[k]) for k in backbone)  # incl. BN buffers
    assert model["fc.weight"].shape == (4, 512)
    assert not torch.equal(model["fc.weight"], fine_tuned["after_first"]["fc.weight"])
    assert len(saved["optimizer"]["param_groups"][0]["params"]) == 2  # fc.weight and fc.bias
    assert saved["class_names"] == [f"class_{i}" for i in range(4)]
    assert read_results(fine_tuned["run_dir"])["best_acc1"] >= 60  # chance is 25


def test_eval_needs_only_the_val_split_and_its_own_batch(fine_tuned: dict, tmp_path: Path) -> None:
    """A folder with val/ alone evaluates, with the default train.batch_size=256 (more than the
    96 training images); eval.batch_size is eval's own; both say what they evaluated and where
    the results went."""
    checkpoint = fine_tuned["run_dir"] / "checkpoints/last.pt"
    val_only = tmp_path / "val_only"
    shutil.copytree(fine_tuned["root"] / "val", val_only / "val")
    trained = read_results(fine_tuned["run_dir"])
    for root, batch, extra in ((val_only, 256, []), (fine_tuned["root"], 6,
                                                     ["train.batch_size=4096", "eval.batch_size=6"])):
        run_dir = tmp_path / f"eval_{batch}"
        proc = run_cli("device=cpu", "amp=O0", "dataset=imagenet", "dataset.workers=0", "mode=eval",
                       f"dataset.root={root}", f"model.weights={checkpoint}", *extra,
                       f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stderr
        assert f"eval: {checkpoint} (resnet18) on imagefolder {root}, val split: 32 images, " \
               f"batch {batch}" in proc.stdout
        assert f"  weights    {checkpoint}" in proc.stdout
        assert f"  results    {run_dir / 'results.json'}" in proc.stdout
        evaluated = read_results(run_dir)
        assert evaluated["final_acc1"] == pytest.approx(trained["final_acc1"])
        assert evaluated["val_samples"] == 32 and evaluated["global_batch_size"] == batch
        assert evaluated["weights"] == str(checkpoint)


def test_eval_takes_arch_and_size_from_the_checkpoint(fine_tuned: dict, tmp_path: Path) -> None:
    # The README's command: no model= and no dataset.image_size (the defaults: resnet152, 224 px).
    run_app(tmp_path, "device=cpu", "amp=O0", "dataset=imagenet", "dataset.workers=0",
            f"dataset.root={fine_tuned['root']}", "mode=eval", "train.batch_size=16",
            f"model.weights={fine_tuned['run_dir'] / 'checkpoints/last.pt'}")
    evaluated, trained = read_results(tmp_path), read_results(fine_tuned["run_dir"])
    assert evaluated["arch"] == "resnet18"
    assert evaluated["final_acc1"] == pytest.approx(trained["final_acc1"])


def _val_images(root: Path) -> tuple[torch.Tensor, list[Path]]:
    val = JpegFolder(str(root), "val", 32, train=False)
    return torch.stack([val[i][0] for i in range(len(val))]), [Path(p) for p, _ in val.samples]


def _pytorch_model(checkpoint: Path) -> torch.nn.Module:
    loaded = weights.read(str(checkpoint))
    model = build_model("resnet18", 4)
    weights.load_into(model, loaded, "resnet18", allow_new_fc=False)
    return model.eval()


def test_onnx_export_lands_beside_its_checkpoint_and_matches_pytorch(fine_tuned: dict,
                                                                     tmp_path: Path) -> None:
    import onnxruntime
    # model.weights=<a run folder>: its best.pt, and the files beside it; the console says
    # where, and no folder of the command's own is left under outputs/.
    proc = run_cli("device=cpu", "mode=export", f"model.weights={fine_tuned['run_dir']}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = fine_tuned["run_dir"] / "checkpoints"
    checkpoint, onnx_file = folder / "best.pt", folder / "model.onnx"
    assert f"  onnx       {onnx_file.resolve()}" in proc.stdout, proc.stdout
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not list(outputs.rglob("*")), list(outputs.rglob("*"))
    assert json.loads((folder / "classes.json").read_text()) == [f"class_{i}" for i in range(4)]
    images, _ = _val_images(fine_tuned["root"])
    with torch.no_grad():
        expected = _pytorch_model(checkpoint)(Normalizer(torch.device("cpu"), False)(images))
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    # The contract: float32 NCHW RGB in [0, 1], normalisation inside the graph.
    pixels = (images.float() / 255).numpy()
    for batch in (slice(0, 1), slice(3, 10)):  # batch 1 and batch 7 through one dynamic axis
        (logits,) = session.run(None, {"images": pixels[batch]})
        assert logits.shape == (batch.stop - batch.start, 4)
        assert np.abs(logits - expected[batch].numpy()).max() <= 1e-3
        assert (logits.argmax(1) == expected[batch].argmax(1).numpy()).all()


def test_predict_prints_top_k_names_and_writes_csv(fine_tuned: dict, tmp_path: Path) -> None:
    root = fine_tuned["root"]
    one = root / "val/class_1/img_0.JPEG"
    proc = run_cli("device=cpu", "mode=predict", "predict.topk=2",
                   f"model.weights={fine_tuned['run_dir'] / 'checkpoints/last.pt'}",
                   f"predict.inputs=[{one},{root / 'val/class_3'},{tmp_path / 'absent.jpg'}]",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    assert f"{one}: class_" in proc.stdout
    assert f"warning: skipped {tmp_path / 'absent.jpg'}: does not exist\n" in proc.stdout
    with open(tmp_path / "run/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 * 2  # 1 file + 8 in the folder, top 2 each
    top1 = {Path(r["path"]).parent.name: r for r in rows if r["rank"] == "1"}
    assert top1["class_3"]["class_name"] == "class_3"
    probabilities = [float(r["probability"]) for r in rows if r["path"] == str(one)]
    assert probabilities[0] >= probabilities[1] and sum(probabilities) <= 1 + 1e-6


def test_predict_takes_one_path(fine_tuned: dict, tmp_path: Path) -> None:
    one = fine_tuned["root"] / "val/class_2/img_0.JPEG"
    proc = run_cli("device=cpu", "mode=predict", "predict.topk=1", f"predict.inputs={one}",
                   f"model.weights={fine_tuned['run_dir'] / 'checkpoints/last.pt'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "run/predictions.csv") as f:
        assert [row["path"] for row in csv.DictReader(f)] == [str(one)]


@pytest.mark.parametrize("mode, weights, failing, fragment", [
    ("predict", "last.pt", "predict.inputs=[{tmp}/absent.jpg]", "absent.jpg does not exist"),
    ("export", "last.pt", "export.opset=9 export.exporter=dynamo", "export.opset=9"),
    ("export", "absent.pt", "export.batch=dynamic", "absent.pt"),
])
def test_failed_predict_and_export_leave_no_folder(mode: str, weights: str, failing: str,
                                                   fragment: str, fine_tuned: dict,
                                                   tmp_path: Path) -> None:
    """The first two fail after the checkpoint's arch and size were logged: the README's promise
    still holds, no run folder (and no results.json recording training settings)."""
    proc = run_cli("device=cpu", f"mode={mode}",
                   f"model.weights={fine_tuned['run_dir'] / 'checkpoints' / weights}",
                   *failing.format(tmp=tmp_path).split(), cwd=tmp_path)
    assert_clean_error(proc, fragment)
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not list(outputs.rglob("*")), list(outputs.rglob("*"))


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "absent.jpg", "absent.jpg does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no image files"),
    (lambda d: (d / "notes.jpg").write_text("not an image") and d / "notes.jpg",
     "is not a readable image")])
def test_predict_bad_inputs(make, fragment: str, fine_tuned: dict, tmp_path: Path,
                            compose) -> None:
    path = fine_tuned["run_dir"] / "checkpoints/last.pt"
    overrides = ["mode=predict", "device=cpu", f"model.weights={path}",
                 f"predict.inputs=[{make(tmp_path)}]"]
    plan = resolve(compose(*overrides), overrides)  # resnet18 and 32 px, from the checkpoint
    assert (plan.model.arch, plan.dataset.image_size, plan.predict.topk) == ("resnet18", 32, 5)
    with pytest.raises(ConfigError, match=fragment):  # run.py shows it as one `error:` line
        predict(plan, tmp_path / "run", DeviceInfo("cpu"), weights.read(str(path)))
    assert not (tmp_path / "run/predictions.csv").exists()


def test_profile_writes_a_chrome_trace_and_training_goes_on(tmp_path: Path) -> None:
    proc = run_cli("experiment=quickstart", "device=cpu", "dataset.train_size=96",
                   "dataset.val_size=32", "train.batch_size=32", "train.epochs=1",
                   "train.profile=true", "train.profile_wait=0", "train.profile_warmup=1",
                   "train.profile_active=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    (trace,) = (tmp_path / "profile").glob("*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("convolution" in event.get("name", "") for event in events)
    assert "top operators by self cpu time" in (tmp_path / "train.log").read_text()
    assert "aten::" in proc.stdout
    # A CUDA build of torch off a GPU: no `ERROR: ... gpuGetDeviceCount failed` from its tracer
    # (nor its USDT start/stop lines) under a run that went well.
    assert "gpuGetDeviceCount" not in proc.stderr and "USDT" not in proc.stderr, proc.stderr
    results = read_results(tmp_path)
    assert results["status"] == "completed" and results["epochs_completed"] == 1


@pytest.mark.slow
def test_frozen_backbone_with_ddp_and_o2(fine_tuned: dict, tmp_path: Path) -> None:
    """Two gloo processes (no unused-parameter error from DDP) and O2 (no fp32 masters for the
    frozen weights: the checkpoint's exact fp32 values come from their CPU copy)."""
    source = tmp_path / "checkpoint.pth.tar"
    state = _pretrained_pth_tar(fine_tuned["root"], source)
    proc = run_cli(*NO_AMP, "amp=O2", *FOLDER, f"dataset.root={fine_tuned['root']}",
                   "world=8p", "world.nproc_per_node=2", "world.start_method=fork", "train.epochs=1",
                   "train.steps_per_epoch=2",
                   f"model.weights={source}", "model.freeze=backbone", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    model = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(model[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_unknown_freeze_setting_is_refused() -> None:
    from imgtrain.models import check_freeze
    with pytest.raises(ConfigError, match="unknown model.freeze 'head'; choose one of none, backbone"):
        check_freeze("head")


def test_resume_with_another_freeze_is_refused(fine_tuned: dict, tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    saved = tmp_path / "checkpoints/last.pt"
    saved.write_bytes((fine_tuned["run_dir"] / "checkpoints/last.pt").read_bytes())
    outcome = run_app(tmp_path, *TINY, *FOLDER, f"dataset.root={fine_tuned['root']}",
                      "model.freeze=none", "train.epochs=3", succeed=False)
    assert outcome.exit_code != 0  # run.py prints the error as one `error:` line and exits
    assert "trained with freeze=backbone, this run has freeze=none" in outcome.error
    assert saved.read_bytes() == (fine_tuned["run_dir"] / "checkpoints/last.pt").read_bytes()
