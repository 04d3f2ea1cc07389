"""`python run.py ...` without paying Python's imports again: a server for the tests' run_cli.

Each `python run.py` spends ~8 s of a 2-core machine importing torch, torchvision (which imports
torch._dynamo), Hydra and TensorBoard before it parses its first argument; the suite starts about
two hundred of them. This server imports those modules once, then forks a child per command. The
child is a process of its own, as `python run.py` is: it takes the command's working directory,
environment and argv, writes to its own stdout and stderr files, and runs run.py as `__main__`
(runpy), so Hydra finds run.py's config, a spawned rank re-imports run.py, and the exit code is
the one the interpreter would give, a traceback included. What it skips is the import of modules
that `python run.py` would import anyway, and their teardown at the exit.

Protocol, one JSON line each way on stdin/stdout: {"op": "start", "argv", "cwd", "env", "stdout",
"stderr", "max_file_bytes"} answered {"pid"}; {"op": "wait", "pid", "timeout"} answered
{"returncode"} or {"running": true}. When stdin closes, the server kills what still runs and exits.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import resource
import runpy
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_PY = str(REPO / "run.py")
sys.path.insert(0, str(REPO))

# What any run imports, at module level or lazily. Nothing here runs an op (see serve()).
import run  # noqa: E402,F401  hydra and imgtrain's config
import imgtrain.app  # noqa: E402,F401  what run.py's main imports: torch, torchvision, ...
import imgtrain.worker  # noqa: E402,F401  the trainer, models, data, TensorBoard's writer
import torchvision.transforms.v2  # noqa: E402,F401


def _child(request: dict) -> None:
    """Become `python run.py <argv>` in the request's directory and environment; never returns."""
    os.setpgid(0, 0)  # as start_new_session: its ranks and workers share a group to kill at once
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # found again from this environment's TMPDIR, as a new process does
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.path[0] = str(REPO)  # as for `python run.py`: the script's folder first
    _python_path(request["env"].get("PYTHONPATH", ""))
    if request.get("max_file_bytes"):  # a full disk: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["max_file_bytes"],) * 2)
    sys.argv = [RUN_PY, *request["argv"]]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _exit(*_run_main())


def _run_main() -> tuple[int, bool]:
    """run.py as `__main__`, and the exit code the interpreter would give its ending (with
    whether it ends by SIGINT, as Python does after a KeyboardInterrupt)."""
    try:
        runpy.run_path(RUN_PY, run_name="__main__")
    except SystemExit as exc:  # what Py_Exit makes of sys.exit's argument
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0, False
        print(exc.code, file=sys.stderr)
        return 1, False
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        return 1, True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1, False
    return 0, False


def _exit(code: int, by_sigint: bool) -> None:
    """End as the interpreter does (non-daemon threads joined, atexit handlers run, streams
    flushed) but without tearing down its modules: in a forked child that teardown writes to every
    page it shares with the server and takes ~2.5 s of the 2-core machine, a third of a short run.
    A file that only a finaliser would flush stays unwritten here, which the tests then catch."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if by_sigint:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _python_path(python_path: str) -> None:
    """What Python's start does with a PYTHONPATH the server was not started with: its folders
    go after the script's, and site imports a sitecustomize found there."""
    added = [folder for folder in python_path.split(os.pathsep)
             if folder and folder not in sys.path]
    sys.path[1:1] = added
    if any(os.path.exists(os.path.join(folder, "sitecustomize.py")) for folder in added):
        sys.modules.pop("sitecustomize", None)
        importlib.import_module("sitecustomize")


def _wait(pid: int, timeout: float) -> dict:
    """The child's exit code, or that it is still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status)}
        if time.monotonic() >= deadline:
            return {"running": True}
        time.sleep(0.02)


def serve() -> None:
    # Forking after `import torch` is what every DataLoader worker does; forking after an op has
    # started torch's OpenMP pool, or with another Python thread running, would not be safe.
    assert threading.active_count() == 1, "the server must fork from its only Python thread"
    # The children's garbage collections then skip what the imports made (~350k objects) instead
    # of touching, and so copying, the pages they share with the server.
    gc.freeze()
    running: set[int] = set()
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)  # never returns
            running.add(pid)
            reply = {"pid": pid}
        else:
            reply = _wait(request["pid"], request["timeout"])
            if "returncode" in reply:
                running.discard(request["pid"])
        print(json.dumps(reply), flush=True)
    for pid in running:  # the tests ended (or died) and left a run going: end it and its ranks
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    print(json.dumps({"ready": True}), flush=True)
    serve()
