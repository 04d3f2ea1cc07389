"""torch, torchvision and torch_npu that do not belong together: one `error:` line naming both
versions and what to install, before any run folder is made (src/imgtrain/install.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_cli
from imgtrain import install

BELONG = [("2.14.1+cu130", "0.29.1+cu130"), ("2.13.0+cpu", "0.28.0+cpu"), ("2.5.1", "0.20.1"),
          ("2.9.0+cu126", "0.24.0+cu128"),   # one CUDA major: torchvision's own check passes
          ("2.14.1+cu130", "0.29.1+cpu"),    # a CPU torchvision loads into a CUDA torch
          ("2.15.0a0+git5c48869", "0.30.0a0+1f1a920"),  # source builds of one release
          ("1.13.1", "0.14.1"), ("2.0.0", "0.15.0")]
APART = [
    # the install: a CPU torch beside PyPI's CUDA torchvision of the same release
    ("2.13.0+cpu", "0.28.0+cu128", "torchvision is a cu128 build and torch a cpu build",
     "pip install 'torchvision==0.28.*' --index-url https://download.pytorch.org/whl/cpu"),
    ("2.14.1+cu130", "0.28.0+cu130", "torch 2.14's torchvision is 0.29, not 0.28",
     "pip install 'torchvision==0.29.*' --index-url https://download.pytorch.org/whl/cu130"),
    ("2.15.0", "0.29.1", "torch 2.15's torchvision is 0.30, not 0.29",
     "pip install 'torchvision==0.30.*'"),
    ("2.14.1+cu118", "0.29.1+cu126", "torchvision is built for CUDA 12, torch for CUDA 11",
     "--index-url https://download.pytorch.org/whl/cu118"),
    ("2.5.1+rocm6.2", "0.20.1+cu124", "torchvision is a cu124 build and torch a rocm6.2 build",
     "--index-url https://download.pytorch.org/whl/rocm6.2"),
]


@pytest.mark.parametrize("torch_version,vision_version", BELONG)
def test_pairs_that_belong_together_pass(torch_version: str, vision_version: str) -> None:
    assert install.torchvision_mismatch(torch_version, vision_version) is None


@pytest.mark.parametrize("torch_version,vision_version,why,fix", APART)
def test_a_pair_apart_is_named_with_the_torchvision_to_install(
        torch_version: str, vision_version: str, why: str, fix: str) -> None:
    line = install.torchvision_mismatch(torch_version, vision_version)
    assert line is not None and "\n" not in line
    assert line.startswith(f"torch {torch_version} and torchvision {vision_version} do not "
                           f"belong together ({why}); ")
    assert fix in line and "imgtrain is tested with torch 2.14 and torchvision 0.29" in line


def test_torch_npu_belongs_to_one_torch_release() -> None:
    for npu in ("2.5.1", "2.5.1.post3", "2.5.1rc1"):
        assert install.npu_mismatch("2.5.1+cpu", npu) is None
    line = install.npu_mismatch("2.6.0+cpu", "2.5.1.post3")
    assert line and "torch 2.6.0+cpu and torch_npu 2.5.1.post3" in line
    assert "pip install 'torch-npu==2.6.0.*'" in line


def test_this_environments_pair_belongs_together() -> None:
    assert install.mismatch() is None
    assert install.installed_version("torchvision").startswith("0.29")


def _fake_package(root: Path, name: str, version: str) -> None:
    """A package that says its version as a build writes it, and fails if anything imports it."""
    (root / name).mkdir(parents=True)
    (root / name / "version.py").write_text(f"__version__ = '{version}'\n")
    (root / name / "__init__.py").write_text(
        f"raise RuntimeError('operator {name}::nms does not exist (the fake was imported)')\n")


@pytest.mark.e2e
def test_a_mismatched_install_stops_with_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    """The issue's install (torch 2.13.0+cpu beside torchvision 0.28.0+cu128), as packages found
    before the real ones: `python run.py` names both and what to install, and makes nothing."""
    fakes, cwd = tmp_path / "site", tmp_path / "work"
    _fake_package(fakes, "torch", "2.13.0+cpu")
    _fake_package(fakes, "torchvision", "0.28.0+cu128")
    cwd.mkdir()
    python_path = os.pathsep.join(filter(None, [str(fakes), os.environ.get("PYTHONPATH")]))
    proc = run_cli("experiment=quickstart", cwd=cwd, env={"PYTHONPATH": python_path})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: torch 2.13.0+cpu and torchvision 0.28.0+cu128 do not belong together "
        "(torchvision is a cu128 build and torch a cpu build); install torchvision 0.28 beside "
        "torch 2.13.0+cpu: pip install 'torchvision==0.28.*' --index-url "
        "https://download.pytorch.org/whl/cpu (imgtrain is tested with torch 2.14 and "
        "torchvision 0.29)"], proc.stderr
    assert list(cwd.iterdir()) == []  # no outputs/, no .hydra/
