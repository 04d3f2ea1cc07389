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
import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

RECORD = ".hydra"
_chosen: dict[str, tuple[str, bool]] = {}  # run directory -> (record subdir, directory was new)
_launch_time: list[datetime.datetime] = []


def record_subdir(output_dir: str) -> str | None:
    """`.hydra` for a run's first command, `.hydra-N` after it; None (no record) on a rank above 0
    of an external torchrun launch. Resolved once per directory: Hydra may read it again."""
    if os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ:
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


def discard_startup(output_dir: str, started: float, keep_error_record: bool) -> None:
    """After a failure that changed nothing of the run: remove the directory if this command
    created it (keeping it, with its error record, for a sweep job), else this command's record."""
    subdir, is_new = _chosen.get(output_dir, (None, False))
    folder = Path(output_dir)
    results = folder / "results.json"
    if results.exists() and results.stat().st_mtime >= started:
        return  # training started and wrote its state: keep everything
    if is_new and not keep_error_record:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # the date folder above a timestamped run, if now empty
            folder.parent.rmdir()
    elif not is_new and subdir and subdir != RECORD:
        shutil.rmtree(folder / subdir, ignore_errors=True)


def shared_now(pattern: str) -> str:
    """`${imgtrain.now:pattern}`: Hydra's `${now:}` with one time per launch, rank 0's under an
    external torchrun.

    Each rank resolves the run directory on its own, a moment apart; a second's difference
    would give every rank its own directory and its own resume state.
    """
    if not _launch_time:
        _launch_time.append(_rank0_time() if _under_torchrun() else datetime.datetime.now())
    return _launch_time[0].strftime(pattern)


def _under_torchrun() -> bool:
    """Started by torchrun, whose agent hosts a store the ranks can reach before any process group
    exists (other launchers that only set RANK etc. should pass hydra.run.dir explicitly)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" \
        and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank0_time() -> datetime.datetime:
    """Rank 0 publishes its time in torchrun's rendezvous store; the other ranks read it there."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(minutes=5))
    key = f"imgtrain/launch_time/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if os.environ["RANK"] == "0":
        now = datetime.datetime.now()
        store.set(key, now.isoformat())
        return now
    return datetime.datetime.fromisoformat(store.get(key).decode())


def register() -> None:
    if not OmegaConf.has_resolver("imgtrain.now"):
        # Cached in the config, as Hydra's own `now`: a sweep's jobs, resolved in launcher
        # processes, see the time the sweep started.
        OmegaConf.register_new_resolver("imgtrain.now", shared_now, use_cache=True)
    if not OmegaConf.has_resolver("imgtrain.record_subdir"):
        OmegaConf.register_new_resolver("imgtrain.record_subdir", record_subdir)
