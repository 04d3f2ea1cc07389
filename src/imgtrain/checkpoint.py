"""Checkpoints: atomic writes, retention, integrity checks, and what a resume restores."""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from imgtrain.errors import ConfigError

FORMAT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"
_NUMBERED = re.compile(r"^(epoch|step)-(\d+)\.pt$")


def write_atomic(path: Path, write: Any) -> None:
    """Write through a temporary file and os.replace, so a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2, default=str) + "\n").encode()))


def save(state: dict[str, Any], path: Path) -> None:
    def write(file: Any) -> None:
        try:
            torch.save(state, file)
        except RuntimeError as exc:
            # torch's zip writer reports a short write (disk full, file size limit) this way.
            raise OSError(f"writing {path.name} stopped short (disk full?): "
                          f"{str(exc).strip().splitlines()[0]}") from exc

    write_atomic(path, write)


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
    """train.resume: auto = this run's last.pt if present, null = fresh, else a path."""
    if resume in (None, False, "null", "none"):
        return None
    if resume == "auto":
        candidate = output_dir / "checkpoints" / LAST
        return candidate if candidate.is_file() else None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise ConfigError(f"train.resume checkpoint not found: {path}")
    return path


def check_compatible(saved: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Refuse to resume into another arch, class count or global batch size."""
    for key, value in identity.items():
        old = saved.get("identity", {}).get(key)
        if old is not None and old != value:
            raise ConfigError(f"cannot resume from {path}: it was trained with {key}={old}, this "
                              f"run has {key}={value}; use a new hydra.run.dir or train.resume=null")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def prune(folder: Path, keep: int | None) -> None:
    """Keep the newest `keep` numbered checkpoints; last.pt and best.pt always stay."""
    if not keep or keep < 1:
        return
    # Newest by write time: epoch and step numbers count different things and do not interleave.
    numbered = sorted((p.stat().st_mtime_ns, p.name, p) for p in folder.glob("*.pt")
                      if _NUMBERED.match(p.name))
    for _, _, path in numbered[:-keep]:
        path.unlink(missing_ok=True)
