"""Against a real SLURM (two nodes on this machine, tests/slurm/cluster.py): sweeps through the
scheduler, a cancelled job, preemption by SIGUSR2 (submitit's) and by SIGUSR1 (the sbatch
template's) that requeue themselves and resume exactly, and a two-node job.

Every run is submitted at once by one module fixture, which then sends the signals when the
runs reach the chosen step; each test waits for its own run (bounded) and checks its outcome.
What the tests wait on is a state (a step in train.log, a result, SLURM's job state), never a
time: the bound is for a run that never gets there. No `sacct` here (no accounting database):
the launcher reads the states from `scontrol`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from omegaconf import OmegaConf

from conftest import (CONF, REPO, STATE_BOUND_S, TINY, assert_clean_error, read_results, run_cli,
                      start_cli)
from hydra_plugins.imgtrain_slurm.launcher import ImgtrainSlurmLauncher
from imgtrain import slurm as imgtrain_slurm  # also registers the config schema
from imgtrain.config import WorldConfig
from imgtrain.jobenv import Job, plan_job

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from cluster import Cluster, why_not  # noqa: E402

STEPS = 12
# resnet18 on 32 px synthetic images, one epoch of STEPS steps: a stop in the middle of the
# epoch, and one loader worker (a step's signal reaches it too, and must not kill it). A signal
# goes once step 2 (cancel: 1) is printed; the run acts on it at its next step, which must come
# before the epoch's last: scancel's way to the job's processes has 9 steps' time.
RUN = ["experiment=quickstart", *TINY, "dataset.workers=1", "train.print_freq=1",
       "train.epochs=1", f"train.steps_per_epoch={STEPS}", "train.batch_size=16",
       "dataset.train_size=256", "dataset.val_size=32", "dataset.image_size=32"]
SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"]
# Two nodes, one rank each (forked: no second torch import), no loader worker. NODE_STEPS steps,
# so that every preemption of the repeated test stops mid-epoch, each a step or two after the
# last resume: the uninterrupted two-node job is its reference.
NODE_STEPS = 40
TWO_NODES = [*(arg for arg in RUN if not arg.startswith(("train.steps_per_epoch=",
                                                         "dataset.train_size=",
                                                         "dataset.workers="))),
             f"train.steps_per_epoch={NODE_STEPS}", f"dataset.train_size={16 * NODE_STEPS}",
             "dataset.workers=0", "world.nnodes=2", "world.start_method=fork"]
# Two-node preemptions in a row, each mid-epoch (then one during the requeued job's start-up).
PREEMPT_REPEATS = int(os.environ.get("IMGTRAIN_SLURM_PREEMPT_REPEATS", "5"))
# The most a run here may take, queueing and a requeue included: a bound for a run that never
# ends (on a loaded machine the runs take minutes), not how long they take.
BOUND_S = STATE_BOUND_S


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_not()
    if reason:
        pytest.skip(f"no SLURM cluster: {reason}")
    slurm = Cluster(tmp_path_factory.mktemp("slurm")).start()
    print(f"\nSLURM cluster (2 nodes) started in {slurm.start_seconds:.1f} s")
    yield slurm
    slurm.stop()


@dataclass
class Submitted:
    """The module's runs, started together, and what was done to them on the way."""
    root: Path
    procs: dict[str, object] = field(default_factory=dict)
    sbatch_job: str = ""
    events: dict[str, float] = field(default_factory=dict)  # what happened, when (time.time())
    signalled_at_step: dict[str, int] = field(default_factory=dict)
    preempter: threading.Thread | None = None
    preemptions: list[dict] = field(default_factory=list)  # the repeated two-node ones
    preempter_error: str = ""
    busy_port: socket.socket | None = None


def _env(cluster: Cluster) -> dict[str, str]:
    # One thread per run: the runs share this machine's cores, and equal weights need the same
    # threads on both sides.
    return {**cluster.env, "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _job_dir(sweep: Path, number: int) -> Path | None:
    found = sorted(sweep.glob(f"{number}_*"))
    return found[0] if found else None


def _step(run_dir: Path | None, steps: int = STEPS) -> int:
    """The last step train.log has printed (0 before the first)."""
    if run_dir is None or not (run_dir / "train.log").exists():
        return 0
    printed = re.findall(rf"\[(\d+)/{steps}\]", (run_dir / "train.log").read_text())
    return int(printed[-1]) if printed else 0


def _slurm_job_of(sweep: Path, number: int) -> str | None:
    """The SLURM job id of a sweep's job `number`: the launcher submits them in order, and SLURM
    numbers jobs in the order they come (each has its folder in .submitit/)."""
    ids = sorted((int(folder.name) for folder in sweep.glob(".submitit/*")
                  if folder.name.isdigit()))
    return str(ids[number]) if len(ids) > number else None


def _sbatch_run_dir(root: Path) -> Path | None:
    found = sorted((root / "sbatch" / "outputs").glob("*/*/results.json"))
    return found[0].parent if found else None


@pytest.fixture(scope="module")
def submitted(cluster: Cluster, module_dir: Path) -> Submitted:
    """Starts every run, then acts on them until each action is done (bounded):
    - `plain`: a 2-point sweep (optim.lr=0.1,0.2), left alone: the reference weights;
    - `preempt`: the same sweep; its lr=0.1 job gets SIGUSR2 mid-epoch (`scancel --signal=USR2`,
      what submitit's --signal asks for), its lr=0.2 job is cancelled (`scancel`) mid-epoch;
    - the sbatch template running the lr=0.1 point, whose batch shell gets SIGUSR1 mid-epoch
      (`scancel --signal=USR1 --batch`: what --signal=B:USR1@N sends at its time);
    - `two_nodes`: world.nnodes=2 through hydra/launcher=slurm."""
    root, env = module_dir, _env(cluster)
    runs = Submitted(root)
    for name in ("plain", "preempt"):
        runs.procs[name] = start_cli(*SLURM, *RUN, "optim.lr=0.1,0.2",
                                     f"hydra.sweep.dir={root / name}", env=env)
    runs.procs["two_nodes"] = start_cli(*SLURM, *TWO_NODES,
                                        f"hydra.sweep.dir={root / 'two_nodes'}", env=env)
    runs.procs["two_nodes_preempted"] = start_cli(
        *SLURM, *TWO_NODES, f"hydra.sweep.dir={root / 'two_nodes_preempted'}", env=env)
    runs.busy_port = socket.socket()  # what another process listens on: node 0 refuses it
    runs.busy_port.bind(("127.0.0.1", 0))
    runs.busy_port.listen()
    runs.procs["node0_fails"] = start_cli(
        *SLURM, *TWO_NODES, f"world.master_port={runs.busy_port.getsockname()[1]}",
        f"hydra.sweep.dir={root / 'node0_fails'}", env=env)
    runs.preempter = threading.Thread(target=_preempt_repeatedly, daemon=True,
                                      args=(runs, cluster, root / "two_nodes_preempted"))
    runs.preempter.start()
    (root / "sbatch").mkdir()
    runs.sbatch_job = cluster.run(
        "sbatch", "--parsable", f"--chdir={root / 'sbatch'}", "--cpus-per-task=1",
        "--gpus-per-node=0", f"--output={root / 'sbatch' / 'job.out'}",
        f"--export=ALL,IMGTRAIN_HOME={REPO},OMP_NUM_THREADS=1,PATH={env['PATH']}",
        str(REPO / "scripts" / "imgtrain.sbatch"), *RUN, "optim.lr=0.1").stdout.strip()
    preempt = root / "preempt"
    actions: dict[str, Callable[[], bool]] = {
        "usr2": lambda: _signal_at(runs, "usr2", _job_dir(preempt, 0),
                                   lambda: _slurm_job_of(preempt, 0),
                                   ["--signal=USR2"], cluster),
        "cancel": lambda: _signal_at(runs, "cancel", _job_dir(preempt, 1),
                                     lambda: _slurm_job_of(preempt, 1), [], cluster, step=1),
        "usr1": lambda: _signal_at(runs, "usr1", _sbatch_run_dir(root), lambda: runs.sbatch_job,
                                   ["--signal=USR1", "--batch"], cluster),
    }
    deadline, looked_at_sbatch = time.monotonic() + BOUND_S, 0.0
    while actions and time.monotonic() < deadline:
        # A run that ended before its action came would never get it: say so now.
        if {"usr2", "cancel"} & actions.keys() and runs.procs["preempt"].poll() is not None:
            raise AssertionError(f"the preempt sweep ended before {sorted(actions)}: "
                                 f"{runs.procs['preempt'].communicate()}")
        if "usr1" in actions and time.monotonic() - looked_at_sbatch > 5:
            looked_at_sbatch = time.monotonic()
            state = _slurm_state(cluster, runs.sbatch_job)["JobState"]
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), (
                f"the sbatch job is {state} before its USR1: "
                f"{(root / 'sbatch' / 'job.out').read_text()[-3000:]}")
        actions = {name: act for name, act in actions.items() if not act()}
        time.sleep(0.2)
    assert not actions, f"never reached the point to act: {sorted(actions)}"
    return runs


