"""Long runs: SIGTERM checkpoints, mid-epoch resume, retention, disk trouble, mismatched resumes."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import (STATE_BOUND_S, CliProcess, assert_clean_error, paused, read_results,
                      run_cli, start_cli, wait_for)
from imgtrain import cli, preemption, rundir
from imgtrain.config import SchedConfig
from imgtrain.distributed import SHUTDOWN_SECONDS
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


def _last_step(run_dir: Path, epoch: int, steps: int) -> int:
    """The last step of `epoch` (1-based) that train.log has printed (0 before the first)."""
    printed = re.findall(rf"epoch {epoch} \[(\d+)/{steps}\]", (run_dir / "train.log").read_text())
    return int(printed[-1]) if printed else 0


def _signal(proc: CliProcess, sig: signal.Signals, to_group: bool) -> None:
    """To the run's process alone (`kill`), or to its whole process group: every rank and loader
    worker, as SLURM signals a job step's processes and a terminal's Ctrl-C its foreground group."""
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)


def _stop_line(stdout: str, status: str) -> str:
    """The one line a stopped run ends with."""
    lines = [line for line in stdout.splitlines() if line.startswith(f"{status} by ")]
    assert len(lines) == 1, stdout[-3000:]
    return lines[0]


def _new_run_folder(proc: CliProcess, cwd: Path) -> Path:
    """The run folder a command started without hydra.run.dir made under cwd/outputs."""
    wait_for(proc, lambda: list(cwd.glob("outputs/*/*/train.log")), "no run folder with a log")
    return _only_run(cwd)


def _only_run(cwd: Path) -> Path:
    runs = [path for path in cwd.glob("outputs/*/*") if path.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


# SLURM: USR2 (submitit's default preemption signal) to the whole group, as `scancel --signal`
# signals a step's processes: the loader worker gets it too and must ignore it (its default action
# would kill the worker and fail the next batch). The job runs its command without hydra.run.dir
# (SLURM's variables simulated); requeued, the job's same command resumes the job's run folder.
@pytest.mark.parametrize("workers,sig,in_slurm", [(0, signal.SIGTERM, False),
                                                  (1, signal.SIGUSR2, True)])
def test_a_signal_mid_epoch_two_then_resume_gives_the_same_weights(
        straight_run: Path, tmp_path: Path, workers: int, sig: signal.Signals,
        in_slurm: bool) -> None:
    args = [*RUN, f"dataset.workers={workers}"]
    job = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"} if in_slurm else {}
    where = [] if in_slurm else [f"hydra.run.dir={tmp_path / 'stopped'}"]

    proc = start_cli(*args, *where, cwd=tmp_path, env=job)
    stopped = _new_run_folder(proc, tmp_path) if in_slurm else tmp_path / "stopped"
    # Epoch 2's first print point, 8 steps before its end; the run is paused while the test reads
    # where it is and signals it, so that the signal goes at a known step whatever the speed.
    _wait_for_log(proc, stopped, r"epoch 2 \[2/10\]")
    with paused(proc):
        printed = _last_step(stopped, 2, 10)
        assert printed <= 6, f"the run was at epoch 2 step {printed} already"
        _signal(proc, sig, to_group=in_slurm)
    stdout, stderr = proc.communicate(timeout=STATE_BOUND_S)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    saved = torch.load(stopped / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    # One process agrees with itself at every step: it stops at the next one, inside epoch 2
    # (the run was past step `printed`, not yet at the next print point, printed + 2).
    step = saved["state"]["step_in_epoch"]
    assert saved["state"]["epoch"] == 1 and printed <= step <= printed + 2, (printed, step)
    line = _stop_line(stdout, "preempted")
    assert f"by {sig.name} at epoch 2 step {step}; checkpoint saved" in line, line
    assert "exit code 143" in line, line
    assert read_results(stopped)["status"] == "preempted"

    again = run_cli(*args, *where, cwd=tmp_path, env={**job, "SLURM_RESTART_COUNT": "1"} if job
                    else None)
    assert again.returncode == 0, again.stderr
    assert f"resumed from epoch 2 step {step} (restart 1)" in again.stdout
    results = read_results(stopped)
    assert results["status"] == "completed"
    assert results["resumed"] == {"epoch": 2, "step": step, "restart": 1}
    if in_slurm:
        assert _only_run(tmp_path) == stopped and results["slurm_job_id"] == "4242"
        assert "this SLURM job's run (requeued)" in " ".join(again.stdout.split())
    assert _max_diff(straight_run / "checkpoints/last.pt",
                     stopped / "checkpoints/last.pt") <= 1e-6


@pytest.mark.parametrize("sig", preemption.STOP_SIGNALS)
def test_every_stop_signal_is_a_request_and_says_how_the_run_ends(sig: signal.Signals) -> None:
    # Ctrl-C as in a terminal's foreground: pytest started as a background job of a script (`&`
    # without job control) inherits SIGINT ignored, which StopSignals rightly leaves alone.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with preemption.StopSignals() as stop:
            os.kill(os.getpid(), sig)  # handled before kill returns: the signal is to this thread
            assert stop.received == sig
            os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing
            assert stop.received == sig
    finally:
        signal.signal(signal.SIGINT, previous)
    expected = ("interrupted", 130) if sig == signal.SIGINT else ("preempted", 143)
    assert preemption.outcome(sig, 143) == expected
    assert sig.name in preemption.AGENT_SIGNALS  # the elastic agent forwards it to the ranks


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


def test_ctrl_c_twice_stops_at_a_step_and_the_save_stays_whole(straight_run: Path,
                                                               tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it (SIGINT to the foreground process group, the loader worker
    included), and again while the checkpoint is being written."""
    args = [*RUN, "dataset.workers=1"]
    proc = start_cli(*args, cwd=tmp_path)  # the run folder under tmp_path/outputs
    stopped = _new_run_folder(proc, tmp_path)
    _wait_for_log(proc, stopped, r"epoch 2 \[2/10\]")
    with paused(proc):
        printed = _last_step(stopped, 2, 10)
        assert printed <= 6, f"the run was at epoch 2 step {printed} already"
        os.killpg(proc.pid, signal.SIGINT)
    # Ctrl-C again once the stop's checkpoint is being written (its temporary file is there):
    # each look is made with the run paused, so the write seen is still going on when the
    # second Ctrl-C goes. Between looks the run goes on (1 ms).
    again = False
    deadline = time.monotonic() + STATE_BOUND_S
    while not again and proc.poll() is None and time.monotonic() < deadline:
        with paused(proc):
            if any(".tmp-" in p.name for p in (stopped / "checkpoints").glob(".*")):
                os.killpg(proc.pid, signal.SIGINT)
                again = True
        time.sleep(0.001)
    stdout, stderr = proc.communicate(timeout=STATE_BOUND_S)
    assert again, "the run ended before its stop's checkpoint was seen being written"
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    saved = torch.load(stopped / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    step = saved["state"]["step_in_epoch"]
    assert saved["state"]["epoch"] == 1 and printed <= step <= printed + 2, (printed, step)
    line = _stop_line(stdout, "interrupted")
    assert f"at epoch 2 step {saved['state']['step_in_epoch']}; checkpoint saved" in line, line
    assert "to resume" in line and "exit code 130" in line, line
    assert read_results(stopped)["status"] == "interrupted"

    again = run_cli(*args, cwd=tmp_path)  # the same command again resumes the same run
    assert again.returncode == 0, again.stderr
    said = " ".join(again.stdout.split())  # the summary wraps its lines at 80 columns
    assert "the same command's unfinished run; train.resume=new starts a new one" in said
    assert _only_run(tmp_path) == stopped
    assert _max_diff(straight_run / "checkpoints/last.pt",
                     stopped / "checkpoints/last.pt") <= 1e-6


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


# Two processes, 8 steps an epoch of 32 images.
TWO_PROC_RUN = [*RUN, *TWO_PROCS, "dataset.train_size=256", "train.epochs=2"]


@pytest.fixture(scope="module")
def straight_two_procs(module_dir: Path) -> Path:
    """TWO_PROC_RUN trained without interruption (print points change no number)."""
    run_dir = module_dir / "straight_two_procs"
    proc = run_cli(*TWO_PROC_RUN, "dataset.workers=0", "train.print_freq=8",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_usr2_to_every_process_of_a_two_process_run_stops_mid_epoch_then_resumes_exactly(
        straight_two_procs: Path, tmp_path: Path) -> None:
    """As `scancel --signal=USR2` does: the launcher (the elastic agent), both ranks and their
    loader workers all get the signal; the ranks agree on a step (a print point), checkpoint
    and exit with the preempt code."""
    args = [*TWO_PROC_RUN, "dataset.workers=1", "train.print_freq=2"]
    stopped = tmp_path / "stopped"
    proc = _start(args, stopped)
    # Epoch 2's first print point: the ranks agree at steps 2, 4 and 6 (8 ends the last epoch).
    # Paused, rank 0 is past the print of step `printed` and before the next, so both ranks can
    # have passed at most the agreement at `printed`: they stop at it or at the next one.
    _wait_for_log(proc, stopped, r"epoch 2 \[2/8\]")
    with paused(proc):
        printed = _last_step(stopped, 2, 8)
        assert printed <= 4, f"the run was at epoch 2 step {printed} already"
        signalled = time.monotonic()  # the agent's grace (SHUTDOWN_SECONDS) starts after this
        os.killpg(proc.pid, signal.SIGUSR2)
    stdout, stderr = proc.communicate(timeout=STATE_BOUND_S)
    assert proc.returncode == 143, stderr[-3000:]
    # The ranks exit once stopped, not at the agent's SIGKILL: that comes SHUTDOWN_SECONDS after
    # the signal at the earliest, so a run that ended sooner was not ended by it.
    assert time.monotonic() - signalled < SHUTDOWN_SECONDS
    assert "Traceback" not in stderr and "error" not in stderr, stderr[-3000:]
    saved = torch.load(stopped / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    step = saved["state"]["step_in_epoch"]
    assert saved["state"]["epoch"] == 1 and step in (printed, printed + 2), (printed, step)
    assert "by SIGUSR2 at epoch 2 step" in _stop_line(stdout, "preempted")
    assert read_results(stopped)["status"] == "preempted"

    again = run_cli(*args, f"hydra.run.dir={stopped}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert _max_diff(straight_two_procs / "checkpoints/last.pt",
                     stopped / "checkpoints/last.pt") <= 1e-6


@pytest.mark.slow
def test_a_stop_on_an_epochs_last_step_finishes_the_epoch_then_resumes_exactly(
        straight_two_procs: Path, tmp_path: Path) -> None:
    # print_freq = the epoch's 8 steps: two processes agree on a stop only at the epoch's last step.
    args = [*TWO_PROC_RUN, "dataset.workers=0", "train.print_freq=8"]
    straight, stopped = straight_two_procs, tmp_path / "stopped"
    proc = _start(args, stopped)
    # `running` comes from rank 0 once the process group is up, which every rank joins after
    # putting its signal handlers in place. Paused, epoch 1 is not over (its `done` line comes
    # before the ranks agree at its end), so the signal is acted on at the end of epoch 1.
    _wait_for_running(proc, stopped)
    with paused(proc):
        assert "epoch 1 done" not in (stopped / "train.log").read_text()
        proc.send_signal(signal.SIGTERM)  # to the launcher alone: its agent passes it on
    _, stderr = proc.communicate(timeout=STATE_BOUND_S)
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
    """The run folder alone on the command line resumes the run with the overrides it was made
    with; the command line's own values win, and the resume says which differ."""
    tmp_path = _copy_of(one_epoch_run, tmp_path)
    proc = run_cli(f"hydra.run.dir={tmp_path}", "train.epochs=2", "optim.lr=0.01")
    assert proc.returncode == 0, proc.stderr
    said = next(line for line in proc.stdout.splitlines() if "its recorded overrides" in line)
    assert "experiment=quickstart" in said  # taken from the record
    assert "train.epochs=2 (was 1)" in said and "optim.lr=0.01 (was 0.05)" in said
    assert "resumed from epoch 2 step 0 (restart 1)" in proc.stdout
    assert "optim.lr changed from 0.05 to 0.01" in proc.stdout
    assert read_results(tmp_path)["epochs_completed"] == 2
    # Each command's record is kept: the first in .hydra/, the resume in .hydra-2/.
    assert "optim.lr=0.01" not in (tmp_path / ".hydra/overrides.yaml").read_text()
    assert "optim.lr=0.01" in (tmp_path / ".hydra-2/overrides.yaml").read_text()
    saved = torch.load(tmp_path / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["initial_lr"] == 0.01
    # The lr each step used: the new base on the saved position of the (new) schedule.
    sched = SchedConfig(**saved["config"]["sched"])
    used = _lr_points(tmp_path)
    for step in (12, 16, 20):  # epoch 2, printed every 2 steps; step n logs the lr for step n + 1
        assert used[step] == pytest.approx(0.01 * lr_factor(step, 10, sched, 2), rel=1e-5), step


def _lr_points(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir)).Reload()
    return {point.step: point.value for point in events.Scalars("train/lr")}


def test_a_job_requeued_more_than_max_requeues_stops_with_one_line(tmp_path: Path) -> None:
    job = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "3"}  # SLURM's variables, simulated
    proc = run_cli(*RUN, "train.max_requeues=2", f"hydra.run.dir={tmp_path / 'run'}", env=job)
    assert_clean_error(proc, "requeued 3 times", "train.max_requeues=2")
    assert not (tmp_path / "run").exists()  # nothing left behind


def _fake_run(root: Path, name: str, overrides: list[str], status: str | None,
              checkpoint: bool = True) -> Path:
    """A run folder as far as choosing one reads it: the command's record, results.json's status,
    a checkpoint."""
    run = root / "2026-01-01" / f"09-00-0{name}_run"  # the name after the time: the command's
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if status:
        (run / "results.json").write_text(json.dumps({"mode": "train", "status": status}))
    if checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints/last.pt").write_bytes(b"")
    newer = time.time() + len(list(root.glob("*/*")))  # each run made later than the last
    os.utime(run / ".hydra/overrides.yaml", (newer, newer))
    return run


def test_the_same_commands_newest_unfinished_run_is_chosen_and_no_other(tmp_path: Path) -> None:
    command = ["optim.lr=0.1", "train.epochs=3"]
    choose = lambda *overrides: rundir.choose(str(tmp_path), list(overrides),  # noqa: E731
                                              "2026-01-02/10-00-00_run")
    new = str(tmp_path / "2026-01-02/10-00-00_run")
    assert choose(*command) == new  # nothing yet
    other = _fake_run(tmp_path, "a", ["optim.lr=0.2", "train.epochs=3"], "interrupted")
    assert choose(*command) == new  # another command's run
    stopped = _fake_run(tmp_path, "b", command, "interrupted")
    assert choose(*reversed(command)) == str(stopped)  # the same overrides, in any order
    assert choose(*command, "train.resume=new") == new
    with rundir.hold(str(stopped)):  # a command is training in it now
        assert choose(*command) == new
    assert choose(*command) == str(stopped)
    _fake_run(tmp_path, "c", command, "completed")  # the newest is finished: a new run
    assert choose(*command) == new
    assert choose("optim.lr=0.2", "train.epochs=3") == str(other)
    _fake_run(tmp_path, "d", ["optim.lr=0.2", "train.epochs=3"], "running", checkpoint=False)
    assert choose("optim.lr=0.2", "train.epochs=3") == new  # nothing to resume from


def test_ctrl_c_while_the_command_starts_is_one_line_and_leaves_no_run_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during Hydra's start (torch's import, the config), before any handler of
    preemption.py: run.py's wrapper ends it without a traceback."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # run_main sets it for Hydra; restored after
    new = Path(rundir.choose(str(tmp_path / "outputs"), ["optim.lr=0.1"], "2026-01-01/10-00_x"))
    (new / ".hydra").mkdir(parents=True)  # what Hydra has made by then

    def interrupted_start() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as ended:
        cli.run_main(interrupted_start)
    assert ended.value.code == 130
    assert capsys.readouterr().err == ("interrupted by SIGINT before training started; nothing "
                                       "to resume (exit code 130)\n")
    assert not new.exists() and not new.parent.exists()


def test_a_group_chosen_on_the_command_line_replaces_the_records_keys_under_it(
        tmp_path: Path) -> None:
    """`world=1p` on the command line chooses the world anew: the record's
    `world.nproc_per_node=2` would otherwise still start two processes."""
    from imgtrain import rundir

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra/overrides.yaml").write_text(
        "- world=8p\n- world.nproc_per_node=2\n- optim.lr=0.05\n")
    argv, note = rundir.with_recorded_overrides([f"hydra.run.dir={tmp_path}", "world=1p"])
    assert argv == ["optim.lr=0.05", f"hydra.run.dir={tmp_path}", "world=1p"]
    assert "world=1p (was 8p)" in note and "world=1p (instead of world.nproc_per_node=2)" in note
