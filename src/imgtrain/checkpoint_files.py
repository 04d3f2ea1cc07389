"""Checkpoint files: atomic writes, one serialisation linked under several names, retention,
integrity checks, and each rank's RNG state. What a checkpoint holds is the Trainer's
`state_dict()` / `load_state_dict()`; when one is written, checkpoint_policy.py."""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from imgtrain.errors import ConfigError
from imgtrain.fileio import write_atomic

if TYPE_CHECKING:
    from imgtrain.plan import RunPlan

log = logging.getLogger("imgtrain")
FORMAT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"
_NUMBERED = re.compile(r"^(epoch|step)-(\d+)\.pt$")


def save(state: dict[str, Any], path: Path) -> None:
    def write(file: Any) -> None:
        try:
            torch.save(state, file)
        except RuntimeError as exc:
            # torch's zip writer reports a short write (disk full, file size limit) this way.
            raise OSError(f"writing {path.name} stopped short (disk full?): "
                          f"{str(exc).strip().splitlines()[0]}") from exc

    write_atomic(path, write)


def link_atomic(source: Path, path: Path) -> None:
    """`path` becomes the same file as `source`: a hard link, or a copy where links fail.

    Replaced atomically, like a write. Later writes of `source` replace its directory entry
    (os.replace), so the file behind `path` never changes under it.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            os.link(source, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: Path) -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint holds only tensors and plain Python values."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot load checkpoint {path} ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise ConfigError(f"{path} is not an imgtrain checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise ConfigError(f"{path} has checkpoint format {state['format_version']}, newer than this "
                          f"imgtrain's {FORMAT_VERSION}; upgrade imgtrain")
    return state


def resume_path(output_dir: Path, resume: Any) -> Path | None:
    """train.resume: auto = this run's last.pt if present, null = fresh, new = fresh in a new
    run folder (rundir.py), else a path."""
    if resume is None or str(resume).lower() in ("null", "none", "false", "new"):
        return None
    if resume == "auto":
        candidate = output_dir / "checkpoints" / LAST
        return candidate if candidate.is_file() else None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise ConfigError(f"train.resume checkpoint not found: {path}")
    return path


def identity(plan: RunPlan) -> dict[str, Any]:
    """What a run's checkpoint must share with the run that resumes it: saved in every checkpoint
    and compared on resume (check_compatible)."""
    return {"arch": plan.model.arch, "num_classes": plan.num_classes,
            "global_batch_size": plan.batches.global_batch, "freeze": plan.model.freeze,
            "stem": plan.model.stem}


def load_resume(path: Path, plan: RunPlan) -> dict[str, Any]:
    """The checkpoint a run resumes from, refused when it belongs to another kind of run."""
    saved = load(path)
    check_compatible(saved, identity(plan), path)
    return saved


def check_compatible(saved: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Refuse to resume into another arch, class count or global batch size."""
    for key, value in identity.items():
        old = saved.get("identity", {}).get(key)
        if old is not None and old != value:
            raise ConfigError(f"cannot resume from {path}: it was trained with {key}={old}, this "
                              f"run has {key}={value}; use a new hydra.run.dir or train.resume=null")


def rng_state(device_module: Any = None) -> dict[str, Any]:
    """This process's random generators: torch's CPU one, Python's, numpy's and its device's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state_as_plain_values()}
    if device_module is not None and device_module.is_initialized():
        state["device"] = device_module.get_rng_state()  # the current device's, not all of them
    return state


def set_rng_state(state: dict[str, Any], device_module: Any = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "device" in state and device_module is not None:
        device_module.set_rng_state(state["device"])


def _numpy_state_as_plain_values() -> list[Any]:
    """numpy's legacy state with its key array as a list: weights_only loads plain values only."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def numbered(folder: Path) -> list[tuple[int, str, Path]]:
    """The numbered checkpoints, oldest first by the step they record (an epoch-N file is as old as
    the step that ended epoch N, which the file's own state gives: numbers alone do not interleave).
    """
    found = []
    for path in folder.glob("*.pt"):
        match = _NUMBERED.match(path.name)
        if match:
            found.append((path.stat().st_mtime_ns, int(match.group(2)), path))
    # Write time orders files of different kinds; among equal times the number decides (never the
    # name: 'step-8.pt' sorts after 'step-18.pt').
    return [(number, path.name, path) for _, number, path in sorted(found, key=lambda f: f[:2])]


def prune(folder: Path, keep: int | None) -> None:
    """Keep the newest `keep` numbered checkpoints; last.pt and best.pt always stay."""
    if not keep or keep < 1:
        return
    for _, _, path in numbered(folder)[:-keep]:
        path.unlink(missing_ok=True)


class CheckpointWriter:
    """Rank 0's checkpoint files: one serialisation per save, linked as last.pt, best.pt and the
    numbered file; retention; and the train.on_checkpoint_error policy."""

    def __init__(self, folder: Path, *, keep: int | None = None, on_error: str = "fail",
                 enabled: bool = True) -> None:
        """`keep`, `on_error` and `enabled`: train.keep_checkpoints, on_checkpoint_error and
        save_checkpoints."""
        self.folder = folder
        self.keep = keep
        self.warn_on_error = on_error == "warn"
        self.enabled = enabled
        self.last_attempt = time.monotonic()  # successful or not: intervals count from here
        self.last_written = False  # whether the latest save reached the disk

    def write(self, state: dict[str, Any], name: str, best: bool) -> bool:
        """Write `name` (kept only with train.keep_checkpoints) and last.pt, and best.pt if `best`.
        Returns whether it was written; a failure keeps the previous files."""
        self.last_attempt = time.monotonic()
        self.last_written = False
        if not self.enabled:
            return False
        start = time.perf_counter()
        try:
            last = self.folder / LAST
            save(state, last)
            if best:
                link_atomic(last, self.folder / BEST)
            if self.keep:
                link_atomic(last, self.folder / name)
                prune(self.folder, self.keep)
        except OSError as exc:
            message = f"checkpoint write to {self.folder} failed: {exc}"
            if self.warn_on_error:
                log.warning("warning: %s; the previous checkpoint is kept, training goes on "
                            "(the next try is at the next checkpoint interval)", message)
                return False
            raise ConfigError(f"{message}; the previous checkpoint is kept "
                              "(train.on_checkpoint_error=warn to train on)") from None
        log.debug("checkpoint %s written in %.2f s", name, time.perf_counter() - start)
        self.last_written = True
        return True