def _signal_at(runs: Submitted, name: str, run_dir: Path | None, job: Callable[[], str | None],
               scancel_args: list[str], cluster: Cluster, step: int = 2) -> bool:
    """`scancel <args> <job>` once the run has started and printed step `step` of STEPS
    (True: done)."""
    printed = _step(run_dir)
    job_id = job() if run_dir is not None and printed >= step else None
    if not job_id:
        return False
    cluster.run("scancel", *scancel_args, job_id)
    runs.events[name], runs.signalled_at_step[name] = time.time(), printed
    return True


def _finish(runs: Submitted, name: str) -> tuple[int, str, str]:
    proc = runs.procs[name]
    try:
        out, err = proc.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise
    return proc.returncode, out, err


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints/last.pt", map_location="cpu",
                      weights_only=True)["model"]


def _max_diff(a: Path, b: Path) -> float:
    x, y = _model(a), _model(b)
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x if x[k].numel())


def _slurm_state(cluster: Cluster, job: str) -> dict[str, str]:
    line = cluster.run("scontrol", "show", "job", "--oneliner", job).stdout
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def _final_state(cluster: Cluster, job: str) -> dict[str, str]:
    """SLURM's record of `job` once it has ended (a finished job's result file may come a
    moment before SLURM's state does)."""
    deadline = time.time() + BOUND_S
    state = _slurm_state(cluster, job)
    while state["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED") and time.time() < deadline:
        time.sleep(0.5)
        state = _slurm_state(cluster, job)
    return state


@pytest.mark.slow
def test_a_sweep_runs_each_point_as_a_slurm_job(submitted: Submitted) -> None:
    code, out, err = _finish(submitted, "plain")
    assert code == 0, out + err
    assert "the sweep's runs:" in out + err and "Acc@1" in out + err  # its results table
    sweep = submitted.root / "plain"
    for number, lr in ((0, 0.1), (1, 0.2)):
        results = read_results(_job_dir(sweep, number))
        assert results["status"] == "completed" and results["lr"] == lr
        assert _slurm_job_of(sweep, number)  # ran as a SLURM job (submitit's log, its id)
    assert len({_slurm_job_of(sweep, n) for n in (0, 1)}) == 2


@pytest.mark.slow
def test_a_job_preempted_by_sigusr2_requeues_itself_and_resumes_exactly(
        submitted: Submitted, cluster: Cluster) -> None:
    code, out, err = _finish(submitted, "preempt")  # its other job was cancelled: exit 1
    run_dir = _job_dir(submitted.root / "preempt", 0)
    results = read_results(run_dir)
    assert results["status"] == "completed", results
    state = _final_state(cluster, _slurm_job_of(submitted.root / "preempt", 0))
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", state
    _assert_resumed_mid_epoch(run_dir, submitted.signalled_at_step["usr2"])
    reference = _job_dir(submitted.root / "plain", 0)
    _finish(submitted, "plain")
    assert _max_diff(reference, run_dir) == 0
    job = _slurm_job_of(submitted.root / "preempt", 0)
    assert re.search(rf"SLURM job {job} completed: restarts 1, final Acc@1 \d+\.\d+; log ",
                     out + err), out + err
    logs = list((submitted.root / "preempt" / ".submitit" / job).glob("*_log.*"))
    assert logs and not [p for p in logs if "Traceback" in p.read_text()]  # its loader worker's


