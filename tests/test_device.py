"""device=npu|gpu|cpu: the real DeviceInfo mapping, checked without the hardware.

torch.npu and torch_npu are faked only where they are truly absent (this host has no torch_npu);
everything else is the real code path.
"""
from __future__ import annotations

import importlib.machinery
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import TINY, assert_clean_error, run_cli
from imgtrain import device as devices
from imgtrain.device import DeviceInfo
from imgtrain.errors import ConfigError


class FakeNpuScaler:
    """Stands in for torch_npu's GradScaler: records how it was made and configured."""

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.growth_interval = kwargs, 2000

    def set_growth_interval(self, interval: int) -> None:
        self.growth_interval = interval


class Recorder:
    """Stands in for torch.npu (or torch.cuda's functions): records what the device module calls."""

    def __init__(self, available: bool = True, count: int = 8) -> None:
        self.calls: list[tuple] = []
        self.available, self.count = available, count
        self.amp = types.SimpleNamespace(GradScaler=FakeNpuScaler)

    def set_device(self, device: str) -> None:
        self.calls.append(("set_device", device))

    def synchronize(self) -> None:
        self.calls.append(("synchronize",))

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return self.count


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """An importable torch_npu that registered torch.npu, as the real one does on import."""
    assert importlib.util.find_spec("torch_npu") is None, "this test fakes an absent torch_npu"
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    optim = types.ModuleType("torch_npu.optim")
    optim.NpuFusedSGD = type("NpuFusedSGD", (), {})
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setitem(sys.modules, "torch_npu.optim", optim)
    recorder = Recorder()
    monkeypatch.setattr(torch, "npu", recorder, raising=False)
    for key in devices.NPU_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    return recorder


# ---- the mapping -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, type_, backend, half", [
    ("npu", "npu", "hccl", torch.float16),
    ("gpu", "cuda", "nccl", torch.float16),
    ("cpu", "cpu", "gloo", torch.bfloat16),
])
def test_backend_autocast_type_and_half_dtype(name, type_, backend, half):
    info = DeviceInfo(name, 0 if name != "cpu" else None)
    assert (info.type, info.backend, info.autocast_type, info.default_half_dtype) == \
        (type_, backend, type_, half)
    assert info.is_accelerator == (name != "cpu")


@pytest.mark.parametrize("info, expected", [
    (DeviceInfo("npu", 3), "npu:3"), (DeviceInfo("gpu", 1), "cuda:1"), (DeviceInfo("cpu"), "cpu")])
def test_device_strings_never_bare_ints(info: DeviceInfo, expected: str):
    assert info.device_string == expected


def test_torch_device_for_cuda_and_cpu():
    assert DeviceInfo("gpu", 1).torch_device == torch.device("cuda", 1)
    assert DeviceInfo("cpu").torch_device == torch.device("cpu")


def test_npu_binds_and_synchronizes_through_torch_npu(fake_npu: Recorder):
    info = devices.for_local_rank("npu", 5)
    info.set_current()
    info.synchronize()
    assert fake_npu.calls == [("set_device", "npu:5"), ("synchronize",)]
    assert info.module() is fake_npu


def test_gpu_binds_and_synchronizes_through_torch_cuda(monkeypatch: pytest.MonkeyPatch):
    recorder = Recorder()
    monkeypatch.setattr(torch.cuda, "set_device", recorder.set_device)
    monkeypatch.setattr(torch.cuda, "synchronize", recorder.synchronize)
    info = devices.for_local_rank("gpu", 2)
    info.set_current()
    info.synchronize()
    assert recorder.calls == [("set_device", "cuda:2"), ("synchronize",)]


def test_cpu_has_no_device_module_and_nothing_to_synchronize(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: pytest.fail("cpu synchronized cuda"))
    info = devices.for_local_rank("cpu", 3)
    assert info.index is None and info.module() is None
    info.set_current()
    info.synchronize()


def test_npu_static_scale_never_uses_torch_npus_static_mode(fake_npu: Recorder):
    """torch_npu's dynamic=False applies overflowed steps: a static scale is its dynamic mode with
    growth out of reach (Precision re-pins the scale), as with torch.amp's scaler."""
    static = DeviceInfo("npu", 0).grad_scaler(1024.0, dynamic=False)
    assert static.kwargs == {"init_scale": 1024.0, "dynamic": True}
    assert static.growth_interval >= 1 << 30
    dynamic = DeviceInfo("npu", 0).grad_scaler(2.0 ** 16)
    assert dynamic.kwargs["dynamic"] is True and dynamic.growth_interval == 2000


def test_torch_scaler_static_never_grows_and_dynamic_does():
    static = DeviceInfo("cpu").grad_scaler(1024.0, dynamic=False)
    dynamic = DeviceInfo("cpu").grad_scaler(2.0 ** 16)
    assert static.get_scale() == 1024.0 and static.get_growth_interval() >= 1 << 30
    assert dynamic.get_growth_interval() == 2000


def test_fused_sgd_is_torch_npus_on_the_npu_only(fake_npu: Recorder):
    assert DeviceInfo("npu", 0).fused_sgd_class() is sys.modules["torch_npu.optim"].NpuFusedSGD
    assert DeviceInfo("gpu", 0).fused_sgd_class() is None
    assert DeviceInfo("cpu").fused_sgd_class() is None


