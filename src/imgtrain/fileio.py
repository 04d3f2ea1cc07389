"""Writing a file atomically: a crash leaves the old file or the new one, never half of one.
Torch-free, for results.json, logs and exports as well as checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