def _assert_resumed_mid_epoch(run_dir: Path, signalled_at: int) -> None:
    """Stopped at the step after the signal (or that step), and resumed from there."""
    log = (run_dir / "train.log").read_text()
    assert "preempted" in log, log
    resumed = re.search(r"resumed from epoch 1 step (\d+) \(restart 1\)", log)
    assert resumed, log
    assert signalled_at <= int(resumed.group(1)) < STEPS, (signalled_at, log)


@pytest.mark.slow
def test_a_cancelled_sweep_job_is_reported_failed_while_the_other_completes(
        submitted: Submitted, cluster: Cluster) -> None:
    code, out, err = _finish(submitted, "preempt")
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "CANCELLED" in lines[0] and "optim.lr=0.2" in lines[0], err
    assert "Traceback" not in err
    # Reported once SLURM said so, while the preempted job (requeued, then resumed) was still to
    # finish: not with the sweep's other result, at its end. Both times are this machine's clock.
    reported = _reported_at(out + err)
    other = _job_dir(submitted.root / "preempt", 0)
    assert read_results(other)["status"] == "completed"
    finished = (other / "results.json").stat().st_mtime  # its last write: the completed status
    assert reported < finished, (reported, finished, submitted.events)
    # scancel's SIGTERM checkpoints like any stop signal, but a cancelled job stays cancelled.
    state = _final_state(cluster, _slurm_job_of(submitted.root / "preempt", 1))
    assert (state["JobState"], state["Restarts"]) == ("CANCELLED", "0"), state


