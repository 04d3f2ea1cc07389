"""world=1p|8p: launching workers with torch.distributed's elastic engine, and the process group.

One process runs the worker in-process with no process group. More (locally or across nodes)
go through `elastic_launch`, the engine behind torchrun; a process already started by torchrun
acts as the rank it was given and launches nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from imgtrain import jobenv, preemption
from imgtrain.device import DeviceInfo, visible_count
from imgtrain.errors import ConfigError, Preempted, one_line
from imgtrain.jobenv import Job, Ranks
from imgtrain.preemption import AGENT_SIGNALS

# How long workers get, after a signal, to reach a step boundary and checkpoint before SIGKILL.
SHUTDOWN_SECONDS = 120
# How long the nodes' agents wait for each other to join.
RENDEZVOUS_TIMEOUT_S = 300


@dataclass(frozen=True)
class World(Ranks):
    """This process's ranks (jobenv.Ranks) and the collectives across them."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce a metric tensor in place (a no-op on one process)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is True on any rank: how ranks agree to stop at one step."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def broadcast_from_main(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into `tensors` on every rank (a no-op on one process)."""
        if self.world_size > 1:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank (a list of one on one process)."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def world_from_env() -> World:
    """This process's place in the world, as its launcher set it."""
    return World(**asdict(jobenv.ranks()))


def port_bindable(host: str, port: int) -> bool:
    """Whether torch's TCPStore could listen on `port`: bound as its socket.cpp binds, with
    SO_REUSEADDR, so that a port whose last connections sit in TIME_WAIT (a requeued job's, the
    same job port a minute later) counts as free, and only one another process listens on as
    taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_world(job: Job, device_name: str, global_batch: int | None) -> None:
    """Everything about the planned world that can be wrong, checked before any process starts.
    `global_batch`: train.batch_size, None where the mode does not train (mode=eval)."""
    nproc, nnodes, node_rank = job.nproc_per_node, job.nnodes, job.node_rank
    external = job.launcher == "torchrun"  # its ranks are already started, on its own devices
    if nproc < 1 or nnodes < 1:
        raise ConfigError("world.nproc_per_node and world.nnodes must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"world.node_rank={node_rank} is out of range for world.nnodes={nnodes} "
                          f"(use 0..{nnodes - 1})")
    available = visible_count(device_name)
    if not external and nproc > available:
        raise ConfigError(f"world.nproc_per_node={nproc} but only {available} {device_name.upper()}"
                          f"(s) are visible; set world.nproc_per_node={available}")
    world_size = job.world_size
    if global_batch is not None and global_batch < 1:
        raise ConfigError(f"train.batch_size={global_batch} must be at least 1")
    if global_batch is not None and global_batch % world_size:
        raise ConfigError(f"train.batch_size={global_batch} does not divide across {world_size} "
                          f"processes; use a multiple of {world_size}")
    check_start_method(job.start_method, device_name)
    port = job.master_port
    if nnodes > 1 and port is None and not external:
        # A free port picked on node 0 is unknowable to the others, and a node above 0 would try
        # to bind the remote master_addr itself.
        raise ConfigError(f"world.nnodes={nnodes} needs world.master_port: set the same port on "
                          "every node, e.g. world.master_port=29500")
    if (job.launches_ranks and port is not None and node_rank == 0
            and not port_bindable(job.master_addr, port)):
        raise ConfigError(f"world.master_port={port} is already in use on "
                          f"{job.master_addr} (another process listens on it); choose another "
                          "port")


START_METHODS = ("spawn", "fork", "forkserver")


def check_start_method(method: str, device_name: str) -> None:
    """torchrun's --start-method. A forked rank skips re-importing torch (~8 s on a small CPU
    node), but inherits the launcher's process: on a GPU or NPU that may hold an initialised
    runtime, which a child cannot use, so fork is for CPU ranks only."""
    if method not in START_METHODS:
        raise ConfigError(f"world.start_method={method} is not one of {', '.join(START_METHODS)}")
    if method == "fork" and device_name != "cpu":
        raise ConfigError(f"world.start_method=fork needs device=cpu: a forked rank cannot use the "
                          f"{device_name.upper()} runtime its launcher has started; use spawn")


def launch(entrypoint: Callable[[Any, str], Any], plan: Any, output_dir: str) -> Any:
    """Run the worker: in-process for one process (or a rank torchrun started), else under
    elastic_launch on this node."""
    if not plan.job.launches_ranks:
        return entrypoint(plan, output_dir)
    # The agent's per-rank files (error.json) go to a folder removed after the launch: left to
    # itself, the agent makes a torchelastic_* folder in the temp dir and leaves it behind.
    with tempfile.TemporaryDirectory(prefix="torchelastic_") as agent_files:
        return _elastic_launch(entrypoint, plan, output_dir, agent_files)


def _elastic_launch(entrypoint: Callable[[Any, str], Any], plan: Any, output_dir: str,
                    agent_files: str) -> Any:
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    job = plan.job
    nnodes = job.nnodes
    port = job.master_port or free_port(job.master_addr)
    launch_config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=job.nproc_per_node,
        run_id=f"imgtrain-{port}" if nnodes > 1 else f"imgtrain-{uuid.uuid4().hex[:8]}",
        rdzv_endpoint=f"{job.master_addr}:{port}", **_rendezvous(job),
        max_restarts=job.max_restarts, monitor_interval=0.5,
        start_method=job.start_method,
        logs_specs=DefaultLogsSpecs(log_dir=agent_files),
        **_supported(LaunchConfig, signals_to_handle=AGENT_SIGNALS,
                     shutdown_timeout=SHUTDOWN_SECONDS))
    _quiet_elastic_logs()
    try:
        with preemption.agent_signals():
            results = elastic_launch(launch_config, entrypoint)(plan, output_dir)
    except SignalException as exc:
        # The agent passed the signal on to the workers, which checkpointed at the next agreed step
        # (rank 0 said where) before it let them go.
        raise Preempted(f"stopped by {exc.sigval.name}", signal=exc.sigval) from None
    except ChildFailedError as exc:
        message = _root_cause(exc.failures.values()).message
        if isinstance(message, dict):
            raise WorkerFailed(message.get("message", str(exc)),
                               message.get("extraInfo", {}).get("py_callstack", "")) from None
        raise WorkerFailed(message or str(exc)) from None
    return results.get(0) if results else None


def _rendezvous(job: Job) -> dict[str, Any]:
    """How the nodes' agents meet. Several nodes: torchrun's static rendezvous, which makes node
    `world.node_rank` the agents' group of that rank, so that global rank 0 (the summary, the
    progress, results.json) runs on node 0, in its SLURM task's log; c10d's would order the
    agents by host name and pid, which on nodes of one name puts rank 0 on any node. Node 0
    hosts the store in both."""
    if job.nnodes > 1:
        return {"rdzv_backend": "static",
                "rdzv_configs": {"rank": job.node_rank, "timeout": RENDEZVOUS_TIMEOUT_S}}
    return {"rdzv_backend": "c10d", "rdzv_configs": {"is_host": True,
                                                     "timeout": RENDEZVOUS_TIMEOUT_S}}


PEER_LOSS_HINTS = ("remote worker", "connection reset", "connection closed", "broken pipe")
# How long a rank that lost its peer waits before it exits, so that the agent, polling every
# 0.5 s, sees the crashed rank's own error first and reports that one.
PEER_LOSS_GRACE_SECONDS = 2.0


def is_peer_loss(message: str) -> bool:
    """A collective failed because another rank died: a consequence, not the cause."""
    text = message.lower()
    return any(hint in text for hint in PEER_LOSS_HINTS)


def _root_cause(failures: Any) -> Any:
    """The failure that started it: a rank's own error rather than a peer's lost connection to it.
    (Timestamps cannot decide: they have one-second resolution.)"""
    return min(failures, key=lambda f: (is_peer_loss(str(f.message)), f.timestamp, f.local_rank))


def _supported(cls: type, **options: Any) -> dict[str, Any]:
    """The options this torch's LaunchConfig knows (older releases lack some)."""
    fields = getattr(cls, "__dataclass_fields__", {})
    return {key: value for key, value in options.items() if key in fields}


