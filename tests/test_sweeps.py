"""Real `python run.py -m` sweeps: job folders, HParams in each run's events, failures, launchers."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import TINY, read_results, run_cli

# Quickstart, shrunk: one short epoch of 32 px images per job, 2 steps of 16.
QUICK = ["experiment=quickstart", *TINY, "train.epochs=1", "dataset.train_size=256",
         "dataset.val_size=64", "dataset.image_size=32", "train.steps_per_epoch=2",
         "train.batch_size=16"]
# The main settings by config key, resolved (the swept optim.lr among them; amp=, model= and
# device= as amp.level, model.arch and device), then the other override keys.
MAIN_COLUMNS = {"experiment", "model.arch", "dataset.name", "device", "world_size",
                "train.batch_size", "optim.lr", "optim.weight_decay", "sched.name",
                "sched.warmup_epochs", "train.epochs", "amp.level"}
HPARAM_NAMES = MAIN_COLUMNS | {"train.print_freq", "dataset.workers", "dataset.train_size",
                               "dataset.val_size", "dataset.image_size", "train.steps_per_epoch"}
LRS = ("0.1", "0.2", "0.4")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders, in job order (their names start with the job number)."""
    jobs = [path for path in sweep_dir.iterdir() if path.is_dir() and path.name[0].isdigit()]
    return sorted(jobs, key=lambda path: int(path.name.split("_", 1)[0]))