def _reported_at(output: str) -> float:
    """When the launcher logged the failed job (its log line's time stamp, to the millisecond)."""
    stamp = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]\[HYDRA\] error: SLURM", output)
    assert stamp, output
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
def test_the_sbatch_template_requeues_on_sigusr1_and_resumes_the_same_run(
        submitted: Submitted, cluster: Cluster) -> None:
    state = _final_state(cluster, submitted.sbatch_job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", state
    runs = sorted((submitted.root / "sbatch" / "outputs").glob("*/*/results.json"))
    assert len(runs) == 1, runs  # the requeued job went on in the same run folder
    run_dir = runs[0].parent
    assert read_results(run_dir)["status"] == "completed"
    _assert_resumed_mid_epoch(run_dir, submitted.signalled_at_step["usr1"])
    _finish(submitted, "plain")
    assert _max_diff(_job_dir(submitted.root / "plain", 0), run_dir) == 0


@pytest.mark.slow
def test_a_two_node_job_takes_its_world_from_slurm(submitted: Submitted, cluster: Cluster) -> None:
    code, out, err = _finish(submitted, "two_nodes")
    assert code == 0, out + err
    sweep = submitted.root / "two_nodes"
    results = read_results(_job_dir(sweep, 0))
    assert results["status"] == "completed" and results["world_size"] == 2
    state = _final_state(cluster, _slurm_job_of(sweep, 0))
    assert (state["JobState"], state["NumNodes"], state["NodeList"]) == ("COMPLETED", "2", "n[1-2]")


def test_a_job_slurm_refuses_is_one_error_line(cluster: Cluster, tmp_path: Path) -> None:
    proc = run_cli(*SLURM, *RUN, "hydra.launcher.partition=nosuch",
                   f"hydra.sweep.dir={tmp_path}", env=_env(cluster), timeout=BOUND_S)
    assert_clean_error(proc, "SLURM did not take sweep job 0", "Invalid partition name")


def _sbatch_lines(tmp_path: Path, *overrides: str) -> set[str]:
    """The #SBATCH lines hydra/launcher=slurm submits for a job of `overrides`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", f"hydra.launcher.submitit_folder={tmp_path}", *overrides])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    executor = ImgtrainSlurmLauncher(**params).executor(cfg)
    text = executor._executor._make_submission_file_text("python -m submitit", "uid")
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


@pytest.mark.parametrize("overrides,asks", [
    (["world=8p", "device=gpu"], {"--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=8"}),
    (["world=8p", "world.nnodes=4", "device=npu"],
     {"--nodes=4", "--ntasks-per-node=1", "--gres=npu:8"}),
    (["world=8p", "device=npu", "world.gres=ascend910b"], {"--gres=ascend910b:8"}),
    (["world.nproc_per_node=2", "device=gpu", "world.gres=gpu"], {"--gres=gpu:2"}),
    (["world=1p", "device=cpu"], {"--nodes=1", "--ntasks-per-node=1"}),
])
def test_the_slurm_request_follows_world(tmp_path: Path, overrides: list[str],
                                         asks: set[str]) -> None:
    lines = _sbatch_lines(tmp_path, *overrides)
    assert {f"#SBATCH {ask}" for ask in asks} <= lines, lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --signal=USR2@120" in lines
    if "device=cpu" in overrides:
        assert not any("gpu" in line or "gres" in line for line in lines), lines


def test_the_launchers_own_settings_win_over_worlds_devices(tmp_path: Path) -> None:
    lines = _sbatch_lines(tmp_path, "world=8p", "device=gpu", "hydra.launcher.gpus_per_node=4",
                          "hydra.launcher.nodes=3")
    assert "#SBATCH --gpus-per-node=4" in lines
    assert "#SBATCH --nodes=1" in lines  # world.nnodes decides: the job's ranks depend on it


WORLD = {"nproc_per_node": 1, "nnodes": 2, "node_rank": 0, "master_addr": "127.0.0.1",
         "master_port": None, "max_restarts": 0, "start_method": "spawn", "gres": None}


@pytest.mark.parametrize("env,fragment", [
    ({"SLURM_JOB_NUM_NODES": "1"}, "world.nnodes=2 but SLURM job 7 has 1 node(s)"),
    ({"SLURM_JOB_NUM_NODES": "2"}, "start it with `srun --ntasks-per-node=1"),  # the batch shell
])
def test_a_several_node_world_needs_its_slurm_job_and_step(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str) -> None:
    from imgtrain.errors import ConfigError

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        plan_job(WorldConfig(**WORLD))
    job = plan_job(WorldConfig(**{**WORLD, "nnodes": 1}))  # one node: the world as given
    assert job == Job(launcher="slurm", **{**WORLD, "nnodes": 1}, world_size=1)


def test_a_job_past_train_max_requeues_is_not_requeued_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "10")
    assert imgtrain_slurm.requeue_self(10) == ("SLURM job 7 not requeued: it has restarted 10 "
                                               "time(s), train.max_requeues=10")
    monkeypatch.setenv("SLURM_PROCID", "1")  # another node's task: the first one requeues
    assert imgtrain_slurm.requeue_self(10) is None


STOP_LINE = re.compile(r"^(\S+ \S+) preempted by SIG\w+ at epoch 1 step (\d+);", re.M)
RESUME_LINE = re.compile(r"^(\S+ \S+)\s+resume\s+resumed from epoch 1 step (\d+) \(restart (\d+)\)",
                         re.M)


def _text(path: Path | None) -> str:
    return path.read_text() if path is not None and path.exists() else ""


def _logged(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _preempt_repeatedly(runs: Submitted, cluster: Cluster, sweep: Path) -> None:
    """The driver of the repeated two-node preemption, in a thread beside the module's other
    runs: PREEMPT_REPEATS times `scancel --signal=USR2` once the job has printed two steps past
    its last resume (the first: past step 2), then once more as soon as the requeued job's
    node 0 says it starts its ranks, before they have resumed: its start-up. (A signal before a
    task's interpreter has any handler, its first second or so, ends it as any process.) It
    asks SLURM, not the sweep's process, whether the job ended: the tests' process server
    serves one thread."""
    try:
        deadline = time.monotonic() + BOUND_S
        for repeat in range(PREEMPT_REPEATS + 1):
            while not _preempt_once(runs, cluster, sweep, repeat):
                assert time.monotonic() < deadline, f"preemption {repeat + 1} never came"
                job = _slurm_job_of(sweep, 0)
                state = _slurm_state(cluster, job)["JobState"] if job else "PENDING"
                assert state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), (
                    f"the two-node job ended {state} before preemption {repeat + 1}")
                time.sleep(0.1)
    except BaseException as exc:  # the test reports it
        runs.preempter_error = f"{type(exc).__name__}: {exc}"


def _preempt_once(runs: Submitted, cluster: Cluster, sweep: Path, repeat: int) -> bool:
    run_dir, job = _job_dir(sweep, 0), _slurm_job_of(sweep, 0)
    if run_dir is None or job is None:
        return False
    resumes = RESUME_LINE.findall(_text(run_dir / "train.log"))
    if repeat < PREEMPT_REPEATS:  # mid-epoch: two steps past the last resume
        since = int(resumes[-1][1]) if resumes else 0
        if len(resumes) != repeat or _step(run_dir, NODE_STEPS) < since + 2:
            return False
    else:  # start-up: the requeued job's node 0 says it starts its ranks, not resumed yet
        starts = _text(sweep / ".submitit" / job / f"{job}_0_log.out").count(
            "starting 1 processes on node 0 of 2")
        if len(resumes) != repeat - 1 or starts != repeat + 1:
            return False
    printed = _step(run_dir, NODE_STEPS)
    cluster.run("scancel", "--signal=USR2", job)
    # The job's port (the same at every restart): left in TIME_WAIT by the step before?
    port = imgtrain_slurm.job_port(job)
    waiting = subprocess.run(["ss", "-Htan", "state", "time-wait"], capture_output=True,
                             text=True).stdout
    runs.preemptions.append({"signalled_at": time.time(), "printed_step": printed,
                             "during_start_up": repeat == PREEMPT_REPEATS,
                             "job_port_in_time_wait": f":{port} " in waiting})
    return True


@pytest.mark.slow
def test_a_two_node_job_preempted_again_and_again_comes_back_every_time_exactly(
        submitted: Submitted, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    """PREEMPT_REPEATS mid-epoch USR2s in a row to one two-node job, then one during a requeued
    start-up: each time every node stops, the job requeues itself and resumes from the stop's
    step; it completes with the uninterrupted two-node job's weights, and no log holds a
    traceback. Each preemption's numbers are printed and left in two_node_preemptions.json."""
    submitted.preempter.join(BOUND_S)
    assert not submitted.preempter_error, submitted.preempter_error
    code, out, err = _finish(submitted, "two_nodes_preempted")
    sweep = submitted.root / "two_nodes_preempted"
    run_dir, job = _job_dir(sweep, 0), _slurm_job_of(sweep, 0)
    assert code == 0, out + err
    assert read_results(run_dir)["status"] == "completed"
    state = _final_state(cluster, job)
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", str(PREEMPT_REPEATS + 1)), state
    log = (run_dir / "train.log").read_text()
    events = sorted([(_logged(stamp), "stop", int(step)) for stamp, step in STOP_LINE.findall(log)]
                    + [(_logged(stamp), "resume", int(step))
                       for stamp, step, _ in RESUME_LINE.findall(log)])
    stops = [event for event in events if event[1] == "stop"]
    resumes = [event for event in events if event[1] == "resume"]
    # Each mid-epoch stop is followed by a resume from its step; the start-up's stop came before
    # its ranks resumed (no stop or resume line of its own: the next restart resumes from the
    # last mid-epoch stop), or at their first step (a stop line of its own).
    assert len(stops) in (PREEMPT_REPEATS, PREEMPT_REPEATS + 1), events
    assert RESUME_LINE.findall(log)[-1][2] == str(PREEMPT_REPEATS + 1), log
    reference = _job_dir(submitted.root / "two_nodes", 0)
    _finish(submitted, "two_nodes")
    diff = _max_diff(reference, run_dir)
    records = []
    for signal, stop in zip(submitted.preemptions, [*stops[:PREEMPT_REPEATS], stops[-1]]):
        resume = next(event for event in resumes if event[0] > stop[0])
        records.append({**signal, "stop_step": stop[2], "resume_step": resume[2],
                        "stop_to_resume_s": round(resume[0] - stop[0], 1)})
    records[-1]["final_weights_max_abs_diff"] = diff
    # Kept after the session (the module's folder is not): the numbers for the notes.
    (tmp_path_factory.getbasetemp() / "two_node_preemptions.json").write_text(
        json.dumps(records, indent=1))
    print("\ntwo-node preemptions:", *map(json.dumps, records), sep="\n  ")
    for record in records:
        assert record["resume_step"] == record["stop_step"] < NODE_STEPS, records
    for record in records[:PREEMPT_REPEATS]:
        # Two processes stop at the next print point (every step here) after the signal lands.
        assert record["printed_step"] <= record["stop_step"], records
    # The start-up's stop: its line says the job requeues itself, as the others do.
    assert re.search(r"preempted by SIGUSR2 (before training started|at epoch 1 step \d+); .*"
                     r"requeues itself", (sweep / ".submitit" / job / f"{job}_0_log.err").read_text()
                     + log), log
    assert diff == 0
    logs = sorted((sweep / ".submitit" / job).glob("*_log.*"))
    assert len(logs) == 4 and not [p for p in logs if "Traceback" in p.read_text()], logs
    assert "imgtrain: train resnet18" in (sweep / ".submitit" / job / f"{job}_0_log.out").read_text()
    assert re.search(rf"SLURM job {job} completed: restarts {PREEMPT_REPEATS + 1}, final Acc@1 "
                     r"\d+\.\d+; log \S+_0_log.out", out + err), out + err


def test_nodes_read_only_their_own_restarts_word_and_node0s_error_stops_the_others(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from imgtrain import job_nodes

    run = str(tmp_path)
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "0",
                       "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)
    job_nodes.report(run, "failed", "world.master_port=20007 is already in use")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the step after the next requeue
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert "did not start" in job_nodes.wait_for_node0(run, timeout_s=0.5)  # the old word unread
    monkeypatch.setenv("SLURM_NODEID", "0")
    job_nodes.report(run, "failed", "error text")
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert job_nodes.wait_for_node0(run, timeout_s=5) == "node 0 failed at its start: error text"
    monkeypatch.setenv("SLURM_NODEID", "0")
    assert job_nodes.wait_for_others(run, timeout_s=0.5) == [1]  # node 1 has not said it ended
    job_nodes.report(run, "starting")  # a new start forgets what older restarts left
    assert [p.name for p in (tmp_path / ".nodes").iterdir()] == ["7-2"]


def test_the_launchers_line_for_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra_plugins.imgtrain_slurm import job_report

    monkeypatch.setattr(imgtrain_slurm, "job_states", lambda ids: {"6": {"Restarts": "1"}})
    done = {"status": "completed", "final_acc1": 98.4}
    assert job_report.job_line("6", "COMPLETED", done, None, "s/.submitit/6/6_0_log.out") == (
        "SLURM job 6 completed: restarts 1, final Acc@1 98.400; log s/.submitit/6/6_0_log.out")
    failed = {"status": "failed", "error": "node 0 failed at its start: bad"}
    assert job_report.job_line("6", "FAILED", failed, None, "x.out") == (
        "SLURM job 6 failed: restarts 1, error: node 0 failed at its start: bad; log x.out")


@pytest.mark.slow
def test_when_node0_cannot_start_the_other_node_stops_at_once_with_its_error(
        submitted: Submitted, cluster: Cluster) -> None:
    code, out, err = _finish(submitted, "node0_fails")
    port = submitted.busy_port.getsockname()[1]
    submitted.busy_port.close()
    sweep = submitted.root / "node0_fails"
    job = _slurm_job_of(sweep, 0)
    refused = f"world.master_port={port} is already in use"
    assert code != 0 and refused in err, out + err
    assert re.search(rf"SLURM job {job} failed: restarts 0, error: {refused}", out + err), out + err
    assert read_results(_job_dir(sweep, 0))["status"] == "failed"
    logs = sweep / ".submitit" / job
    node1 = (logs / f"{job}_1_log.err").read_text()
    assert f"error: node 0 failed at its start: {refused}" in node1, node1
    assert not [p for p in logs.glob("*_log.*") if "Traceback" in p.read_text()]
    # Node 1 stopped once node 0 had failed (its results.json), not after a store's time-out.
    node0_failed = (_job_dir(sweep, 0) / "results.json").stat().st_mtime
    assert (logs / f"{job}_1_log.err").stat().st_mtime - node0_failed < 30


def test_a_requeued_job_that_fails_at_its_start_is_recorded_failed_not_left_preempted(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import json as json_

    from imgtrain import app

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (tmp_path / "results.json").write_text(json_.dumps({"status": "preempted", "arch": "x"}))
    started = time.time() + 1  # the step before wrote results.json
    outcome = app._fail(None, str(tmp_path), "world.master_port=20007 is already in use",
                        started, multirun=True)
    assert outcome.exit_code == 1
    assert read_results(tmp_path) == {"status": "failed", "arch": "x",
                                      "error": "world.master_port=20007 is already in use"}
