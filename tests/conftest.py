"""Shared fixtures: real generated data (JPEG folders, CIFAR-10 pickles) and a `python run.py` runner."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


def _split_cores_between_workers() -> None:
    """pytest-xdist's workers (pyproject's addopts: `-n auto`) share the cores as a node's ranks
    do: each worker's torch, and every process it starts, gets its share of them. Set before
    anything imports torch, whose OpenMP runtime reads it once."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


_split_cores_between_workers()


def _private_index_cache() -> None:
    """dataset.index_cache=auto writes to $XDG_CACHE_HOME: the tests' trees are indexed in a
    folder of their own, not in the user's ~/.cache, and every run they start inherits it."""
    if "IMGTRAIN_TESTS_CACHE" not in os.environ:
        cache = tempfile.mkdtemp(prefix="imgtrain-tests-cache-")
        os.environ["IMGTRAIN_TESTS_CACHE"] = os.environ["XDG_CACHE_HOME"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)


_private_index_cache()


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


class _CliServer:
    """tests/cli_server.py, started on first use and ended by closing its stdin."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def ask(self, request: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_server.py")],
                                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)
            assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "tests/cli_server.py ended without an answer"
        return json.loads(line)


_SERVER = _CliServer()


class CliProcess:
    """A `python run.py` forked by tests/cli_server.py, used as a subprocess.Popen is: pid (also
    its process group's), poll, wait, send_signal, kill, communicate; text stdout and stderr."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str],
                 max_file_bytes: int | None = None, terminal: str | None = None) -> None:
        self.args = [sys.executable, str(REPO / "run.py"), *argv]
        self.returncode: int | None = None
        self._output = ("", "")
        self._out = Path(tempfile.mkdtemp(prefix="run_cli"))
        self.pid = _SERVER.ask({"op": "start", "argv": argv, "cwd": str(cwd), "env": env,
                                "stdout": terminal or str(self._out / "stdout"),
                                "stderr": terminal or str(self._out / "stderr"),
                                "max_file_bytes": max_file_bytes})["pid"]

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            reply = _SERVER.ask({"op": "wait", "pid": self.pid,
                                 "timeout": 1e9 if timeout is None else timeout})
            if reply.get("running"):
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = reply["returncode"]
            self._output = self._read()  # kept in memory: its folder goes now, read or not
            shutil.rmtree(self._out, ignore_errors=True)
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a signal to a reaped pid that may belong to another
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            exc.output, exc.stderr = self._read()
            raise
        return self._output

    def _read(self) -> tuple[str, str]:
        return tuple((self._out / name).read_text(errors="replace") if (self._out / name).exists()
                     else "" for name in ("stdout", "stderr"))


# The most a test waits for a run to reach a state (a line in its log, a file, a status) or to
# end: a bound for a run that never gets there, not an estimate of how long it takes. The state
# reached ends the wait at once, so only a failing test ever waits this long.
STATE_BOUND_S = 600


# e2e (the default, and so CI's): the runs of the tests marked e2e, the few that stand for a
# user's commands, start as a new `python run.py`; the others fork from tests/cli_server.py.
# 1: every run starts as a new interpreter, the slow way; 0: none does.
FRESH_PYTHON = os.environ.get("IMGTRAIN_TESTS_FRESH_PYTHON", "e2e")
_in_e2e_test = [False]


@pytest.fixture(autouse=True)
def _e2e_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whether the running test is marked e2e: its runs start as a user's do, a new Python."""
    _in_e2e_test[0] = request.node.get_closest_marker("e2e") is not None
    yield
    _in_e2e_test[0] = False


def fresh_python() -> bool:
    return FRESH_PYTHON == "1" or (FRESH_PYTHON == "e2e" and _in_e2e_test[0])


def start_cli(*overrides: str, cwd: Path | None = None, env: dict | None = None,
              max_file_bytes: int | None = None,
              terminal: str | None = None) -> subprocess.Popen | CliProcess:
    """`python run.py ...` as a user types it, started: its own process (and process group),
    argv, working directory, environment, stdout, stderr and exit code. It is forked from
    tests/cli_server.py, which has imported run.py's modules already (about 8 s a run saved),
    unless the environment sets a PYTHON* variable other than PYTHONPATH (which the server
    applies as Python's start does), or IMGTRAIN_TESTS_FRESH_PYTHON is 1 (or e2e, in a test
    marked e2e): then it is a new `python run.py`. `max_file_bytes` makes it a full disk: no file grows past that size.
    `terminal` (a pseudo-terminal's device path) takes its stdout and stderr instead of pipes."""
    full_env = {**os.environ, **(env or {})}
    if fresh_python() or any(key.startswith("PYTHON") and key != "PYTHONPATH"
                                    for key in env or {}):
        with open(terminal, "w") if terminal else contextlib.nullcontext(subprocess.PIPE) as output:
            return subprocess.Popen([sys.executable, str(REPO / "run.py"), *overrides],
                                    cwd=cwd or REPO, stdout=output, stderr=output, text=True,
                                    env=full_env, start_new_session=True,
                                    preexec_fn=max_file_bytes and (
                                        lambda: _full_disk(max_file_bytes)))
    return CliProcess(list(overrides), cwd or REPO, full_env, max_file_bytes, terminal)


def _full_disk(max_file_bytes: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))


def run_cli(*overrides: str, cwd: Path | None = None, timeout: float | None = None,
            env: dict | None = None,
            max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """start_cli's run to its end, as subprocess.run: killed with its ranks past `timeout`
    (STATE_BOUND_S unless given)."""
    timeout = STATE_BOUND_S if timeout is None else timeout
    proc = start_cli(*overrides, cwd=cwd, env=env, max_file_bytes=max_file_bytes)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for(proc: subprocess.Popen, condition: Callable[[], Any], failure: str) -> None:
    """Poll `condition` (a file it reads may not exist yet) while the run lasts (at most
    STATE_BOUND_S): fails at once if the run ends without it."""
    deadline = time.monotonic() + STATE_BOUND_S
    while time.monotonic() < deadline:
        ended = proc.poll() is not None
        try:
            if condition():
                return
        except OSError:
            pass
        if ended:
            raise AssertionError(f"{failure} (the run ended first, exit code {proc.returncode})")
        time.sleep(0.01)
    raise AssertionError(f"{failure} (after {STATE_BOUND_S} s)")


def _group_states(pgid: int) -> list[str]:
    """The state letter (/proc/PID/stat) of each process in process group `pgid`."""
    states = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(fields[2]) == pgid:  # state, ppid, pgrp
                states.append(fields[0])
    return states


@contextlib.contextmanager
def paused(proc: subprocess.Popen | CliProcess) -> Iterator[None]:
    """Within: the run's process group (its ranks, agent and loader workers) stopped by SIGSTOP,
    so what the test reads of it stays true until the test has acted on it (signalled it),
    however fast or slow the machine; SIGCONT after. A signal sent within is delivered when the
    run goes on."""
    deadline = time.monotonic() + STATE_BOUND_S
    try:
        while True:  # again until every member is stopped: one may have forked meanwhile
            os.killpg(proc.pid, signal.SIGSTOP)
            # T: stopped; Z/X: exited. A process in a system call (D, an fsync) stops on return.
            if all(state in "TtZX" for state in _group_states(proc.pid)):
                break
            assert time.monotonic() < deadline, "the run's processes never stopped"
            time.sleep(0.001)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)


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
