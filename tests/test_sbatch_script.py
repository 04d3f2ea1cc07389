"""scripts/imgtrain.sbatch runs as it is on a CPU partition: it asks for no device and no fixed
CPUs or time, its log lands in outputs/ (in git, contents ignored), and its command trains. The
cluster's own runs of it are tests/test_slurm.py's; here no SLURM daemon is needed."""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHORT

SCRIPT = REPO / "scripts" / "imgtrain.sbatch"
# What a site, a partition or the user decides: never fixed in the template.
SITE_REQUESTS = ("--gpus", "--gres", "--cpus-per-task", "--cpus-per-gpu", "--mem", "--time",
                 "--partition", "--account", "--exclusive")


def _directives() -> dict[str, str]:
    """The #SBATCH options, as sbatch reads them (up to the first command)."""
    options: dict[str, str] = {}
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("#SBATCH"):
            option = shlex.split(line[len("#SBATCH"):], comments=True)[0]
            name, _, value = option.partition("=")
            options[name] = value
        elif line.strip() and not line.startswith("#"):
            break
    return options


def test_the_script_parses_and_asks_for_no_device_cpus_or_time() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    options = _directives()
    assert not [name for name in options if name.startswith(SITE_REQUESTS)], options
    assert options["--ntasks-per-node"] == "1" and options["--signal"] == "B:USR1@120"
    # The log goes to a folder every clone has (SLURM does not make it), which git ignores.
    log = Path(options["--output"])
    assert log.parent == Path("outputs") and "%j" in log.name
    ignored = (REPO / "outputs" / ".gitignore").read_text().split()
    assert ignored == ["*", "!.gitignore"]


@pytest.mark.e2e
def test_the_scripts_command_trains_on_the_cpu_with_the_jobs_cpus(tmp_path: Path) -> None:
    """The script run as SLURM's batch shell runs it, with `srun` standing in: a fake that
    records its options and environment, then runs the task's command."""
    fake_bin, work, run_dir = tmp_path / "bin", tmp_path / "submitted_here", tmp_path / "run"
    fake_bin.mkdir()
    work.mkdir()
    srun = fake_bin / "srun"
    srun.write_text("#!/bin/bash\n"
                    "echo \"$@\" > \"$SRUN_RECORD\"\n"
                    "echo \"SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK\" >> \"$SRUN_RECORD\"\n"
                    "while [[ $1 == -* ]]; do shift; done\n"
                    "exec \"$@\"\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "srun.txt"
    env = {**os.environ, "SRUN_RECORD": str(record), "IMGTRAIN_HOME": str(REPO),
           "SLURM_CPUS_PER_TASK": "2",
           "PATH": os.pathsep.join([str(fake_bin), str(Path(sys.executable).parent),
                                    os.environ.get("PATH", "")])}
    env.pop("SRUN_CPUS_PER_TASK", None)
    tiny = [*SHORT, "dataset.train_size=64", "dataset.val_size=16", "train.save_checkpoints=false"]
    proc = subprocess.run(["bash", str(SCRIPT), *tiny, f"hydra.run.dir={run_dir}"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    options, cpus = record.read_text().splitlines()
    assert re.match(r"--kill-on-bad-exit=1 python \S+/run\.py experiment=quickstart", options)
    assert cpus == "SRUN_CPUS_PER_TASK=2"  # the task gets the job's CPUs (SLURM >= 22.05)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    assert list(work.iterdir()) == []  # nothing left where it was submitted
