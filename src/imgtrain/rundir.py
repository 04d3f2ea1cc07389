"""Which run folder a command trains in: the same command's unfinished run, or a new one.

A run stopped by Ctrl-C, a preemption or a crash is resumed by typing its command again, and a
requeued SLURM job, which re-runs its script's command, lands in its own run: `hydra.run.dir`'s
`${imgtrain.run_dir:root,${hydra.overrides.task},new}` looks, before Hydra makes a folder, for
the newest run under `root` made by the same overrides (its `.hydra/overrides.yaml`). In a SLURM
job the run that records the job's id in results.json is its run whatever its state; otherwise
the newest same-command run is taken up if it is unfinished, has a checkpoint and no command is
training in it now (the one that does holds a lock on its record). train.resume=new starts anew.

`python run.py hydra.run.dir=<run>` alone resumes that run: `with_recorded_overrides` adds the
overrides in its record that the command line does not set, before Hydra reads the command line.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import yaml

from imgtrain import jobenv, slurm
from imgtrain.config import override_key

RECORD = Path(".hydra") / "overrides.yaml"  # the command that made the run (records.py)
IGNORED_KEYS = ("train.resume",)  # not part of what a run computes
NEW = "new"
SAME_COMMAND = "the same command's unfinished run; train.resume=new starts a new one"
SAME_JOB = "this SLURM job's run (requeued); train.resume=new starts a new one"
_reasons: dict[str, str] = {}  # chosen run folder -> why, for the start summary
_new: list[Path] = []  # the new run folders chosen: Hydra makes them before the run starts


def _command(overrides: list[str]) -> list[str]:
    """The overrides that identify a command: train.resume aside, in any order."""
    return sorted(o for o in overrides if override_key(o) not in IGNORED_KEYS)


def _read_overrides(run: Path) -> list[str] | None:
    try:
        recorded = yaml.safe_load((run / RECORD).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(o) for o in recorded] if isinstance(recorded, list) else None


def _results(run: Path) -> dict[str, Any]:
    from imgtrain.results import RESULTS, read

    return read(run / RESULTS) or {}


def in_use(run: Path) -> bool:
    """Whether a command is training in `run` now (it holds the lock on the run's record).
    Ranks above 0 of an external torchrun do not ask: rank 0, which chose the same run a moment
    before, holds it."""
    if not jobenv.is_main_process():
        return False
    try:
        fd = os.open(run / RECORD, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock this probe took


@contextlib.contextmanager
def hold(run: str) -> Iterator[None]:
    """While a command trains in `run`: another command's search passes over it. The lock goes
    with the process (a killed run leaves none) and is shared by the processes it forks."""
    try:
        fd = os.open(Path(run) / RECORD, os.O_RDONLY)
    except OSError:  # no record here (a node above 0, a rank above 0 of torchrun)
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def _name(run: str) -> str:
    """A run folder's name after its time (`<time>_<name>`): the same command gives the same."""
    return Path(run).name.partition("_")[2]


def _same_command_runs(root: Path, command: list[str], name: str) -> list[Path]:
    """Runs under root/<date>/<time>_<name> made by `command`, newest first. The name is read
    first: a record is opened only for the runs whose folder name could be this command's."""
    runs = [run for run in root.glob("*/*") if _name(str(run)) == name
            and run.parent.name != "multirun" and (run / RECORD).is_file()]
    same = [run for run in runs if _command(_read_overrides(run) or []) == command]
    return sorted(same, key=lambda run: (run / RECORD).stat().st_mtime, reverse=True)


def _resumable(run: Path) -> bool:
    results = _results(run)
    return (results.get("mode", "train") == "train" and results.get("status") != "completed"
            and (run / "checkpoints" / "last.pt").is_file() and not in_use(run))


def choose(root: str, overrides: Any, new: str) -> str:
    """`${imgtrain.run_dir:...}`: the run folder for a command with these task overrides."""
    overrides = [str(o) for o in overrides]
    resume = next((o.partition("=")[2] for o in overrides if override_key(o) == "train.resume"),
                  None)
    if resume == NEW or not Path(root).is_dir():
        _new.append(Path(root) / new)
        return str(Path(root) / new)
    runs = _same_command_runs(Path(root), _command(overrides), _name(new))
    job = slurm.job_id()
    same_job = [run for run in runs if job and str(_results(run).get("slurm_job_id")) == job]
    if same_job and not in_use(same_job[0]):
        return _chosen(same_job[0], SAME_JOB)
    if runs and _resumable(runs[0]):
        return _chosen(runs[0], SAME_COMMAND)
    _new.append(Path(root) / new)
    return str(Path(root) / new)


def discard_unstarted() -> None:
    """After a Ctrl-C during the start: remove the new run folder if nothing but Hydra's record
    is in it yet (and its date folder, if that is empty then)."""
    for folder in _new:
        if folder.is_dir() and all(path.name.startswith(".hydra") for path in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.parent.rmdir()


def _chosen(run: Path, reason: str) -> str:
    _reasons[str(run)] = reason
    return str(run)


def reason(output_dir: str) -> str | None:
    """Why this command trains in an existing run without having named it (None: it named it,
    or the run is new)."""
    return next((why for run, why in _reasons.items()
                 if Path(run).resolve() == Path(output_dir).resolve()), None)


def with_recorded_overrides(argv: list[str]) -> tuple[list[str], str | None]:
    """`python run.py hydra.run.dir=<run> [key=value ...]`: the run's recorded overrides that the
    command line does not set go first, so the run resumes as it was made; and a line saying what
    was taken and which command-line values differ from the record (None: nothing to say)."""
    if any(arg in ("-m", "--multirun") for arg in argv):
        return argv, None
    run_dir = next((a.partition("=")[2] for a in argv if a.startswith("hydra.run.dir=")), None)
    recorded = _read_overrides(Path(run_dir)) if run_dir else None
    if not recorded:
        return argv, None
    given = {override_key(a): a for a in argv if "=" in a and not a.startswith("-")}
    taken = [o for o in recorded if _setting(given, override_key(o)) is None]
    differ = [_differs(given[key], o) for o in recorded
              if (key := _setting(given, override_key(o))) is not None and given[key] != o]
    if not taken and not differ:
        return argv, None
    note = f"resume     {run_dir}: its recorded overrides {' '.join(taken) or '(none taken)'}"
    if differ:
        note += f"; from this command: {', '.join(differ)}"
    return [*taken, *argv], note


def _setting(given: dict[str, str], key: str) -> str | None:
    """The command-line key that sets `key`: the key itself, or its group (`world=1p` chooses the
    world anew, so a recorded `world.nproc_per_node=2` no longer applies)."""
    return next((g for g in given if key == g or key.startswith(f"{g}.")), None)


def _differs(given: str, recorded: str) -> str:
    if override_key(given) == override_key(recorded):
        return f"{given} (was {recorded.partition('=')[2]})"
    return f"{given} (instead of {recorded})"


def register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("imgtrain.run_dir"):
        OmegaConf.register_new_resolver("imgtrain.run_dir", choose, use_cache=True)
