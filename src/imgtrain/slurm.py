"""What SLURM adds to a run, in one place: how a job is asked for, where `world` comes from inside
a job, how a preempted job requeues itself, and how a job's state is read without accounting.

hydra/launcher=slurm (hydra_plugins/imgtrain_slurm) asks for `request(world, device)`; inside
the job, jobenv.plan_job asks `step_nodes` for the world's nodes, so that distributed.py knows
nothing of SLURM; after a preemption's checkpoint app.py calls `requeue_self`.
scripts/imgtrain.sbatch gets the last two without the launcher. SLURM's variables are read here
alone. Nothing here imports torch: the launcher runs on a login node.
"""
from __future__ import annotations

import functools
import os
import subprocess
from typing import Any, Mapping, NamedTuple

from imgtrain.errors import ConfigError

# A port per job, the same on every node of it and on each restart, away from the ports Linux
# hands out to clients (32768 and up) and from torchrun's default 29500.
PORT_BASE, PORT_SPAN = 20000, 9000
SCONTROL_TIMEOUT_S = 30


def job_id() -> str | None:
    """The SLURM job this process runs in: it stays the same when the job is requeued."""
    return os.environ.get("SLURM_JOB_ID") or None


def in_job() -> bool:
    return job_id() is not None


def restarts() -> int | None:
    """SLURM_RESTART_COUNT: how often SLURM has requeued this job (None where it is not set)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(count) if count.isdigit() else None


def requeue_count() -> int:
    """How often the scheduler has requeued this job (0 outside SLURM): what train.max_requeues
    bounds. A person re-running a command is not a requeue."""
    return restarts() or 0


def request(world: Mapping[str, Any], device: str) -> dict[str, Any]:
    """submitit's SLURM parameters for `world`: one task per node, since imgtrain starts a node's
    ranks itself, and each node's `world.nproc_per_node` devices (none on device=cpu)."""
    nproc = int(world["nproc_per_node"])
    params: dict[str, Any] = {"nodes": int(world["nnodes"]), "tasks_per_node": 1}
    gres = world.get("gres")
    if device == "gpu" and not gres:
        params["gpus_per_node"] = nproc
    elif device in ("gpu", "npu"):
        params["gres"] = f"{gres or 'npu'}:{nproc}"
    return params


class StepNodes(NamedTuple):
    """Where a SLURM job step across several nodes puts this node: what jobenv.plan_job takes."""
    node_rank: int
    master_addr: str  # the first node's address
    job_port: int  # the job's own port, for a world.master_port left unset


def step_nodes(nnodes: int) -> StepNodes | None:
    """This node's place inside a SLURM job step across world.nnodes > 1 nodes, checked against
    the job and the step. None outside SLURM and for one node."""
    env = os.environ
    if not in_job() or nnodes == 1:
        return None
    job = env["SLURM_JOB_ID"]
    job_nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if nnodes != job_nodes:
        raise ConfigError(f"world.nnodes={nnodes} but SLURM job {job} has {job_nodes} node(s); "
                          "ask for world.nnodes nodes (hydra/launcher=slurm does)")
    step = (int(env.get("SLURM_STEP_NUM_NODES") or 0), int(env.get("SLURM_STEP_NUM_TASKS") or 0))
    if step != (nnodes, nnodes):
        raise ConfigError(f"world.nnodes={nnodes} runs one task on each of the job's nodes: "
                          "start it with `srun --ntasks-per-node=1 python run.py ...`")
    return StepNodes(int(env["SLURM_NODEID"]), first_node_address(env["SLURM_JOB_NODELIST"]),
                     job_port(job))


@functools.lru_cache(maxsize=None)
def first_node_address(nodelist: str) -> str:
    """Where the first node of `nodelist` is reached. A job's nodes stay the same while it runs:
    scontrol is asked once per process, however often the world is planned."""
    return node_address(hostnames(nodelist)[0])


def first_task() -> bool:
    """Whether this process is its SLURM job step's first task (or runs outside SLURM): the
    tasks on the other nodes of a several-node job leave the run's records to it."""
    return int(os.environ.get("SLURM_PROCID", 0)) == 0 if in_job() else True


def step_node() -> tuple[int, int] | None:
    """(this task's node, the step's node count) inside a SLURM job step across several nodes;
    None elsewhere."""
    env = os.environ
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or 0)
    if not in_job() or nodes < 2:
        return None
    return int(env.get("SLURM_NODEID") or 0), nodes


def job_port(job_id: str) -> int:
    return PORT_BASE + int(job_id) % PORT_SPAN


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True,
                          timeout=SCONTROL_TIMEOUT_S).stdout


def hostnames(nodelist: str) -> list[str]:
    """SLURM_JOB_NODELIST (`n[1-2],gpu7`) expanded as SLURM itself does."""
    return _scontrol("show", "hostnames", nodelist).split()


def node_address(node: str) -> str:
    """Where `node` is reached: SLURM's NodeAddr (its name unless the site set an address)."""
    fields = _fields(_scontrol("show", "node", "--oneliner", node))
    return fields.get("NodeAddr") or node


def _fields(line: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def requeue_self(max_requeues: int) -> str | None:
    """After a preemption's checkpoint: put this job back in SLURM's queue, to run the same
    command again and resume. Done once per job (its first task), and only while the job is
    running: `scontrol requeue` would also bring back a job that `scancel` is ending. The line
    to print, or None outside a SLURM job and on its other tasks."""
    env = os.environ
    if not in_job() or not first_task():
        return None
    job, requeued = env["SLURM_JOB_ID"], requeue_count()
    if requeued >= max_requeues:
        return (f"SLURM job {job} not requeued: it has restarted {requeued} time(s), "
                f"train.max_requeues={max_requeues}")
    try:
        state = job_states([job]).get(job, {}).get("State", "UNKNOWN")
        if state != "RUNNING":
            return f"SLURM job {job} not requeued: it is {state} (cancelled, or at its end)"
        _scontrol("requeue", job)
    except (OSError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "stderr", None) or str(exc)
        return f"SLURM job {job} not requeued: {reason.strip()}"
    return (f"requeued SLURM job {job} (restart {requeued + 1}): it resumes from this checkpoint "
            "in the same run folder")


def job_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """`sacct`'s JobID, State and NodeList (and scontrol's Restarts) for jobs SLURM still holds, read from `scontrol` for
    clusters without an accounting database (where `sacct` only says it is disabled)."""
    states: dict[str, dict[str, str]] = {}
    for job in job_ids:
        try:
            lines = _scontrol("show", "job", "--oneliner", job).splitlines()
        except (OSError, subprocess.SubprocessError):
            continue  # gone from slurmctld (MinJobAge) or never known
        for line in lines:  # one per array task
            fields = _fields(line)
            task = fields.get("ArrayTaskId")
            key = f"{fields.get('ArrayJobId')}_{task}" if task else fields.get("JobId", job)
            states[key] = {"JobID": key, "State": fields.get("JobState", "UNKNOWN"),
                           "NodeList": fields.get("NodeList", ""),
                           **({"Restarts": fields["Restarts"]} if "Restarts" in fields else {})}
    return states
