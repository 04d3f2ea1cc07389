"""Short names: a run's folder from its command, an ImageFolder's dataset by its folder, and the
HParams columns every run fills from its resolved plan. The real runs, sweeps and TensorBoard
that use them are in test_sweeps.py, test_train.py and test_tensorboard.py."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from imgtrain.names import SHORT_NAME_CHARS, dataset_label, run_label, short_name
from imgtrain.resolve import resolve
from imgtrain.results import identity
from imgtrain.worker import hparam_values

LOCATIONS = ["dataset.root", "model.weights", "train.resume", "predict.inputs"]  # conf's


def name(*overrides: str, arch: str = "resnet152", dataset: str = "imagenet",
         root: str | None = "data/imagenet") -> str:
    return short_name(list(overrides), LOCATIONS, arch, dataset, root)


@pytest.mark.parametrize("overrides, expected", [
    ([], "resnet152_imagenet"),
    (["experiment=quickstart"], "quickstart"),
    (["experiment=quickstart", "optim.lr=0.2", "train.batch_size=64"], "quickstart_lr0.2_bs64"),
    (["train.batch_size=64", "optim.lr=0.2", "experiment=quickstart"], "quickstart_lr0.2_bs64"),
    (["experiment=quickstart", "amp=O1", "train.print_freq=5", "dataset.workers=2"],
     "quickstart_O1"),  # how a run prints and loads is not what it computes
    (["dataset.root=/data/flowers/", "model.freeze=backbone"], "resnet152_flowers_freezebackbone"),
    (["experiment=quickstart", "model.zero_init_residual=true", "dataset.scale=[0.35,1.0]"],
     "quickstart_scale0.35-1.0_zero_init_residual"),
    (["mode=export", "model.weights=outputs/2026-12-06/20-01-02_quickstart_lr0.2/checkpoints/best.pt"],
     "export_quickstart_lr0.2-best"),
])
def test_a_runs_name_is_its_experiment_and_the_overrides_given_besides(overrides: list,
                                                                       expected: str) -> None:
    assert name(*overrides, root="/data/flowers/" if "flowers" in str(overrides)
                else "data/imagenet") == expected


def test_long_commands_are_cut_and_stay_apart() -> None:
    common = ["experiment=quickstart", "device=cpu", "amp=O0", "model=resnet18",
              "train.epochs=1", "dataset.train_size=256", "dataset.val_size=64",
              "dataset.image_size=32", "train.steps_per_epoch=2", "train.batch_size=16"]
    names = [name(*common, f"train.clip_grad_norm={clip}", arch="resnet18", dataset="synthetic",
                  root=None) for clip in (1, 2, 3)]
    for one in names:  # whole tokens, then a hash of the whole command
        assert len(one) <= SHORT_NAME_CHARS and re.fullmatch(r"[\w.+-]+_\+[0-9a-f]{6}", one), one
        assert one.startswith("quickstart_resnet18_O0_cpu_bs16_ep1_")
    assert len(set(names)) == 3, names
    assert len(f"00-00-00_{names[0]}") <= 60
    # The same command gives the same name (a typed-again command finds its run by it).
    assert name(*reversed(common), "train.clip_grad_norm=1", arch="resnet18",
                dataset="synthetic", root=None) == names[0]


def test_a_name_holds_nothing_hydra_or_a_shell_would_misread() -> None:
    one = name("experiment=quickstart", "+train.note='a b=c,d'", "dataset.scale=[0.1,1]")
    assert re.fullmatch(r"[A-Za-z0-9_.+@%-]+", one), one


def test_trial_ids_are_run_folders_and_sweep_jobs_with_their_sweep() -> None:
    assert run_label("outputs/2026-12-06/20-01-02_quickstart") == "20-01-02_quickstart"
    assert run_label("outputs/multirun/2026-12-06/20-01-02/3_quickstart_lr0.1") == \
        "20-01-02/3_quickstart_lr0.1"


def test_an_image_folder_is_named_by_its_folder_everywhere(compose, image_folder: Path) -> None:
    assert dataset_label("imagenet", "/data/digits/") == "imagefolder:digits"
    assert dataset_label("synthetic", None) == "synthetic"
    assert dataset_label("cifar10", "/data/cifar") == "cifar10"
    overrides = ["experiment=quickstart", "dataset=imagenet", f"dataset.root={image_folder}",
                 "dataset.num_classes=4", "device=cpu"]
    plan = resolve(compose(*overrides), overrides)
    label = f"imagefolder:{image_folder.name}"
    assert identity(plan)["dataset"] == label  # results.json
    values = hparam_values(plan)
    # Every main column from the resolved plan: amp O0 and resnet18 chosen by the experiment,
    # 64 the quickstart's global batch, the lr its linear rule's.
    assert values["dataset.name"] == label and values["amp.level"] == "O0"
    assert values["model.arch"] == "resnet18" and values["experiment"] == "quickstart"
    assert values["train.batch_size"] == 64 and values["optim.lr"] == pytest.approx(0.1)
    assert not {"dataset", "amp", "model"} & set(values) and values["device"] == "cpu"


def test_a_run_folder_as_model_weights_means_its_best_checkpoint(tmp_path: Path) -> None:
    from imgtrain.errors import ConfigError
    from imgtrain.weights import in_run_folder

    run = tmp_path / "10-00-00_quickstart_lr0.2"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/last.pt").write_bytes(b"")
    assert in_run_folder(str(run)) == str(run / "checkpoints/last.pt")  # no best.pt yet
    (run / "checkpoints/best.pt").write_bytes(b"")
    assert in_run_folder(str(run)) == str(run / "checkpoints/best.pt")
    assert in_run_folder(str(run / "checkpoints")) == str(run / "checkpoints/best.pt")
    assert in_run_folder(str(run / "checkpoints/last.pt")) == str(run / "checkpoints/last.pt")
    with pytest.raises(ConfigError, match="without checkpoints/best.pt"):
        in_run_folder(str(tmp_path))
