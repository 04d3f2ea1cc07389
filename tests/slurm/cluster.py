"""A real two-node SLURM on this machine, from Debian's packages: munged, slurmctld and one slurmd
per node, all started here in the foreground (-D, -F) and stopped by the pids started.

Both nodes are this host (NodeHostname=localhost, NodeAddr=127.0.0.1, a port each), as Debian's
slurmd build allows. No systemd, no cgroups (proctrack/linuxproc, task/none), no accounting
database: imgtrain's launcher reads job states from `scontrol` where `sacct` has no database.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
START_TIMEOUT_S = 300  # a bound for daemons that never come up, not how long they take
NODE_CPUS = 6


def why_not() -> str | None:
    """Why no cluster can be started here (one line), or None."""
    missing = [name for name in (*DAEMONS, "sinfo", "sbatch", "scontrol")
               if not (shutil.which(name) or shutil.which(name, path="/usr/sbin"))]
    if missing:
        return ("SLURM is not installed (missing " + ", ".join(missing) + "): apt-get install "
                "slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


def _free_ports(count: int) -> list[int]:
    """`count` consecutive free ports (slurmd's Port= takes a range for n[1-2])."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            first = sock.getsockname()[1]
        if first + count < 65000 and all(_port_free(first + i) for i in range(count)):
            return list(range(first, first + count))
    raise RuntimeError("no free ports for the SLURM daemons")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _sbin(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin") or name


def _node_line() -> str:
    """Each node's CPUs and memory: this host's, as `slurmd -C` reports them, but at least
    NODE_CPUS CPUs, so that the tests' single-CPU jobs all run at once (SlurmdParameters=
    config_overrides lets a node claim more than it has)."""
    first = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True,
                           check=True).stdout.splitlines()[0]
    fields = dict(word.split("=", 1) for word in first.split() if "=" in word)
    return f"CPUs={max(int(fields['CPUs']), NODE_CPUS)} RealMemory={fields['RealMemory']}"


@dataclass
class Cluster:
    root: Path
    env: dict[str, str] = field(default_factory=dict)  # SLURM_CONF for every client command
    nodes: tuple[str, ...] = ("n1", "n2")
    start_seconds: float = 0.0
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> "Cluster":
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged refuses a key in a folder others may write
        conf = self._write_conf()
        self.env = {"SLURM_CONF": str(conf)}
        try:
            self._start_munge()
            self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(conf)], "slurmctld")
            for node in self.nodes:
                self._spawn([_sbin("slurmd"), "-D", "-N", node, "-f", str(conf)], f"slurmd-{node}")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _write_conf(self) -> Path:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        state, spool = self.root / "state", self.root / "spool"
        state.mkdir(exist_ok=True)
        spool.mkdir(exist_ok=True)
        self.munge_socket = self.root / "munge" / "munge.socket"
        settings = {
            "ClusterName": "imgtrain",
            "SlurmctldHost": f"{socket.gethostname().split('.')[0]}(127.0.0.1)",
            "SlurmctldPort": ctld_port, "SlurmUser": "root", "SlurmdUser": "root",
            "AuthType": "auth/munge", "CredType": "cred/munge",
            # A requeued job may start again only when the last one's credential expired:
            # SLURM's default is 120 s.
            "AuthInfo": f"socket={self.munge_socket},cred_expire=10",
            "StateSaveLocation": state, "SlurmdSpoolDir": f"{spool}/%n",
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd-%n.pid",
            "SlurmctldLogFile": self.root / "slurmctld.log",
            "SlurmdLogFile": self.root / "slurmd-%n.log",
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/builtin", "ReturnToService": 2, "MpiDefault": "none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "SlurmctldTimeout": 10, "SlurmdTimeout": 10, "MessageTimeout": 5,
            "KillWait": 5, "MinJobAge": 600, "InactiveLimit": 0, "Waittime": 0,
            # A requeued job is eligible again once its credential expired (above); the main
            # scheduling loop then starts it within this many seconds (SLURM's default: 60).
            "SchedulerParameters": "sched_interval=1",
            "SlurmdParameters": "config_overrides",
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines.append(f"NodeName=n[1-{len(self.nodes)}] NodeHostname=localhost NodeAddr=127.0.0.1 "
                     f"Port={node_ports[0]}-{node_ports[-1]} {_node_line()} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        conf = self.root / "slurm.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _start_munge(self) -> None:
        folder = self.munge_socket.parent
        folder.mkdir(mode=0o700, exist_ok=True)
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn([_sbin("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
                     f"--seed-file={folder / 'munged.seed'}",
                     f"--log-file={folder / 'munged.log'}"], "munged")
        self._wait(lambda: self.munge_socket.exists(), "munged's socket")

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self._procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env},
                                            start_new_session=True))
        log.close()

    def _wait(self, condition, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            dead = [p for p in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0].args[0]} exited ({dead[0].returncode}) while "
                                   f"waiting for {what}; see {self.root}")
            if condition():
                return
            time.sleep(0.2)
        raise RuntimeError(f"no {what} after {START_TIMEOUT_S} s; see {self.root}")

    def _wait_idle(self) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            return sorted(out[1::2]) == ["idle"] * len(self.nodes)
        self._wait(idle, "idle nodes in sinfo")

    def run(self, *argv: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout,
                              env={**os.environ, **self.env})

    def stop(self) -> None:
        """Cancels every job (their slurmstepd and tasks end with them), then SIGTERM to each
        daemon started here (slurmd first), then SIGKILL to what is left."""
        if self._procs and self.env:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 15
            while (self.run("squeue", "-h", check=False).stdout.strip()
                   and time.monotonic() < deadline):
                time.sleep(0.2)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in reversed(self._procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
