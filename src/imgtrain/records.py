"""The record of how a run was made, kept for every command that runs in its directory.

Hydra writes the composed config, its own config and the overrides to `<run>/.hydra/` and, run
again in the same directory (a resume, an eval), rewrites them. Here the first command keeps
`.hydra/` and each later one gets the next free `.hydra-N/`, through a resolver that
`hydra.output_subdir` names. A command that fails before it changed anything removes what it
added: a run directory it created, or its own record in an existing one.

Under an external torchrun every rank runs Hydra: the run directory's `${imgtrain.now:}` resolves
to rank 0's time on every rank, so all ranks pick one directory, and only rank 0 keeps a record.
"""
from __future__ import annotations

import contextlib
import datetime
import shutil
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from imgtrain import jobenv, slurm

RECORD = ".hydra"
# What a command writes once training has started: results.json says `running` before the first
# step. train.log is not among them: its lines before that (a checkpoint's arch taken, a new fc)
# belong to a start-up that failed, which leaves nothing (mode=predict and export included).
TRAINING_OUTPUTS = ("results.json", "checkpoints")
_chosen: dict[str, tuple[str, bool]] = {}  # run directory -> (record subdir, directory was new)
_launch_time: list[datetime.datetime] = []


def record_subdir(output_dir: str, node_rank: int = 0) -> str | None:
    """`.hydra` for a run's first command, `.hydra-N` after it. None (no record) on machines other
    than the first and on ranks above 0 of an external torchrun launch: they share the directory
    with global rank 0, which keeps the record. Resolved once per directory (Hydra reads it twice).
    """
    if int(node_rank) != 0 or not slurm.first_task() or not jobenv.is_main_process():
        return None
    if output_dir not in _chosen:
        folder = Path(output_dir)
        is_new = not any(folder.iterdir()) if folder.is_dir() else True
        number = 1
        while (folder / _name(number)).exists():
            number += 1
        _chosen[output_dir] = (_name(number), is_new)
    return _chosen[output_dir][0]


def _name(number: int) -> str:
    return RECORD if number == 1 else f"{RECORD}-{number}"


def recorded_cwd(run_dir: Path) -> Path | None:
    """The working directory the run's first command started in (Hydra's hydra.runtime.cwd in
    its record), against which the paths it was given relative to resolve; None without one."""
    try:
        record = yaml.safe_load((Path(run_dir) / RECORD / "hydra.yaml").read_text())
        cwd = record["hydra"]["runtime"]["cwd"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return Path(cwd) if isinstance(cwd, str) else None


def discard_startup(output_dir: str, started: float, keep_error_record: bool) -> bool:
    """After a failure: if the command changed nothing of the run, remove what it added (the run
    directory it created, unless a sweep job keeps it for its error record; else its own record)
    and return True. Only the process that chose the record decides (global rank 0, node 0)."""
    subdir, is_new = _chosen.get(output_dir, (None, False))
    if subdir is None:
        return False
    folder = Path(output_dir)
    if is_new:
        # Everything beyond the record is this command's: no clocks to compare.
        if keep_error_record or any((folder / name).exists() for name in TRAINING_OUTPUTS):
            return False
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # the date folder above a timestamped run, if now empty
            folder.parent.rmdir()
        return True
    results = folder / "results.json"
    if results.exists() and results.stat().st_mtime >= started:
        return False  # training went on and rewrote the run's state
    if subdir != RECORD:
        shutil.rmtree(folder / subdir, ignore_errors=True)
    return True


def shared_now(pattern: str) -> str:
    """`${imgtrain.now:pattern}`: Hydra's `${now:}`, but rank 0's time on every rank of an
    external torchrun launch.

    Each rank resolves the run directory on its own, a moment apart; a second's difference
    would give every rank its own directory and its own resume state.
    """
    # torchrun's agent hosts a store the ranks reach before any process group exists (other
    # launchers that only set RANK etc. should pass hydra.run.dir explicitly).
    agent_store = jobenv.agent_store_address()
    if agent_store is None or jobenv.ranks().world_size == 1:
        return datetime.datetime.now().strftime(pattern)  # cached per config, as Hydra's `now`
    if not _launch_time:
        _launch_time.append(_rank0_time(agent_store))
    return _launch_time[0].strftime(pattern)


def _rank0_time(agent_store: tuple[str, int]) -> datetime.datetime:
    """Rank 0 publishes its time in torchrun's rendezvous store; the other ranks read it there."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(*agent_store, is_master=False, timeout=timedelta(minutes=5))
    # One key for every restart of the launch: a restarted rank 0 keeps the first attempt's time,
    # so restarts land in the run directory they resume from.
    key = "imgtrain/launch_time"
    if jobenv.is_main_process():
        store.compare_set(key, "", datetime.datetime.now().isoformat())
    return datetime.datetime.fromisoformat(store.get(key).decode())


def register() -> None:
    if not OmegaConf.has_resolver("imgtrain.now"):
        # Cached in the config, as Hydra's own `now`: a sweep's jobs, resolved in launcher
        # processes, see the time the sweep started.
        OmegaConf.register_new_resolver("imgtrain.now", shared_now, use_cache=True)
    if not OmegaConf.has_resolver("imgtrain.record_subdir"):
        OmegaConf.register_new_resolver("imgtrain.record_subdir", record_subdir)
