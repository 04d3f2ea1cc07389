"""Real multi-process runs with gloo on the CPU, launched by torch.distributed's elastic engine."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from conftest import (REPO, STATE_BOUND_S, assert_clean_error, paused, read_results, run_cli,
                      start_cli, wait_for)
from imgtrain import distributed, jobenv
from imgtrain.config import WorldConfig
from imgtrain.errors import ConfigError
from imgtrain.resolve import resolve

SYNTH = ["experiment=quickstart", "device=cpu", "train.print_freq=4", "dataset.val_size=101",
         "dataset.train_size=512", "train.batch_size=32",
         "dataset.noise=1.0"]  # the easy task: 32 steps reach well above chance
TWO_PROCS = ["world=8p", "world.nproc_per_node=2", *SYNTH]
# Most multi-process tests fork their CPU ranks (world.start_method=fork): the same training,
# without each rank importing torch again. Spawn, the default, still starts the ranks of
# test_a_crashing_worker... (start-up, steps, the failed rank's error through the agent);
# torchrun starts its own.
FORKED = [*TWO_PROCS, "world.start_method=fork"]
WORLD_1P = {"nproc_per_node": 1, "nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1",
            "master_port": None, "max_restarts": 0, "start_method": "spawn", "gres": None}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_process_run(module_dir: Path) -> Path:
    run_dir = module_dir / "ddp"
    proc = run_cli(*FORKED, "train.epochs=2", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir


def test_two_process_run_trains_and_counts_every_val_sample_once(two_process_run: Path) -> None:
    results = read_results(two_process_run)
    assert results["status"] == "completed"
    assert results["world_size"] == 2 and results["global_batch_size"] == 32
    assert results["val_samples"] == 101  # odd-sized: no padding duplicates, no drops
    assert results["best_acc1"] >= 30, results  # chance is 10
    # One output directory, written by rank 0 only.
    assert len(list(two_process_run.glob("events.out.tfevents.*"))) == 1


def test_one_checkpoint_gives_the_same_acc1_on_one_and_two_processes(two_process_run: Path,
                                                                      tmp_path: Path) -> None:
    # A confidently trained checkpoint: float differences between batchings cannot flip its argmax,
    # so any difference in Acc@1 would be a sample dropped or counted twice.
    weights = two_process_run / "checkpoints" / "last.pt"
    acc1 = {}
    for world in ("1p", "8p"):
        proc = run_cli(f"world={world}", "world.nproc_per_node=" + ("1" if world == "1p" else "2"),
                       "world.start_method=fork", *SYNTH, "mode=eval", f"model.weights={weights}",
                       f"hydra.run.dir={tmp_path / world}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = read_results(tmp_path / world)
        assert results["val_samples"] == 101
        acc1[world] = results["final_acc1"]
    assert acc1["1p"] == acc1["8p"]


def test_two_machines_on_loopback_train_one_model(tmp_path: Path) -> None:
    port = distributed.free_port()
    common = [*SYNTH, "world=8p", "world.nproc_per_node=1", "world.start_method=fork",
              "world.nnodes=2", "world.master_addr=127.0.0.1", f"world.master_port={port}",
              "train.epochs=1", "dataset.train_size=128"]  # 4 steps: what is checked is who writes
    nodes = [start_cli(*common, f"world.node_rank={rank}",
                       f"hydra.run.dir={tmp_path / f'node{rank}'}") for rank in (0, 1)]
    outputs = ["".join(node.communicate(timeout=STATE_BOUND_S)) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    written = [read_results(tmp_path / f"node{r}") for r in (0, 1)
               if (tmp_path / f"node{r}" / "results.json").exists()]
    assert len(written) == 1  # global rank 0 alone writes
    assert written[0]["world_size"] == 2 and written[0]["status"] == "completed"
    assert written[0]["global_batch_size"] == 32


def _processes_tagged(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _logged_at(line: str) -> float:
    """The time of a train.log line (its time stamp, to the millisecond)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_a_crashing_worker_brings_the_run_down_without_hanging(tmp_path: Path) -> None:
    tag = f"IMGTRAIN_TEST_TAG={uuid.uuid4().hex}"
    proc = run_cli(*TWO_PROCS, "train.epochs=1", "train.fault_at_step=2", "train.fault_rank=1",
                   f"hydra.run.dir={tmp_path}", env=dict([tag.split("=", 1)]))
    ended = time.time()
    # Not hanging: the rank left alone stopped by itself, and not at the agent's SIGKILL, which
    # comes SHUTDOWN_SECONDS after the crash at the earliest (or at the process group's timeout).
    # The crash came after train.log's first line (its start summary).
    started = _logged_at((tmp_path / "train.log").read_text().splitlines()[0])
    assert ended - started < distributed.SHUTDOWN_SECONDS, ended - started
    # A crash is a bug, not a user mistake: its traceback is shown once, then the error line.
    assert proc.returncode != 0
    assert "error: RuntimeError: injected fault at step 2 on rank 1" in proc.stderr.splitlines()
    assert proc.stderr.count("Traceback") == 1, proc.stderr
    assert read_results(tmp_path)["status"] == "failed"
    # No worker left behind: each of the run's processes ends with it (an exiting one may still
    # be listed a moment; one left running would stay).
    deadline = time.monotonic() + 60
    while _processes_tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_tagged(tag) == []