def test_visible_count(fake_npu: Recorder):
    assert devices.visible_count("npu") == 8
    assert devices.visible_count("cpu") >= 1 << 20


# ---- resolving device=... --------------------------------------------------------------------
def test_npu_env_defaults_are_set_only_where_unset(fake_npu: Recorder,
                                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HCCL_CONNECT_TIMEOUT", "300")
    assert devices.resolve_name("npu") == "npu"
    assert os.environ["TASK_QUEUE_ENABLE"] == "2"  # Ascend's recommendation; torch_npu's default is 1
    assert os.environ["HCCL_CONNECT_TIMEOUT"] == "300"


def test_auto_prefers_a_visible_npu_and_falls_back_without_one(fake_npu: Recorder):
    assert devices.resolve_name("auto") == "npu"
    fake_npu.available = False
    assert devices.resolve_name("auto") == ("gpu" if torch.cuda.is_available() else "cpu")


def test_auto_never_imports_torch_npu_where_it_is_absent(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TASK_QUEUE_ENABLE", raising=False)
    assert devices.resolve_name("auto") in ("gpu", "cpu")
    assert "torch_npu" not in sys.modules and "TASK_QUEUE_ENABLE" not in os.environ


@pytest.mark.parametrize("value", ["", "0", "0,1,2,3", "4,5"])
def test_ascending_visible_devices_pass(value: str):
    devices.check_ascend_visible_devices(value)


@pytest.mark.parametrize("value, fix", [("3,1", "1,3"), ("0,0,1", "0,1"), ("1,a", None)])
def test_visible_devices_out_of_order_are_refused_with_the_fix(value: str, fix: str | None):
    with pytest.raises(ConfigError, match="ASCEND_RT_VISIBLE_DEVICES") as info:
        devices.check_ascend_visible_devices(value)
    if fix:
        assert "is_available() is silently False" in str(info.value)
        assert f"ASCEND_RT_VISIBLE_DEVICES={fix}" in str(info.value)


def test_unknown_device_is_refused():
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        devices.resolve_name("tpu")


# ---- the command line, as a user on a host without an NPU sees it -----------------------------
def fake_torch_npu(root: Path, body: str) -> dict[str, str]:
    """A torch_npu package on PYTHONPATH whose import does `body`; returns the env to use it."""
    (root / "torch_npu").mkdir(parents=True)
    (root / "torch_npu" / "__init__.py").write_text(body)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


def npu_run(tmp_path: Path, env: dict[str, str] | None = None):
    base = [o for o in TINY if not o.startswith("device=")]
    return run_cli(*base, "device=npu", "dataset=synthetic", f"hydra.run.dir={tmp_path / 'run'}",
                   env=env)


def test_npu_without_torch_npu_is_one_error_line(tmp_path: Path):
    assert importlib.util.find_spec("torch_npu") is None
    line = assert_clean_error(npu_run(tmp_path), "device=npu needs torch_npu",
                              f"pip install 'torch-npu=={torch.__version__.split('+')[0]}.*'",
                              "docs/precision-and-npu.md")
    assert "CANN" in line


def test_npu_with_torch_npu_that_cannot_load_is_one_error_line(tmp_path: Path):
    env = fake_torch_npu(tmp_path / "site", "raise OSError('libhccl.so: cannot open shared "
                                            "object file: No such file or directory')\n")
    assert_clean_error(npu_run(tmp_path, env), "torch_npu is installed but cannot load",
                       "libhccl.so", "install Ascend CANN", "set_env.sh")


def test_npu_with_no_visible_device_is_one_error_line(tmp_path: Path):
    env = fake_torch_npu(tmp_path / "site", "import torch, types\ntorch.npu = types.SimpleNamespace("
                                            "is_available=lambda: False, device_count=lambda: 0)\n")
    assert_clean_error(npu_run(tmp_path, env), "no NPU is visible", "npu-smi info")


def test_npu_visible_devices_out_of_order_is_one_error_line(tmp_path: Path):
    env = fake_torch_npu(tmp_path / "site", "raise AssertionError('not reached')\n")
    assert_clean_error(npu_run(tmp_path, {**env, "ASCEND_RT_VISIBLE_DEVICES": "1,0"}),
                       "ascending", "ASCEND_RT_VISIBLE_DEVICES=0,1")


# Page faults per training step: with glibc's defaults, then after the CPU device's setting.
_FAULTS_BEFORE_AND_AFTER_SET_CURRENT = """
import resource, torch, torchvision
from imgtrain.device import DeviceInfo
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=4)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
def step():
    loss = torch.nn.functional.cross_entropy(model(torch.rand(16, 3, 32, 32)),
                                             torch.randint(0, 4, (16,)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
def faults_per_step():
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6
default = faults_per_step()
DeviceInfo("cpu").set_current()
print(default, faults_per_step())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_cpu_training_steps_reuse_memory_instead_of_faulting_it_in() -> None:
    """The same steps with glibc's defaults and with the CPU device's setting, one after the other
    in a new process: with kept memory a step faults in a small fraction of the pages (about
    22,000 against almost none on the development machine; the ratio, not the count, is what any
    machine shares)."""
    proc = subprocess.run([sys.executable, "-c", _FAULTS_BEFORE_AND_AFTER_SET_CURRENT],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    default, keep = (float(value) for value in proc.stdout.split()[-2:])
    assert keep < 0.2 * default, (default, keep)
