"""mode=eval over several test sizes (eval.sizes, eval.crop_sizes): each row of the sweep is what a
single mode=eval at that size gives, for imgtrain's, the seed's and timm's checkpoints, on real
validation JPEGs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from conftest import read_results
from imgtrain.errors import ConfigError
from imgtrain.resolve import resolve
from test_tools import resnet18_with_statistics_of, run_app
from test_weights import seed_pth_tar, timm_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's decoders
EVAL = ["device=cpu", "amp=O0", "dataset=imagenet", "dataset.workers=0", "mode=eval",
        "train.batch_size=16"]
SIZES = ((40, 32), (48, 40))


def imgtrain_checkpoint(model: torch.nn.Module, ema: torch.nn.Module, path: Path) -> None:
    """What imgtrain's Trainer saves, as far as weights.read looks: its run validated at 36/32,
    which a sweep's own sizes replace."""
    torch.save({"format_version": 1, "model": model.state_dict(),
                "identity": {"arch": "resnet18", "num_classes": 4},
                "class_names": [f"class_{i}" for i in range(4)],
                "config": {"dataset": {"image_size": 32, "val_resize_size": 36,
                                       "val_crop_size": 32}}}, path)


@pytest.mark.parametrize("write", [imgtrain_checkpoint, seed_pth_tar, timm_checkpoint])
def test_each_row_equals_a_single_eval_at_its_size(write, image_folder: Path,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth.tar"
    write(resnet18_with_statistics_of(image_folder, 4, seed=1),
          resnet18_with_statistics_of(image_folder, 4, seed=2), path)
    given = [*EVAL, f"dataset.root={image_folder}", f"model.weights={path}"]
    sizes = ",".join(f"[{resize},{crop}]" for resize, crop in SIZES)
    run_app(tmp_path / "sweep", *given, f"eval.sizes=[{sizes}]")
    swept = read_results(tmp_path / "sweep")
    rows = swept["eval_sizes"]
    assert [(row["resize"], row["crop"]) for row in rows] == list(SIZES)
    # The first size is the plan's own loader; a later one's is built for its size.
    resize, crop = SIZES[1]
    run_app(tmp_path / "single", *given, f"dataset.val_resize_size={resize}",
            f"dataset.val_crop_size={crop}")
    single = read_results(tmp_path / "single")
    assert (rows[1]["loss"], rows[1]["acc1"], rows[1]["acc5"], rows[1]["samples"]) == \
        (single["val_loss"], single["final_acc1"], single["final_acc5"], 32)
    assert rows[0]["loss"] != rows[1]["loss"]  # the sizes really differ
    top = max(rows, key=lambda row: (row["acc1"], row["acc5"], -row["crop"]))
    assert swept["best_size"] == {"resize": top["resize"], "crop": top["crop"]}
    assert swept["best_acc1"] == swept["final_acc1"] == top["acc1"]


def test_crop_sizes_print_one_table_and_name_the_best(image_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "timm.pth.tar"
    timm_checkpoint(resnet18_with_statistics_of(image_folder, 4, seed=1),
                    resnet18_with_statistics_of(image_folder, 4, seed=2), path)
    run_dir = tmp_path / "sweep"
    run_app(run_dir, *EVAL, f"dataset.root={image_folder}", f"model.weights={path}",
            "eval.crop_sizes=[32,36]")
    rows = read_results(run_dir)["eval_sizes"]
    # resize = crop / eval.crop_ratio (0.875), rounded as dataset.val_crop_size alone gives it
    assert [(row["resize"], row["crop"]) for row in rows] == [(37, 32), (41, 36)]
    # train.log holds the console's lines, without their time stamps
    lines = [line[24:] for line in (run_dir / "train.log").read_text().splitlines()]
    start = lines.index("  resize  crop     loss     acc1     acc5")
    assert "val split: 32 images, batch 16, 2 test sizes" in lines[start - 1]
    for line, row in zip(lines[start + 1:start + 3], rows):
        assert line.split() == [str(row["resize"]), str(row["crop"]), f"{row['loss']:.4f}",
                                f"{row['acc1']:.3f}", f"{row['acc5']:.3f}"]
    best = read_results(run_dir)["best_size"]
    assert f"at resize {best['resize']} crop {best['crop']} (of 2 sizes, 32 images each)" \
        in lines[start + 3]


@pytest.mark.parametrize("extra, fragment", [
    (["eval.sizes=[[32,40]]"], "eval.sizes: [32, 40] is not a test size"),
    (["eval.crop_sizes=[32,32]"], "eval.crop_sizes lists resize 37 crop 32 twice"),
    (["eval.crop_sizes=[32]", "eval.crop_ratio=1.5"], "eval.crop_ratio=1.5 must be in (0, 1]"),
    (["eval.crop_sizes=[32]", "eval.sizes=[[40,32]]"], "give one of them"),
    (["eval.crop_sizes=[32]", "dataset.val_crop_size=32"], "drop dataset.val_crop_size"),
    (["eval.crop_sizes=[32]", "dataset=synthetic"], "applies to dataset=imagenet"),
    (["eval.crop_sizes=[32]", "mode=train"], "sweeps mode=eval's test sizes"),
])
def test_bad_sweeps_are_refused_before_any_process(extra: list[str], fragment: str,
                                                   image_folder: Path, tmp_path: Path,
                                                   compose) -> None:
    path = tmp_path / "seed.pth.tar"
    seed_pth_tar(torchvision.models.resnet18(num_classes=4), None, path)
    given = [*EVAL, f"dataset.root={image_folder}", f"model.weights={path}", *extra]
    with pytest.raises(ConfigError) as info:
        resolve(compose(*given), given)
    assert fragment in str(info.value) and "\n" not in str(info.value)
