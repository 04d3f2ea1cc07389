"""Long runs: SIGTERM checkpoints, mid-epoch resume, retention, disk trouble, mismatched resumes."""
from __future__ import annotations

import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import (CliProcess, assert_clean_error, read_results, run_cli, start_cli,
                      wait_for)
from imgtrain.optim import lr_factor

# A stable configuration (lr 0.05): equal weights then really mean the same computation was replayed.
# 10 steps an epoch, of 16 images: what is checked is where a run stops and what it resumes to.
RUN = ["experiment=quickstart", "device=cpu", "dataset.train_size=160", "train.batch_size=16",
       "dataset.val_size=32", "train.epochs=2", "train.print_freq=2", "optim.lr=0.05"]
TWO_PROCS = ["world=8p", "world.nproc_per_node=2", "world.start_method=fork", "train.batch_size=32"]


@pytest.fixture(scope="module")
def one_epoch_run(module_dir: Path) -> Path:
    """A finished 1-epoch run of RUN, trained once for the tests that resume from it."""
    run_dir = module_dir / "one_epoch"
    assert run_cli(*RUN, "train.epochs=1", f"hydra.run.dir={run_dir}").returncode == 0
    return run_dir


@pytest.fixture(scope="module")
def straight_run(module_dir: Path) -> Path:
    """RUN trained without interruption: the weights every stopped-and-resumed RUN must end with
    (print points, checkpoints and loader workers change no number of the training)."""
    run_dir = module_dir / "straight"
    assert run_cli(*RUN, "dataset.workers=0", f"hydra.run.dir={run_dir}").returncode == 0
    return run_dir


def _copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_diff(a: Path, b: Path) -> float:
    x, y = _model(a), _model(b)
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x if x[k].numel())


def _start(args: list[str], run_dir: Path) -> CliProcess:
    return start_cli(*args, f"hydra.run.dir={run_dir}")


def _wait_for_running(proc: CliProcess, run_dir: Path) -> None:
    """Until results.json says `running`: written just before training starts."""
    wait_for(proc, lambda: '"running"' in (run_dir / "results.json").read_text(),
              "results.json never said running")


def _wait_for_log(proc: CliProcess, run_dir: Path, pattern: str) -> None:
    """Until train.log has a line matching `pattern` (progress lines come every print_freq steps)."""
    wait_for(proc, lambda: re.search(pattern, (run_dir / "train.log").read_text()),
              f"no {pattern!r} in train.log")