def _quiet_elastic_logs() -> None:
    """The agent logs each worker failure as a multi-line traceback; imgtrain reports it once
    itself (one line for user errors). LOGLEVEL=INFO, as with torchrun, shows everything."""
    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


class WorkerFailed(Exception):
    """A launched worker raised: its one-line message, whether it was a user error, its traceback."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(one_line(message))
        self.user_error = "ConfigError:" in message
        self.traceback = traceback


def _attempt_store(world: World) -> dist.Store | None:
    """The elastic agent's store, under a prefix of its own for each restart attempt.

    The agent keeps one store across restarts; without the prefix, restarted workers read their
    dead predecessors' gloo addresses and fail with "connection refused" (seen with torch 2.14).
    """
    address = jobenv.agent_store_address()
    if address is None:
        return None  # plain env:// rendezvous: rank 0 hosts a fresh store
    store = dist.TCPStore(*address, world.world_size, is_master=False,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"imgtrain/attempt_{jobenv.restart_attempt()}", store)


@contextlib.contextmanager
def process_group(world: World, device: DeviceInfo) -> Iterator[None]:
    """set_device before init_process_group (nccl/hccl need it), and the group around the run."""
    device.set_current()
    if world.world_size > 1 and not dist.is_initialized():
        store = _attempt_store(world)
        dist.init_process_group(device.backend, init_method=None if store else "env://",
                                store=store, rank=world.rank,
                                world_size=world.world_size,
                                device_id=device.torch_device if device.is_accelerator else None)
    yield
    # Only after success: on an error the process is about to exit, which closes the group at once,
    # whereas destroy_process_group can wait on a peer that is already dead.
    if dist.is_initialized():
        dist.destroy_process_group()