def sweep(sweep_dir: Path, *overrides: str, timeout: float = 300):
    return run_cli("-m", *QUICK, *overrides, f"hydra.sweep.dir={sweep_dir}", timeout=timeout)


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgtrain.report", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def lr_sweep(module_dir: Path) -> Path:
    sweep_dir = module_dir / "lr_sweep"
    proc = sweep(sweep_dir, f"optim.lr={','.join(LRS)}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sweep_dir


def test_each_job_is_a_complete_run_in_a_short_folder_named_by_its_point(lr_sweep: Path) -> None:
    jobs = job_dirs(lr_sweep)
    assert len(jobs) == 3, [job.name for job in jobs]
    # <job num>_<short name>: the experiment and the overrides given besides it, abbreviated,
    # within 60 characters; the points tell apart without their job numbers.
    assert len({job.name.partition("_")[2] for job in jobs}) == 3, [job.name for job in jobs]
    for number, (job, lr) in enumerate(zip(jobs, LRS)):
        assert job.name.startswith(f"{number}_quickstart_") and f"_lr{lr}_" in job.name, job.name
        assert len(job.name) <= 60 and "=" not in job.name and "," not in job.name, job.name
        results = read_results(job)
        assert results["status"] == "completed" and results["epochs_completed"] == 1
        assert results["lr"] == float(lr) and f"optim.lr={lr}" in results["overrides"]
        assert (job / "checkpoints" / "last.pt").is_file()
        assert list(job.glob("events.out.tfevents.*"))


def _hparams_plugin_data(run_dir: Path) -> dict:
    """The HParams summaries of the event files directly in run_dir, via TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    # No experiment summary: TensorBoard builds the columns from every run's (test_tensorboard).
    assert metadata.EXPERIMENT_TAG not in content
    return {"start": metadata.parse_session_start_info_plugin_data(
                content[metadata.SESSION_START_INFO_TAG]),
            "val_acc1": events.Scalars("accuracy/val_acc1")}


def test_hparams_are_in_each_runs_own_event_file(lr_sweep: Path) -> None:
    for job, lr in zip(job_dirs(lr_sweep), map(float, LRS)):
        # add_hparams' pitfall would add a timestamped sub-run: every event file is the job's own.
        assert [path.parent for path in job.rglob("events.out.tfevents.*")] == [job]
        data = _hparams_plugin_data(job)
        hparams = data["start"].hparams
        assert set(hparams) == HPARAM_NAMES
        # The Trial ID: the job's folder with its sweep's (its time, for outputs/multirun/...).
        assert data["start"].group_name == f"{lr_sweep.name}/{job.name}"
        assert hparams["optim.lr"].number_value == pytest.approx(lr)
        assert hparams["model.arch"].string_value == "resnet18"
        assert hparams["amp.level"].string_value == "O0"
        assert hparams["experiment"].string_value == "quickstart"
        assert hparams["dataset.name"].string_value == "synthetic"
        assert hparams["device"].string_value == "cpu" and hparams["world_size"].number_value == 1
        assert hparams["train.epochs"].number_value == 1
        assert hparams["train.batch_size"].number_value == 16
        results = read_results(job)
        assert data["val_acc1"][-1].value == pytest.approx(results["final_acc1"])


def test_report_prints_both_jobs_with_their_lr(lr_sweep: Path) -> None:
    proc = run_report(str(lr_sweep))
    assert proc.returncode == 0, proc.stderr
    header, _, *rows = [[cell.strip() for cell in line.strip("| ").split(" | ")]
                        for line in proc.stdout.splitlines()]
    assert header[:8] == ["Run", "DEVICE", "PyTorch", "Acc@1", "FPS", "Epochs", "AMP_Type",
                          "optim.lr"]
    assert "Status" not in header  # every run completed
    assert [row[7] for row in rows] == list(LRS)
    for row, job in zip(rows, job_dirs(lr_sweep)):
        results = read_results(job)
        assert row[0] == job.name  # the job's folder, relative to the sweep searched
        assert row[1:7] == ["1p-CPU", results["torch_version"].split("+")[0],
                           f"{results['best_acc1']:.3f}", f"{results['images_per_sec']:.3f}",
                           "1", "O0"]


def test_a_sweep_jobs_folder_is_found_by_resume_eval_and_the_report(lr_sweep: Path,
                                                                    tmp_path: Path) -> None:
    job = job_dirs(lr_sweep)[1]
    # Resume by its folder alone: its recorded overrides, and it is complete.
    again = run_cli(f"hydra.run.dir={job}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to train" in again.stdout + again.stderr, again.stdout
    # Eval by the folder (model.weights=<run>: its best.pt), in a folder named after it.
    evaluated = run_cli(*QUICK, "mode=eval", f"model.weights={job}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    [eval_dir] = (tmp_path / "outputs").glob("*/*")
    assert eval_dir.name.partition("_")[2].startswith(f"eval_{job.name[:24]}"), eval_dir
    assert read_results(eval_dir)["final_acc1"] == read_results(job)["best_acc1"]
    proc = run_report(str(tmp_path / "outputs"), str(lr_sweep))
    assert proc.returncode == 0, proc.stderr
    assert job.name in proc.stdout and eval_dir.name in proc.stdout


def test_failed_jobs_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    # Job order: NaN loss (lr 1e30), crashed worker, the good job, crashed worker.
    proc = sweep(tmp_path, "optim.lr=1e30,0.1", "train.fault_at_step=null,1")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    jobs = job_dirs(tmp_path)
    assert len(jobs) == 4, [job.name for job in jobs]
    diverged, crashed, good, crashed_too = (read_results(job) for job in jobs)
    assert good["status"] == "completed" and good["epochs_completed"] == 1, good
    assert diverged["status"] == "failed" and "diverged" in diverged["error"], diverged
    assert "nan" in diverged["error"] or "inf" in diverged["error"]
    for crash in (crashed, crashed_too):
        assert crash["status"] == "failed" and "injected fault at step 1" in crash["error"], crash
    assert "error: training diverged" in proc.stderr
    # The first failure, as one line: not framed by Hydra's "Error executing job" and hint.
    assert "Error executing job" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: training diverged")
    assert "(sweep job: " in proc.stderr.strip().splitlines()[-1]
    assert not list((jobs[0] / "checkpoints").glob("*.pt"))  # no NaN weights left to resume from
    report = run_report(str(tmp_path))
    assert report.returncode == 0, report.stderr
    statuses = [line.rsplit(" | ", 1)[1].rstrip("| ") for line in report.stdout.splitlines()[2:]]
    assert statuses[2] == "completed"
    assert statuses[0].startswith("failed: training diverged")
    assert statuses[1].startswith("failed: RuntimeError: injected fault")


@pytest.mark.slow
def test_multi_process_job_finishes_before_the_next_starts(tmp_path: Path) -> None:
    # Forked ranks (spawn, the default, is tested by test_distributed's two-process run).
    proc = sweep(tmp_path, "world.nproc_per_node=2", "world.start_method=fork", "optim.lr=0.1,0.2",
                 timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = job_dirs(tmp_path)
    for job in (first, second):
        results = read_results(job)
        assert results["status"] == "completed" and results["world_size"] == 2, results
    # The second job's log starts only after the first job logged its end.
    first_log = (first / "train.log").read_text().splitlines()
    assert len([line for line in first_log if " done in " in line]) == 1
    assert first_log[-1].endswith("best.pt")  # the end summary closes the log
    assert _logged_at(first_log[-1]) <= _logged_at((second / "train.log").read_text())


def _logged_at(line: str) -> datetime:
    """The time stamp that starts each train.log line (logging's asctime)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def _needs(module: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no Hydra plugin at all: the hydra_plugins namespace is missing
        found = False
    if not found:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def test_joblib_launcher_runs_a_sweep_over_groups_in_parallel(tmp_path: Path) -> None:
    _needs("hydra_plugins.hydra_joblib_launcher")
    proc = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 "model=resnet18,resnet34")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Joblib.Parallel" in proc.stdout + proc.stderr
    jobs = job_dirs(tmp_path)
    assert [read_results(job)["arch"] for job in jobs] == ["resnet18", "resnet34"]
    assert all(read_results(job)["status"] == "completed" for job in jobs)


def test_submitit_local_launcher_runs_a_sweep(tmp_path: Path) -> None:
    _needs("hydra_plugins.hydra_submitit_launcher")
    proc = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                 "optim.lr=0.1,0.2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = job_dirs(tmp_path)
    assert len(jobs) == 2
    for job, lr in zip(jobs, (0.1, 0.2)):
        results = read_results(job)
        assert results["status"] == "completed" and results["lr"] == lr, results
    assert list((tmp_path / ".submitit").rglob("*_log.out"))  # submitit's own job logs


def test_optuna_maximises_the_best_acc1_that_each_run_returns(tmp_path: Path) -> None:
    _needs("hydra_plugins.hydra_optuna_sweeper")
    proc = sweep(tmp_path, "hydra/sweeper=optuna_lr_wd", "hydra.sweeper.n_trials=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    runs = [read_results(job) for job in job_dirs(tmp_path)]
    assert len(runs) == 2 and all(run["status"] == "completed" for run in runs)
    assert summary["best_value"] == pytest.approx(max(run["best_acc1"] for run in runs))
    for run in runs:
        searched = {key: float(value) for key, value in
                    (override.split("=", 1) for override in run["overrides"])
                    if key in ("optim.lr", "optim.weight_decay")}
        assert set(searched) == {"optim.lr", "optim.weight_decay"}
        assert 0.01 <= searched["optim.lr"] <= 1.0
        assert 1e-5 <= searched["optim.weight_decay"] <= 1e-3