def test_max_restarts_restarts_a_dead_worker_and_resumes(tmp_path: Path) -> None:
    marker = tmp_path / "fault-fired"
    run_dir, temp = tmp_path / "run", tmp_path / "temp"
    temp.mkdir()
    # 8 steps per epoch: the fault hits in epoch 2, after epoch 1's checkpoint.
    proc = run_cli(*FORKED, "dataset.train_size=256", "train.epochs=2", "world.max_restarts=1",
                   "train.fault_at_step=10",
                   f"train.fault_once_file={marker}", f"hydra.run.dir={run_dir}",
                   env={"TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert marker.exists()
    assert not list(temp.glob("torchelastic_*"))  # the agent's files went with the launch
    assert "resumed from epoch" in (run_dir / "train.log").read_text()
    results = read_results(run_dir)
    assert results["status"] == "completed" and results["epochs_completed"] == 2


def test_batch_that_does_not_divide_is_refused(tmp_path: Path) -> None:
    proc = run_cli(*TWO_PROCS, "train.batch_size=33", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, "train.batch_size=33", "2 processes")


def test_node_rank_out_of_range_is_refused(tmp_path: Path) -> None:
    proc = run_cli(*TWO_PROCS, "world.nnodes=2", "world.node_rank=2", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, "world.node_rank=2")


def test_master_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(*TWO_PROCS, f"world.master_port={port}", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, f"world.master_port={port}", "in use")


def _port_in_time_wait() -> int:
    """A port whose last connection sits in TIME_WAIT, as a job's port does for 60 s after the
    job ends: the side that closes first keeps it, here the listening side's."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()
        time.sleep(0.2)  # the client reads the FIN before it closes its side
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the port check did before: refused
    return port


def test_a_port_in_time_wait_is_taken_as_torchs_store_takes_it(tmp_path: Path) -> None:
    port = _port_in_time_wait()
    proc = run_cli(*FORKED, "train.epochs=1", "dataset.train_size=64",
                   f"world.master_port={port}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert read_results(tmp_path)["status"] == "completed"


def test_start_method_is_checked_and_fork_is_for_cpu_ranks(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    proc = run_cli(*TWO_PROCS, "world.start_method=thread", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, "world.start_method=thread", "spawn, fork, forkserver")
    assert not (tmp_path / "run").exists()
    job = jobenv.plan_job(WorldConfig(**{**WORLD_1P, "start_method": "fork"}))
    distributed.check_world(job, "cpu", 256)
    monkeypatch.setattr(distributed, "visible_count", lambda name: 1)  # no GPU or NPU here
    for accelerator in ("gpu", "npu"):
        with pytest.raises(ConfigError, match="world.start_method=fork needs device=cpu"):
            distributed.check_world(job, accelerator, 256)


def test_more_processes_than_visible_devices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: the device count is the one thing faked, the check itself is real.
    monkeypatch.setattr(distributed, "visible_count", lambda name: 4)
    with pytest.raises(ConfigError, match="only 4 GPU"):
        eight = WorldConfig(**{**WORLD_1P, "nproc_per_node": 8})
        distributed.check_world(jobenv.plan_job(eight), "gpu", 2048)


def test_torchrun_environment_makes_the_process_that_rank(monkeypatch: pytest.MonkeyPatch,
                                                          compose) -> None:
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    assert jobenv.started_by_torchrun()
    assert distributed.world_from_env() == distributed.World(3, 1, 4, 2)
    plan = resolve(compose(*SYNTH, "world=8p", "world.nproc_per_node=8"), [])
    job = plan.job
    assert (job.launcher, job.world_size, job.launches_ranks) == ("torchrun", 4, False)
    calls = []
    distributed.launch(lambda plan, out: calls.append((plan, out)), plan, "/tmp/x")
    assert calls == [(plan, "/tmp/x")]  # ran in-process: no second launch




def test_an_external_torchrun_launch_uses_one_run_directory(tmp_path: Path) -> None:
    # Microseconds in the directory name: ranks resolving their own time would each get one.
    # One validation image: rank 1 has no validation batch, so evaluation must not need it.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "run.py"), *SYNTH, "train.epochs=1", "dataset.train_size=128",  # 4 steps
         "dataset.val_size=1",
         "hydra.run.dir=outputs/run-${imgtrain.now:%H-%M-%S-%f}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=STATE_BOUND_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    results = read_results(run_dirs[0])
    assert results["status"] == "completed" and results["world_size"] == 2
    assert results["val_samples"] == 1
    assert sorted(p.name for p in run_dirs[0].glob(".hydra*")) == [".hydra"]  # rank 0's record


_TRACE_SAMPLES = """
import os
if os.environ.get("IMGTRAIN_TEST_TRACE"):
    # Test-only: every training sample the synthetic dataset is asked for, in order, by rank.
    from imgtrain.data import synthetic

    original = synthetic.Synthetic.__getitems__

    def traced(self, items):
        if self.train:
            name = f"rank{os.environ.get('RANK', '0')}.txt"
            with open(os.path.join(os.environ["IMGTRAIN_TEST_TRACE"], name), "a") as f:
                f.write("".join(f"{index}\\n" for index, _seed in items))
        return original(self, items)

    synthetic.Synthetic.__getitems__ = traced
"""


def test_a_run_stopped_on_two_processes_resumes_on_one_seeing_each_sample_once(
        tmp_path: Path) -> None:
    """Elastic resume: the same global batch on fewer processes continues the epoch exactly."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_TRACE_SAMPLES)
    run_dir, first, second = tmp_path / "run", tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "IMGTRAIN_TEST_TRACE": str(first)}
    # 8 steps an epoch, agreed on every 2 (the later override wins): a stop after step 2 of
    # epoch 2 lands inside it.
    size = "dataset.train_size=256"
    proc = start_cli(*FORKED, "train.print_freq=2", size, "train.epochs=2", "dataset.workers=0",
                     f"hydra.run.dir={run_dir}", env=env)
    wait_for(proc, lambda: re.search(r"epoch 2 \[2/8\]", (run_dir / "train.log").read_text()),
             "no epoch 2 [2/8] in train.log")
    with paused(proc):  # where the run is, read while it stays there: an agreement is ahead
        printed = re.findall(r"epoch 2 \[(\d)/8\]", (run_dir / "train.log").read_text())[-1]
        assert int(printed) <= 4, f"the run was at epoch 2 step {printed} already"
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=STATE_BOUND_S)
    assert proc.returncode == 143, stderr[-3000:]

    again = run_cli("world=1p", *SYNTH, size, "train.epochs=2", "dataset.workers=0",
                    f"hydra.run.dir={run_dir}", env={**env, "IMGTRAIN_TEST_TRACE": str(second)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_results(run_dir)["epochs_completed"] == 2

    per_rank = [[int(i) for i in (first / f"rank{r}.txt").read_text().split()] for r in (0, 1)]
    resumed = [int(i) for i in (second / "rank0.txt").read_text().split()]
    epoch_per_rank = 256 // 2
    epoch1 = per_rank[0][:epoch_per_rank] + per_rank[1][:epoch_per_rank]
    epoch2 = per_rank[0][epoch_per_rank:] + per_rank[1][epoch_per_rank:] + resumed
    assert 0 < len(per_rank[0]) - epoch_per_rank < epoch_per_rank  # stopped inside epoch 2
    assert sorted(epoch1) == list(range(256))
    assert sorted(epoch2) == list(range(256))  # each sample exactly once across the two runs
