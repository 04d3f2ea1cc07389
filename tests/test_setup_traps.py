"""Accelerator set-up traps, checked without the accelerator: cuDNN autotuning, contiguous host
batches, /dev/shm space for the batch pool, and the rendezvous port of a multi-node run."""
from __future__ import annotations

import importlib.util
import logging
import types
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from imgtrain import distributed
from imgtrain.config import WorldConfig
from imgtrain.jobenv import plan_job
from imgtrain.data import batch_pool, build_loaders, shm_per_node
from imgtrain.data.batch_pool import PooledLoader
from imgtrain.device import DeviceInfo
from imgtrain.distributed import World
from imgtrain.errors import ConfigError
from imgtrain.resolve import resolve
from imgtrain.trainer import Trainer


def test_cudnn_benchmark_is_a_device_setting_on_by_default(compose, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for option in ("auto", "cpu", "gpu", "npu"):
        assert compose(f"device={option}").device.cudnn_benchmark is True
    DeviceInfo("gpu", 0).apply_settings(compose("device=gpu").device)
    assert torch.backends.cudnn.benchmark is True
    DeviceInfo("gpu", 0).apply_settings(compose("device=gpu", "device.cudnn_benchmark=false").device)
    assert torch.backends.cudnn.benchmark is False
    DeviceInfo("cpu").apply_settings(compose("device=cpu").device)  # not the CPU's business
    assert torch.backends.cudnn.benchmark is False


class _Transfers(TorchFunctionMode):
    """Records the source of every Tensor.to: what a device copy reads from host memory."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            self.sources.append(args[0])
        return func(*args, **(kwargs or {}))


def test_nhwc_host_batches_travel_contiguous_and_arrive_as_nchw():
    """JPEG batches are NHWC in memory; the device gets them from contiguous memory (torch_npu
    would stage a non-contiguous source through a malloc'd copy and a stream sync) and sees the
    same NCHW tensor."""
    nhwc = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    images = nhwc.permute(0, 3, 1, 2)  # what JpegFolder collates
    target = torch.tensor([1, 0])
    trainer = types.SimpleNamespace(device=DeviceInfo("cpu"))
    with _Transfers() as transfers:
        on_device, target_on_device = Trainer._to_device(trainer, images, target)
    assert transfers.sources and all(t.is_contiguous() for t in transfers.sources)
    assert on_device.shape == (2, 3, 5, 6) and torch.equal(on_device, images)
    assert on_device.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(target_on_device, target)


def _jpeg_loaders(compose, root: Path, *overrides: str):
    plan = resolve(compose("dataset=imagenet", f"dataset.root={root}", "dataset.image_size=32",
                           "dataset.workers=2", "dataset.prefetch_factor=2",
                           "dataset.reuse_batch_memory=true", "train.batch_size=8",
                           "device=cpu", *overrides), [])
    # Rank 0 of one, with two processes on its node sharing /dev/shm.
    return build_loaders(plan, World(rank=0, local_rank=0, world_size=1, local_world_size=2),
                         accelerator=False)


def test_batch_pool_falls_back_with_one_warning_where_dev_shm_is_small(
        compose, image_folder: Path, monkeypatch, caplog):
    """The pools of 2 processes, ~0.5 MB: a 64 KB /dev/shm (Docker's default is 64 MB) cannot
    hold them, 100 MB can."""
    monkeypatch.setattr(batch_pool, "shm_free_bytes", lambda: 64 << 10)
    with caplog.at_level(logging.WARNING, logger="imgtrain"):
        loaders = _jpeg_loaders(compose, image_folder)
    assert not isinstance(loaders.train, PooledLoader) and not isinstance(loaders.val, PooledLoader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "dataset.reuse_batch_memory" in warnings[0] and "/dev/shm" in warnings[0]
    images, labels = next(iter(loaders.train))  # the run goes on with plain batches
    assert images.shape == (8, 3, 32, 32)
    monkeypatch.setattr(batch_pool, "shm_free_bytes", lambda: 100 << 20)
    assert isinstance(_jpeg_loaders(compose, image_folder).train, PooledLoader)


def test_the_dev_shm_check_asks_for_what_the_pools_hold_not_the_worst_case(
        compose, image_folder: Path, monkeypatch):
    """96 training images in batches of 8 of 32 px: 12 batches a pass, 6 for each of the 2
    workers, who keep 3 segments each (prefetch 2 + 1) of 8 x (3 x 32 x 32 + 8) bytes:
    147,840 bytes. Validation's 32 images in batches of 8 of its own 48 px crop: 4 batches, 2 a
    worker, so 4 segments of 8 x (3 x 48 x 48 + 8): 221,440 bytes. Two processes on the node:
    738,560 bytes, where the worst case (every slot of both loaders, at the larger crop, and the
    DataLoader's own batches in flight beside them) asked for 2.2 MB."""
    needed = 2 * (6 * 8 * (3 * 32 * 32 + 8) + 4 * 8 * (3 * 48 * 48 + 8))
    assert needed == 738_560
    sizes = ("dataset.val_crop_size=48", "eval.batch_size=8")
    monkeypatch.setattr(batch_pool, "shm_free_bytes", lambda: needed)
    loaders = _jpeg_loaders(compose, image_folder, *sizes)
    assert isinstance(loaders.train, PooledLoader) and isinstance(loaders.val, PooledLoader)
    images, _ = next(iter(loaders.val))
    assert images.shape == (8, 3, 48, 48)
    monkeypatch.setattr(batch_pool, "shm_free_bytes", lambda: needed - 1)
    loaders = _jpeg_loaders(compose, image_folder, *sizes)
    assert not isinstance(loaders.train, PooledLoader)


def test_the_readmes_dev_shm_figure_for_resnet152_at_8_processes(compose, image_folder: Path):
    """The default recipe at world=8p: 8 workers a process, ImageNet's 1,281,167 / 50,000 images.
    Training: 625 batches of 256 a rank, 5 segments for each worker; validation: 6,250 images on
    rank 0, 25 batches, 4 for worker 0 and 3 for the others. Segments of 256 x (3 x 224 x 224 +
    8) bytes: (40 + 25) x 8 processes of them, 20.0 GB a node."""
    plan = resolve(compose("world=8p", "device=cpu", f"dataset.root={image_folder}"), [])
    segment = 256 * (3 * 224 * 224 + 8)
    needed = shm_per_node(plan, train_images=1_281_167, val_images=50_000, workers=8)
    assert needed == 8 * (40 + 25) * segment
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"needs {needed / 1e9:.1f} GB ({needed / 2**30:.1f} GiB) of `/dev/shm` per node" \
        in " ".join(readme.split())


def test_several_nodes_need_a_master_port():
    world = {"nproc_per_node": 1, "nnodes": 2, "node_rank": 1, "master_addr": "node0",
             "master_port": None, "max_restarts": 0, "start_method": "spawn", "gres": None}
    with pytest.raises(ConfigError, match=r"world.nnodes=2 needs world.master_port") as info:
        distributed.check_world(plan_job(WorldConfig(**world)), "cpu", 2)
    assert "\n" not in str(info.value)
    distributed.check_world(plan_job(WorldConfig(**{**world, "master_port": 29500})), "cpu", 2)
    # one node: a free port
    one_node = WorldConfig(**{**world, "nnodes": 1, "node_rank": 0})
    distributed.check_world(plan_job(one_node), "cpu", 2)


@pytest.mark.slow
def test_accelerator_check_runs_end_to_end_on_the_cpu(tmp_path: Path, monkeypatch, capsys):
    """`benchmarks/accelerator_check.py --device cpu --quick`: every section of the report, each
    check passing; without --device cpu on a host with no accelerator it stops with one line."""
    import subprocess
    import sys
    from conftest import REPO
    script = str(REPO / "benchmarks" / "accelerator_check.py")
    if not (torch.cuda.is_available() or importlib.util.find_spec("torch_npu")):
        # Its main() in this process: it stops at the device check, before any import of its own.
        monkeypatch.setattr(sys, "path", list(sys.path))  # it puts benchmarks/ first
        spec = importlib.util.spec_from_file_location("accelerator_check", script)
        check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(check)
        monkeypatch.setattr(sys, "argv", [script])
        with pytest.raises(SystemExit) as stopped:
            check.main()
        assert stopped.value.code == 2 and "no accelerator here" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--quick", "--work-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout
    for section in ("## Environment", "## Training throughput", "## Host syncs", "## Overflow",
                    "## Resume and eval", "## Batch pool"):
        assert section in report
    assert "| O0 | auto | 0 |" in report and "| O2 | bfloat16 | 0 |" in report
    assert report.count("**pass**") == 2 and "**identical**" in report
