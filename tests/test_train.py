"""End-to-end runs of `python run.py` on generated data: accuracy, resume, eval, TensorBoard."""
from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import TINY, paused, read_results, run_cli, start_cli, wait_for

# 12 steps of 8 an epoch: over 3 epochs, eight seeds and both thread counts reached 75-100% Acc@1
# (batches of 16 for 4 epochs gave 50-100%: too few steps for BatchNorm's running statistics).
JPEG_RUN = [*TINY, "dataset=imagenet", "dataset.image_size=32", "train.batch_size=8",
            "optim.lr=0.05", "sched.warmup_epochs=0", "train.epochs=3"]


@pytest.fixture(scope="module")
def jpeg_run(image_folder: Path, module_dir: Path) -> Path:
    """One 3-epoch run on the JPEG folder, which the accuracy, resume and eval tests share."""
    run_dir = module_dir / "jpeg-run"
    proc = run_cli(*JPEG_RUN, f"dataset.root={image_folder}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_image_folder_trains_well_above_chance(jpeg_run: Path) -> None:
    results = read_results(jpeg_run)
    assert results["status"] == "completed"
    assert results["val_samples"] == 32  # 4 classes x 8 validation images, each counted once
    assert results["best_acc1"] >= 60, results  # chance is 25
    assert (jpeg_run / "checkpoints" / "last.pt").is_file()
    assert (jpeg_run / "train.log").read_text().count("done in") == 1


def test_cifar10_pickles_train_well_above_chance(cifar_root: Path, tmp_path: Path) -> None:
    proc = run_cli(*TINY, "dataset=cifar10", f"dataset.root={cifar_root}", "train.epochs=3",
                   "train.save_checkpoints=false",
                   "train.batch_size=20", "optim.lr=0.05", "sched.warmup_epochs=0",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path)
    assert results["val_samples"] == 100
    assert results["best_acc1"] >= 40, results  # chance is 10


def test_quickstart_writes_results_and_tensorboard_tags(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_cli("experiment=quickstart", "dataset.train_size=256", "dataset.val_size=128",
                   "train.epochs=2", "train.print_freq=2", "train.save_checkpoints=false",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path)
    for key in ("arch", "dataset", "device", "world_size", "amp", "torch_version",
                "global_batch_size", "epochs_completed", "images_per_sec", "best_acc1",
                "final_acc1", "final_acc5", "val_samples", "train_seconds"):
        assert key in results, key
    assert results["status"] == "completed" and results["epochs_completed"] == 2
    assert results["images_per_sec"] > 0
    events = EventAccumulator(str(tmp_path)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc1", "throughput/images_per_sec", "train/lr",
            "throughput/loader_wait_seconds", "val/loss", "accuracy/val_acc1",
            "accuracy/val_acc5"} <= tags
    assert re.search(r"epoch 1 \[\d+/\d+\] loss [\d.]+ acc1 [\d.]+ img/s [\d.]+ lr", proc.stdout)


def test_a_runs_folder_goes_back_into_overrides_as_it_is(tmp_path: Path) -> None:
    """outputs/<date>/<time>_<short name> pasted unquoted into hydra.run.dir= and model.weights=:
    Hydra reads = , [ ] in an unquoted value as syntax, so the folder's name holds none."""
    args = ["experiment=quickstart", "dataset.train_size=64", "dataset.val_size=32",
            "train.batch_size=32", "train.epochs=1", "optim.lr=0.05"]
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    [run] = (tmp_path / "outputs").glob("*/*")
    assert re.fullmatch(r"\d\d-\d\d-\d\d_quickstart_lr0\.05_bs32_ep1_ntrain64_nval32", run.name), \
        run.name
    folder = str(run.relative_to(tmp_path))
    again = run_cli(*args, f"hydra.run.dir={folder}", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to train" in again.stdout + again.stderr, again.stderr
    evaluated = run_cli(*args, "mode=eval", f"model.weights={folder}",  # the run: its best.pt
                        "hydra.run.dir=eval", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert read_results(tmp_path / "eval")["final_acc1"] == read_results(run)["best_acc1"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def test_sigkill_after_an_epoch_then_resume_gives_the_same_weights(
        image_folder: Path, jpeg_run: Path, tmp_path: Path) -> None:
    args = [*JPEG_RUN, f"dataset.root={image_folder}"]  # jpeg_run's
    straight, resumed = jpeg_run, tmp_path / "resumed"

    proc = start_cli(*args, f"hydra.run.dir={resumed}")
    wait_for(proc, lambda: read_results(resumed).get("epochs_completed", 0) >= 1,
             "epoch 1 never completed")
    with paused(proc):  # killed where it was seen: after epoch 1, whatever the speed
        assert read_results(resumed)["epochs_completed"] == 1
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_results(resumed)["status"] == "running"  # killed, not finished

    again = run_cli(*args, f"hydra.run.dir={resumed}")
    assert again.returncode == 0, again.stderr
    assert "resumed from epoch 2 step" in again.stdout
    assert _max_diff(_weights(straight / "checkpoints/last.pt"),
                     _weights(resumed / "checkpoints/last.pt")) <= 1e-6
    assert read_results(resumed)["final_acc1"] == read_results(straight)["final_acc1"]

    # Rerunning a completed run trains nothing and leaves its results alone.
    before = (resumed / "results.json").read_bytes()
    done = run_cli(*args, f"hydra.run.dir={resumed}")
    assert done.returncode == 0 and "already completed" in done.stdout
    assert "resuming" not in done.stdout  # a finished run does not first claim to resume
    assert (resumed / "results.json").read_bytes() == before


def test_eval_mode_on_a_checkpoint_and_on_a_torchvision_state_dict(
        image_folder: Path, jpeg_run: Path, tmp_path: Path) -> None:
    trained = read_results(jpeg_run)
    assert trained["final_acc1"] >= 50  # learned something (chance is 25): loading must matter
    proc = run_cli(*JPEG_RUN, f"dataset.root={image_folder}", "mode=eval",
                   f"model.weights={jpeg_run / 'checkpoints/last.pt'}",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr
    evaluated = read_results(tmp_path / "eval")
    assert evaluated["status"] == "completed" and evaluated["mode"] == "eval"
    assert evaluated["final_acc1"] == pytest.approx(trained["final_acc1"])
    assert evaluated["val_samples"] == 32

    # What torchvision users have: a bare state dict, here of the same trained weights.
    plain = tmp_path / "resnet18.pth"
    torch.save(_weights(jpeg_run / "checkpoints/last.pt"), plain)
    proc = run_cli(*JPEG_RUN, f"dataset.root={image_folder}", "mode=eval",
                   f"model.weights={plain}", f"hydra.run.dir={tmp_path / 'plain'}")
    assert proc.returncode == 0, proc.stderr
    from_plain = read_results(tmp_path / "plain")
    assert from_plain["val_samples"] == 32
    assert from_plain["final_acc1"] == pytest.approx(trained["final_acc1"])
