"""Shared fixtures: real generated data (JPEG folders, CIFAR-10 pickles) and a `python run.py` runner."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")
# Small, fast and CPU-only: what every subprocess run of the tests starts from.
TINY = ["device=cpu", "amp=O0", "model=resnet18", "train.print_freq=2", "dataset.workers=0"]


def class_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable image: a class-specific colour that survives any crop, a stripe, and noise."""
    colour = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 181 + 160) % 256],
                      dtype=np.float32)
    base = np.broadcast_to(colour, (size, size, 3)).copy()
    stripe = slice((label * size) // num_classes, ((label + 1) * size) // num_classes)
    base[stripe] = 255 - colour
    noisy = base + rng.normal(0, 20, base.shape)
    return noisy.clip(0, 255).astype(np.uint8)


def make_image_folder(root: Path, num_classes: int = 4, per_class: int = 24, val_per_class: int = 8,
                      size: int = 40, seed: int = 0) -> Path:
    """A real ImageFolder of JPEG files: root/{train,val}/class_k/img_i.JPEG."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = class_image(label, num_classes, size, rng)
                Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=90)
    return root


def make_cifar10(root: Path, per_class: int = 20, test_per_class: int = 10, seed: int = 0) -> Path:
    """CIFAR-10 in its real pickle layout (a small subset): root/cifar-10-batches-py/."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(count: int) -> dict:
        labels = [i % 10 for i in range(count)]
        data = np.stack([class_image(lab, 10, 32, rng).transpose(2, 0, 1).reshape(-1)
                         for lab in labels])
        return {"batch_label": "generated", "labels": labels, "data": data,
                "filenames": [f"{i}.png" for i in range(count)]}

    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(batch(per_class * 10), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test_per_class * 10), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


@pytest.fixture(scope="module")
def module_dir(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for a module's shared runs, removed once the module's tests have all passed:
    pytest keeps fixtures' folders to the session's end, and each run holds ~90 MB of
    checkpoints (tmp_path_retention_policy only covers the tests' own folders)."""
    folder = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    failed_before = request.session.testsfailed
    yield folder
    if request.session.testsfailed == failed_before:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar10(tmp_path_factory.mktemp("cifar"))


def run_cli(*overrides: str, cwd: Path | None = None, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python run.py ...` exactly as a user types it."""
    return subprocess.run([sys.executable, str(REPO / "run.py"), *overrides], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def wait_for(proc: subprocess.Popen, condition: Callable[[], Any], failure: str) -> None:
    """Poll `condition` (a file it reads may not exist yet) while the run lasts, up to 3 minutes."""
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(failure)


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, one `error:` line on stderr naming the fragments, and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def compose():
    """Compose the real config with Hydra, as run.py does."""
    from hydra import compose as hydra_compose, initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose


# One short quickstart run (one epoch of 4 steps, print points at 2 and 4, 2 validation batches).
SHORT = ["experiment=quickstart", *TINY, "train.epochs=1", "dataset.train_size=256",
         "dataset.val_size=128", "dataset.image_size=32"]


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """SHORT run once with stdout captured (not a terminal), in an outputs/ tree: the console
    tests read its output, the TensorBoard tests serve its folder."""
    run_dir = tmp_path_factory.mktemp("short") / "outputs" / "run"
    proc = run_cli(*SHORT, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc
