"""experiment=resnet152_v2 as a user runs it, shrunk (resnet18, 32 px, a JPEG folder): every
ingredient on, killed with SIGKILL mid-epoch and resumed to the same weights and the same EMA
weights, on one process and on two with two loader workers each; the EMA's results, TensorBoard
tags and `model.weights_key=ema`."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import paused, read_results, run_cli, start_cli, wait_for
from imgtrain import weights

# The V2 recipe at test size: accumulation made explicit (the experiment's rule gives 1 for a
# batch this small), a decay that moves within 24 steps, checkpoints every 2 steps.
V2_SMALL = ["experiment=resnet152_v2", "model=resnet18", "device=cpu", "amp=O0",
            "dataset.image_size=32", "dataset.val_resize_size=36", "dataset.val_crop_size=32",
            "train.batch_size=16", "train.accumulate_steps=2", "train.epochs=2",
            "sched.warmup_epochs=1", "ema.decay=0.999", "ema.steps=2", "train.print_freq=2",
            "train.checkpoint_every_steps=2", "train.clip_grad_norm=5.0",
            "train.keep_checkpoints=2", "model.zero_init_residual=true",
            "optim.bias_weight_decay=0"]
ONE_PROCESS = ["dataset.workers=0"]
# Two ranks with two loader workers each share this machine's 2 cores: one epoch, no warm-up.
TWO_PROCESSES = ["world=8p", "world.nproc_per_node=2", "world.start_method=fork",
                 "dataset.workers=2", "train.epochs=1", "sched.warmup_epochs=0"]
# Where each world's kill lands: a checkpoint on the second step of its last epoch.
KILL_AFTER = {"one": ("step-8.pt", 2), "two": ("step-2.pt", 1)}


def _train(folder: Path, world: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    proc = run_cli(*V2_SMALL, f"dataset.root={folder}", *world, f"hydra.run.dir={run_dir}",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


WORLDS = {"one": ONE_PROCESS, "two": TWO_PROCESSES}


@pytest.fixture(scope="module")
def straight_run(image_folder: Path, module_dir: Path) -> Callable[[str], Path]:
    """The uninterrupted run of a world, trained the first time a test asks for it."""
    runs: dict[str, Path] = {}

    def run_of(world: str) -> Path:
        if world not in runs:
            _train(image_folder, WORLDS[world], module_dir / world)
            runs[world] = module_dir / world
        return runs[world]

    return run_of


def _saved(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/last.pt", map_location="cpu", weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.mark.parametrize("world", ["one", pytest.param("two", marks=pytest.mark.slow)])
def test_a_sigkill_mid_epoch_resumes_to_the_same_weights_and_ema(
        image_folder: Path, straight_run: Callable[[str], Path], tmp_path: Path,
        world: str) -> None:
    args = [*V2_SMALL, f"dataset.root={image_folder}", *WORLDS[world], f"hydra.run.dir={tmp_path}"]
    proc = start_cli(*args)
    checkpoint, epoch = KILL_AFTER[world]
    try:
        wait_for(proc, lambda: (tmp_path / "checkpoints" / checkpoint).exists(),
                 f"no mid-epoch checkpoint {checkpoint}")
        with paused(proc):  # killed where it is seen: last.pt, read now, is what it resumes from
            at = _saved(tmp_path)["state"]
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank and loader worker
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # also when the wait failed
        proc.wait()
    assert read_results(tmp_path)["status"] == "running"
    assert at["epoch"] == epoch - 1 and at["step_in_epoch"] > 0, at  # mid-epoch `epoch`

    resumed = run_cli(*args, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from epoch {epoch} step {at['step_in_epoch']} (restart 1)" in resumed.stdout
    straight, again = _saved(straight_run(world)), _saved(tmp_path)
    assert _max_diff(straight["model"], again["model"]) <= 1e-6
    assert _max_diff(straight["model_ema"], again["model_ema"]) <= 1e-6
    assert read_results(tmp_path)["ema_acc1"] == read_results(straight_run(world))["ema_acc1"]


def test_the_ema_is_evaluated_logged_and_picked_by_weights_key(
        image_folder: Path, straight_run: Callable[[str], Path], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = straight_run("one")
    results = read_results(run)
    assert results["best_ema_acc1"] >= results["ema_acc1"] >= 0
    assert [row["ema_acc1"] for row in results["history"]][-1] == results["ema_acc1"]
    saved = _saved(run)
    assert saved["model"].keys() != saved["model_ema"].keys()  # torchvision's model_ema layout
    assert int(saved["model_ema"]["n_averaged"]) > 0
    # What mode=eval, mode=export and fine-tuning read with model.weights_key=ema.
    ema = weights.read(str(run / "checkpoints/last.pt"), "ema")
    assert ema.key == "model_ema" and ema.state.keys() == saved["model"].keys()
    assert all(torch.equal(ema.state[k], saved["model_ema"][f"module.{k}"]) for k in ema.state)
    assert _max_diff(ema.state, saved["model"]) > 0  # the average, not the trained weights
    events = EventAccumulator(str(run)).Reload()
    assert {"accuracy/val_ema_acc1", "accuracy/val_ema_acc5", "val/ema_loss"} <= set(
        events.Tags()["scalars"])
    # One validation pass an epoch serves both networks: TensorBoard has each epoch's numbers.
    for tag, key in (("accuracy/val_ema_acc1", "ema_acc1"), ("accuracy/val_acc1", "acc1")):
        assert [e.value for e in events.Scalars(tag)] == pytest.approx(
            [row[key] for row in results["history"]], abs=1e-4)

    evaluated = run_cli(*V2_SMALL, *ONE_PROCESS, f"dataset.root={image_folder}", "mode=eval",
                        f"model.weights={run / 'checkpoints/last.pt'}", "model.weights_key=ema",
                        f"hydra.run.dir={tmp_path}")
    assert evaluated.returncode == 0, evaluated.stderr
    assert read_results(tmp_path)["final_acc1"] == results["ema_acc1"]