@pytest.mark.parametrize("workers,sig", [(0, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_a_signal_mid_epoch_two_then_resume_gives_the_same_weights(
        straight_run: Path, tmp_path: Path, workers: int, sig: signal.Signals) -> None:
    args = [*RUN, f"dataset.workers={workers}"]
    straight, stopped = straight_run, tmp_path / "stopped"

    proc = _start(args, stopped)
    _wait_for_log(proc, stopped, r"epoch 2 \[4/10\]")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "preempted" in stderr and "Traceback" not in stderr
    saved = torch.load(stopped / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    # One process agrees with itself at every step: it stops at the next one, inside epoch 2.
    assert saved["state"]["epoch"] == 1 and 4 <= saved["state"]["step_in_epoch"] < 10
    assert read_results(stopped)["status"] == "preempted"

    again = run_cli(*args, f"hydra.run.dir={stopped}")
    assert again.returncode == 0, again.stderr
    assert _max_diff(straight / "checkpoints/last.pt", stopped / "checkpoints/last.pt") <= 1e-6


def test_sigkill_loses_at_most_the_steps_since_the_last_checkpoint(straight_run: Path,
                                                                   tmp_path: Path) -> None:
    args = [*RUN, "dataset.workers=0", "train.print_freq=1", "train.checkpoint_every_steps=3"]
    straight, killed = straight_run, tmp_path / "killed"

    proc = _start(args, killed)
    _wait_for_log(proc, killed, r"epoch 2 \[5/10\]")  # global step 15: one step past a checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # print_freq=1: one progress line per finished step, written just before that step's checkpoint.
    steps_done = len(re.findall(r"\[\d+/10\]", (killed / "train.log").read_text()))
    saved = torch.load(killed / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert steps_done - saved["state"]["global_step"] <= 3  # at most one checkpoint interval lost

    assert run_cli(*args, f"hydra.run.dir={killed}").returncode == 0
    assert _max_diff(straight / "checkpoints/last.pt", killed / "checkpoints/last.pt") <= 1e-6


def test_a_second_signal_during_the_save_changes_nothing(straight_run: Path,
                                                         tmp_path: Path) -> None:
    args = [*RUN, "dataset.workers=0"]
    straight, stopped = straight_run, tmp_path / "stopped"
    proc = _start(args, stopped)
    _wait_for_log(proc, stopped, r"epoch 2 \[2/10\]")
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".tmp-" in p.name for p in
                                             (stopped / "checkpoints").glob(".*")):
        time.sleep(0.001)  # until the preemption checkpoint is being written
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    saved = torch.load(stopped / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert saved["state"]["epoch"] == 1 and saved["state"]["step_in_epoch"] > 0
    assert run_cli(*args, f"hydra.run.dir={stopped}").returncode == 0
    assert _max_diff(straight / "checkpoints/last.pt", stopped / "checkpoints/last.pt") <= 1e-6


def test_checkpoint_every_minutes_writes_mid_epoch_checkpoints(tmp_path: Path) -> None:
    # 0.0005 minutes = 30 ms: shorter than a step, so each step of one process is due one.
    proc = run_cli(*RUN, "train.epochs=1", "train.checkpoint_every_minutes=0.0005",
                   "train.keep_checkpoints=100", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    steps = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert steps and steps[0] <= 2 and len(steps) >= 5, steps


def test_weights_that_are_not_finite_are_never_checkpointed(tmp_path: Path) -> None:
    proc = run_cli(*RUN, "train.epochs=1", "optim.lr=1e30", "sched.warmup_epochs=0",
                   "train.checkpoint_every_steps=1", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, "training diverged", "optim.lr=1e+30")
    saved = torch.load(tmp_path / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert saved["state"]["global_step"] >= 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert read_results(tmp_path)["status"] == "failed"


@pytest.mark.slow
def test_a_stop_on_an_epochs_last_step_finishes_the_epoch_then_resumes_exactly(
        tmp_path: Path) -> None:
    # print_freq = the epoch's 8 steps: two processes agree on a stop only at the epoch's last step.
    args = [*RUN, *TWO_PROCS, "dataset.train_size=256", "dataset.workers=0", "train.epochs=2",
            "train.print_freq=8"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    proc = run_cli(*args, f"hydra.run.dir={straight}")
    assert proc.returncode == 0, proc.stderr[-2000:]

    proc = _start(args, stopped)
    _wait_for_running(proc, stopped)
    time.sleep(0.5)  # every rank's signal handlers are in place; the epoch takes seconds more
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 143, stderr[-3000:]
    assert read_results(stopped)["status"] == "preempted"
    saved = torch.load(stopped / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert (saved["state"]["epoch"], saved["state"]["step_in_epoch"]) == (1, 0)  # epoch 1 finished
    assert len(saved["state"]["history"]) == 1  # and evaluated

    again = run_cli(*args, f"hydra.run.dir={stopped}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert _max_diff(straight / "checkpoints/last.pt", stopped / "checkpoints/last.pt") <= 1e-6


def test_retention_keeps_exactly_n(tmp_path: Path) -> None:
    proc = run_cli(*RUN, "train.epochs=2", "train.checkpoint_every_steps=2",
                   "train.keep_checkpoints=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    numbered = sorted(p.name for p in (tmp_path / "checkpoints").glob("*-*.pt"))
    assert len(numbered) == 3, numbered
    assert numbered == ["epoch-2.pt", "step-16.pt", "step-18.pt"]  # the newest three
    assert (tmp_path / "checkpoints/last.pt").is_file() and (tmp_path / "checkpoints/best.pt").is_file()


@pytest.mark.parametrize("policy", ["fail", "warn"])
def test_failed_checkpoint_write_keeps_the_previous_checkpoint(one_epoch_run: Path, tmp_path: Path,
                                                              policy: str) -> None:
    tmp_path = _copy_of(one_epoch_run, tmp_path)
    before = (tmp_path / "checkpoints/last.pt").read_bytes()
    # A real write failure: no file may grow past 1 MB (a checkpoint is ~90 MB), as on a full disk.
    proc = run_cli(*RUN, "train.epochs=2", f"train.on_checkpoint_error={policy}",
                   f"hydra.run.dir={tmp_path}", max_file_bytes=1 << 20)
    if policy == "fail":
        assert_clean_error(proc, "checkpoint write", "previous checkpoint is kept")
    else:
        assert proc.returncode == 0, proc.stderr
        assert "checkpoint write" in proc.stdout + proc.stderr
    assert (tmp_path / "checkpoints/last.pt").read_bytes() == before
    assert _model(tmp_path / "checkpoints/last.pt")  # still loads
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("change,fragment", [("model=resnet34", "arch=resnet18"),
                                             ("train.batch_size=32", "global_batch_size=16"),
                                             ("dataset.num_classes=5", "num_classes=10")])
def test_mismatched_resume_is_refused(one_epoch_run: Path, tmp_path: Path, change: str,
                                      fragment: str) -> None:
    run_dir = _copy_of(one_epoch_run, tmp_path)
    before = (run_dir / "checkpoints/last.pt").read_bytes()
    proc = run_cli(*RUN, "train.epochs=2", change, f"hydra.run.dir={run_dir}")
    assert_clean_error(proc, "cannot resume", fragment)
    assert (run_dir / "checkpoints/last.pt").read_bytes() == before


def test_changed_lr_on_resume_is_applied_and_logged(one_epoch_run: Path, tmp_path: Path) -> None:
    tmp_path = _copy_of(one_epoch_run, tmp_path)
    proc = run_cli(*RUN, "train.epochs=2", "optim.lr=0.01", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "optim.lr changed from 0.05 to 0.01" in proc.stdout
    # Each command's record is kept: the first in .hydra/, the resume in .hydra-2/.
    assert "optim.lr=0.01" not in (tmp_path / ".hydra/overrides.yaml").read_text()
    assert "optim.lr=0.01" in (tmp_path / ".hydra-2/overrides.yaml").read_text()
    saved = torch.load(tmp_path / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["initial_lr"] == 0.01
    # The lr each step used: the new base on the saved position of the (new) schedule.
    sched = saved["config"]["sched"]
    used = _lr_points(tmp_path)
    for step in (12, 16, 20):  # epoch 2, printed every 2 steps; step n logs the lr for step n + 1
        assert used[step] == pytest.approx(0.01 * lr_factor(step, 10, sched, 2), rel=1e-5), step


def _lr_points(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir)).Reload()
    return {point.step: point.value for point in events.Scalars("train/lr")}
