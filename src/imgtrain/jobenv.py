"""Where this process was started, and what its launcher says: the one reader of a launcher's
variables.

A run's processes come from a person's command (local), from torchrun (or from imgtrain's own
elastic launch, which gives its ranks the same variables), or from SLURM. torchrun's variables
are read here; SLURM's in slurm.py, which this module asks. The parent plans the job once
(`plan_job`); a worker asks what it is (`ranks`). Nothing here imports torch: the SLURM launcher
imports it on a login node.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgtrain import slurm

if TYPE_CHECKING:
    from imgtrain.config import WorldConfig

# All of them set: torchrun (or an elastic launch) started this process as one of its ranks.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Job:
    """Where this run's processes come from and how many there are: what the parent plans."""
    launcher: str  # "local" | "torchrun" | "slurm": what started this process
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int | None
    world_size: int  # torchrun's WORLD_SIZE when started by torchrun, else nnodes * nproc_per_node
    start_method: str
    max_restarts: int
    gres: str | None

    @property
    def launches_ranks(self) -> bool:
        """This process starts the ranks (elastic launch): not under torchrun, more than one."""
        return self.launcher != "torchrun" and self.world_size > 1


def plan_job(world: WorldConfig) -> Job:
    """The `world` group resolved with the environment: torchrun's WORLD_SIZE and, inside a SLURM
    job step across nodes, SLURM's node rank, first node's address and the job's port (unless
    world.master_port is set). Planning a world that holds a Job's values gives that Job."""
    nproc, nnodes = world.nproc_per_node, world.nnodes
    node_rank, master_addr, port = world.node_rank, world.master_addr, world.master_port
    nodes = slurm.step_nodes(nnodes)
    if nodes is not None:
        node_rank, master_addr, port = nodes.node_rank, nodes.master_addr, port or nodes.job_port
    torchrun = started_by_torchrun()
    return Job(
        launcher="torchrun" if torchrun else "slurm" if slurm.in_job() else "local",
        nnodes=nnodes, nproc_per_node=nproc, node_rank=node_rank, master_addr=master_addr,
        master_port=None if port is None else int(port),
        world_size=int(os.environ["WORLD_SIZE"]) if torchrun else nnodes * nproc,
        start_method=world.start_method, max_restarts=world.max_restarts, gres=world.gres)


@dataclass(frozen=True)
class Ranks:
    """What a worker process is, as its launcher said (one process of one: no launcher)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks() -> Ranks:
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", 1))
    return Ranks(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), world_size,
                 int(env.get("LOCAL_WORLD_SIZE", world_size)))


def started_by_torchrun() -> bool:
    return all(var in os.environ for var in _TORCHRUN_VARS)


def prepares_shared_files(job: Job) -> bool:
    """The job's one process that writes what all its processes share before they start (the
    sample index): global rank 0 where torchrun started every rank with the command; node 0's
    process otherwise (one a node, each launching its node's ranks). The others wait for it."""
    if job.launcher == "torchrun":
        return ranks().is_main
    return job.node_rank == 0


def is_main_process() -> bool:
    """Global rank 0, or no rank at all: under an external torchrun each rank runs the command,
    and rank 0 alone keeps the run's record and lock."""
    return ranks().is_main


def under_elastic_agent() -> bool:
    """An elastic agent (torchrun, or imgtrain's own launch) watches this process."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def agent_store_address() -> tuple[str, int] | None:
    """Where the elastic agent's store is, which ranks reach before any process group exists;
    None where the agent offers none (plain env:// rendezvous, or no agent)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return env["MASTER_ADDR"], int(env["MASTER_PORT"])


def restart_attempt() -> int:
    """How often the elastic agent has restarted this run's workers (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
