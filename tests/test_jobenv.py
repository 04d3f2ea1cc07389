"""jobenv: where a process was started (a person, torchrun, SLURM) and what its launcher says.
No launcher runs here: their variables are set, and SLURM's `scontrol` is a script on PATH."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO
from imgtrain import jobenv, slurm
from imgtrain.config import WorldConfig
from imgtrain.errors import ConfigError
from imgtrain.jobenv import Job, Ranks, plan_job

WORLD_1P = {"nproc_per_node": 1, "nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1",
            "master_port": None, "max_restarts": 0, "start_method": "spawn", "gres": None}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
# A job of two nodes, n7 and n8, inside the step `srun --ntasks-per-node=1` starts: on node n8.
SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_NUM_NODES": "2",
              "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[7-8]"}
FAKE_SCONTROL = """#!/bin/sh
echo "$*" >> "{log}"
case "$1 $2" in
  "show hostnames") printf 'n7\\nn8\\n' ;;
  "show node") echo "NodeName=$4 Arch=x86_64 NodeAddr=10.1.0.7 NodeHostName=$4 State=IDLE" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts as a person's command would: no launcher's variables, nothing cached."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in TORCHRUN:
            monkeypatch.delenv(key)
    slurm.first_node_address.cache_clear()
    yield
    slurm.first_node_address.cache_clear()


@pytest.fixture
def scontrol_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake `scontrol` first on PATH; the file it logs its calls to."""
    log = tmp_path / "scontrol.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(FAKE_SCONTROL.format(log=log))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def world(**changes: object) -> WorldConfig:
    """The `world` group as a command composes it: world=1p with `changes`."""
    return WorldConfig(**{**WORLD_1P, **changes})


def as_given(job: Job) -> WorldConfig:
    """A `world` group holding the values `job` planned."""
    return WorldConfig(**{f.name: getattr(job, f.name) for f in dataclasses.fields(WorldConfig)})


def _set(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_jobenv_imports_no_torch() -> None:
    # The SLURM launcher imports it on a login node.
    code = "import imgtrain.jobenv, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_plain_command_plans_the_world_it_is_given() -> None:
    job = plan_job(world(nproc_per_node=2, nnodes=3, node_rank=1, master_port=29400,
                         gres="gpu"))
    assert job == Job(launcher="local", nnodes=3, nproc_per_node=2, node_rank=1,
                      master_addr="127.0.0.1", master_port=29400, world_size=6,
                      start_method="spawn", max_restarts=0, gres="gpu")
    assert job.launches_ranks
    assert not plan_job(world()).launches_ranks  # one process: the worker runs in this one
    assert plan_job(world()) == Job(launcher="local", **WORLD_1P, world_size=1)
    assert jobenv.ranks() == Ranks(0, 0, 1, 1) and jobenv.is_main_process()
    assert not jobenv.started_by_torchrun() and not jobenv.under_elastic_agent()
    assert jobenv.agent_store_address() is None and jobenv.restart_attempt() == 0


def test_a_rank_torchrun_started_takes_its_world_from_torchrun(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _set(monkeypatch, TORCHRUN)
    job = plan_job(world(nproc_per_node=8))
    assert (job.launcher, job.world_size, job.nproc_per_node) == ("torchrun", 4, 8)
    assert not job.launches_ranks  # torchrun started the ranks: this is one of them
    assert jobenv.ranks() == Ranks(rank=3, local_rank=1, world_size=4, local_world_size=2)
    assert jobenv.started_by_torchrun() and not jobenv.is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert jobenv.is_main_process()
    monkeypatch.delenv("MASTER_PORT")  # RANK and WORLD_SIZE alone are not torchrun
    assert not jobenv.started_by_torchrun() and plan_job(world()).world_size == 1


def test_the_elastic_agents_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    _set(monkeypatch, {**TORCHRUN, "TORCHELASTIC_RUN_ID": "imgtrain-1a2b",
                       "TORCHELASTIC_RESTART_COUNT": "2"})
    assert jobenv.under_elastic_agent() and jobenv.restart_attempt() == 2
    assert jobenv.agent_store_address() is None  # a plain env:// rendezvous
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert jobenv.agent_store_address() == ("10.0.0.1", 29500)


def test_a_slurm_step_across_nodes_places_this_node(monkeypatch: pytest.MonkeyPatch,
                                                    scontrol_calls: Path) -> None:
    _set(monkeypatch, SLURM_STEP)
    job = plan_job(world(nproc_per_node=2, nnodes=2))
    assert job == Job(launcher="slurm", nnodes=2, nproc_per_node=2, node_rank=1,
                      master_addr="10.1.0.7", master_port=slurm.job_port("7"), world_size=4,
                      start_method="spawn", max_restarts=0, gres=None)
    assert job.master_port == 20007 and job.launches_ranks
    # A world holding the plan's values plans the same job, and asks scontrol nothing again.
    assert plan_job(as_given(job)) == job
    assert scontrol_calls.read_text().splitlines() == ["show hostnames n[7-8]",
                                                       "show node --oneliner n7"]
    set_port = world(nproc_per_node=2, nnodes=2, master_port=29400)
    assert plan_job(set_port).master_port == 29400  # set: it wins


def test_a_slurm_job_of_one_node_plans_the_world_as_given(monkeypatch: pytest.MonkeyPatch,
                                                          scontrol_calls: Path) -> None:
    _set(monkeypatch, {**SLURM_STEP, "SLURM_JOB_NUM_NODES": "1"})
    job = plan_job(world(nproc_per_node=2))
    assert job == Job(launcher="slurm", **{**WORLD_1P, "nproc_per_node": 2}, world_size=2)
    assert not scontrol_calls.exists()


@pytest.mark.parametrize("env,message", [
    ({"SLURM_JOB_NUM_NODES": "3"},
     "world.nnodes=2 but SLURM job 7 has 3 node(s); ask for world.nnodes nodes "
     "(hydra/launcher=slurm does)"),
    ({"SLURM_JOB_NUM_NODES": "", "SLURM_NNODES": "1"},
     "world.nnodes=2 but SLURM job 7 has 1 node(s); ask for world.nnodes nodes "
     "(hydra/launcher=slurm does)"),
    ({"SLURM_STEP_NUM_TASKS": "4"},  # two tasks a node
     "world.nnodes=2 runs one task on each of the job's nodes: start it with "
     "`srun --ntasks-per-node=1 python run.py ...`"),
    ({"SLURM_STEP_NUM_NODES": "", "SLURM_STEP_NUM_TASKS": ""},  # the batch script's shell
     "world.nnodes=2 runs one task on each of the job's nodes: start it with "
     "`srun --ntasks-per-node=1 python run.py ...`"),
])
def test_a_world_its_slurm_job_cannot_hold_is_one_error(
        monkeypatch: pytest.MonkeyPatch, scontrol_calls: Path, env: dict[str, str],
        message: str) -> None:
    _set(monkeypatch, {**SLURM_STEP, **env})
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        plan_job(world(nnodes=2))
    assert not scontrol_calls.exists()  # refused before SLURM is asked anything
