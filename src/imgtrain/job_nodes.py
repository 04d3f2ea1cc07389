"""What the nodes of a several-node SLURM job step tell each other, through the run folder, about
how their part of the step goes: node 0's start (or its error), and each node's end.

Every node's ranks already share the run folder (rank 0 writes the checkpoint that all of them
resume from). Each node's task writes `<run>/.nodes/<job>-<restart>/node-<N>.json`, where
restart is SLURM_RESTART_COUNT: a requeued job's step reads only its own restart's reports,
never what the old step left.

- Node 0 says `starting` once its checks have passed (the others then connect to the store it
  hosts), or `failed` with its error line: the other nodes then stop at once with that line,
  instead of waiting minutes for a store that never comes.
- Each other node says how its part ended (`preempted`, `completed`, `failed`) once its ranks
  have exited. After a stop, node 0 requeues the job only when every node has said so: a
  requeue ends the step on every node, and would kill a node still saving or exiting.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from imgtrain import slurm
from imgtrain.fileio import write_json_atomic

FOLDER = ".nodes"
POLL_S = 0.2
# How long node 0 waits, after a stop, for the other nodes to say they have exited: they passed
# the stop's barrier with it, so this bounds a node that died instead.
STOP_WAIT_S = 60


def several_nodes() -> tuple[int, int] | None:
    """(this node's rank, the step's node count) in a SLURM job step across several nodes."""
    return slurm.step_node()


def _folder(output_dir: str) -> Path:
    return Path(output_dir) / FOLDER / f"{slurm.job_id()}-{slurm.requeue_count()}"


def report(output_dir: str, status: str, error: str | None = None) -> None:
    """This node's word on its part of the step (nothing outside a several-node step)."""
    nodes = several_nodes()
    if nodes is None:
        return
    node, _ = nodes
    folder = _folder(output_dir)
    if node == 0 and status == "starting":
        _forget_old_steps(folder)
    write_json_atomic(folder / f"node-{node}.json",
                      {"status": status, **({"error": error} if error else {})})


def _forget_old_steps(current: Path) -> None:
    for old in current.parent.glob("*"):
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def read(output_dir: str, node: int) -> dict[str, Any] | None:
    try:
        return json.loads((_folder(output_dir) / f"node-{node}.json").read_text())
    except (OSError, ValueError):
        return None  # not written yet (or being replaced)


def wait_for_node0(output_dir: str, timeout_s: float,
                   sleep: Callable[[float], None] = time.sleep) -> str | None:
    """On a node above 0: wait until node 0 has said how its start went. Its error line when it
    failed, None when it starts; past `timeout_s`, a line saying it never said."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        said = read(output_dir, 0)
        if said and said["status"] == "failed":
            return f"node 0 failed at its start: {said.get('error', 'no reason given')}"
        if said:
            return None
        sleep(POLL_S)
    return f"node 0 did not start within {timeout_s:.0f} s (no word in {_folder(output_dir)})"


def wait_for_others(output_dir: str, timeout_s: float = STOP_WAIT_S) -> list[int]:
    """On node 0 after a stop: wait until every other node has said its part ended. The nodes
    that never did (an empty list when all did)."""
    nodes = several_nodes()
    if nodes is None:
        return []
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [node for node in range(1, nodes[1]) if read(output_dir, node) is None]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(POLL_S)
