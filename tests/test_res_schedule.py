"""dataset.res_schedule (progressive resizing): the sizes FFCV's rule gives, the checks, every
dataset cropping to its epoch's size, exact resume during the ramp, the batch pools and memory
check sized for the largest crop, torch.compile's bounded recompiles, and what a user sees."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY, assert_clean_error, read_results, run_cli
from imgtrain.assembly import build_trainer
from imgtrain.data import build_loaders
from imgtrain.data.batch_pool import BatchPool
from imgtrain.data.cifar import Cifar10
from imgtrain.data.imagefolder import JpegFolder
from imgtrain.data.samplers import TrainSampler
from imgtrain.data.synthetic import Synthetic
from imgtrain.device import DeviceInfo
from imgtrain.distributed import World
from imgtrain.errors import ConfigError
from imgtrain.logger import NullLogger
from imgtrain.resolve import resolve

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
CPU = DeviceInfo("cpu")
# 3 epochs at 32, 48 and 64 px (a ramp over every epoch, in steps of 16), 4 steps of 4 each.
SCHEDULE = "dataset.res_schedule={start:32,end:64,start_ramp:0,end_ramp:2,step:16}"
SMALL = ["experiment=quickstart", "device=cpu", "amp=O0", "dataset.num_classes=4",
         "dataset.train_size=16", "dataset.val_size=8", "dataset.image_size=32",
         "train.batch_size=4", "train.epochs=3", "train.print_freq=2", "optim.lr=0.05",
         "sched.warmup_epochs=0", SCHEDULE]


def small_net() -> nn.Module:
    """Conv, BatchNorm and Linear, for any input size, and fast."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


# ---- the sizes ------------------------------------------------------------------------------
def test_ffcvs_resnet50_schedule_gives_ffcvs_sizes(compose) -> None:
    """rn50_88_epochs.yaml: min_res 160, max_res 192, start_ramp 65, end_ramp 76. Epochs up to
    65 train at 160; the line from 160 to 192, rounded to a multiple of 32, reaches 192 where it
    passes 176: after epoch 70.5."""
    plan = resolve(compose("experiment=quickstart", "train.epochs=88", "dataset.res_schedule="
                           "{start:160,end:192,start_ramp:65,end_ramp:76}"), [])
    assert plan.train_sizes == (160,) * 71 + (192,) * 17
    assert plan.largest_train_size == 192 and plan.scheduled_sizes
    # A finer step takes the ramp's sizes; a half rounds to even, as FFCV's np.round does.
    plan = resolve(compose("experiment=quickstart", "train.epochs=8", "dataset.res_schedule="
                           "{start:128,end:224,start_ramp:2,end_ramp:6,step:16}"), [])
    assert plan.train_sizes == (128, 128, 128, 160, 176, 192, 224, 224)
    # Off by default: image_size every epoch, validation's sizes its own.
    plan = resolve(compose("experiment=quickstart"), [])
    assert plan.train_sizes == (32,) * 3 and not plan.scheduled_sizes


@pytest.mark.parametrize("schedule,epochs,says", [
    ("{start:64,end:32,start_ramp:0,end_ramp:1}", 3, "start=64 is larger than end=32"),
    ("{start:32,end:64,start_ramp:0,end_ramp:3}", 3, "end_ramp=3 is past the last epoch"),
    ("{start:40,end:64,start_ramp:0,end_ramp:1}", 3, "start=40 must be a positive multiple"),
    ("{start:32,end:64,start_ramp:2,end_ramp:1}", 3, "0 <= start_ramp <= end_ramp"),
    ("{start:32,end:64}", 3, "needs start_ramp, end_ramp"),
    ("{start:32,end:64,start_ramp:0,end_ramp:1,step:0}", 3, "step=0 must be at least 1"),
])
def test_a_schedule_that_cannot_work_is_refused_naming_it(compose, schedule: str, epochs: int,
                                                           says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        resolve(compose("experiment=quickstart", f"train.epochs={epochs}",
                        f"dataset.res_schedule={schedule}"), [])


def test_a_bad_schedule_on_the_command_line_is_one_line_and_no_run_folder(
        tmp_path: Path) -> None:
    proc = run_cli("experiment=quickstart", "dataset.res_schedule={start:64,end:32,start_ramp:0,"
                   "end_ramp:1}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, "dataset.res_schedule.start=64 is larger than end=32")
    assert not (tmp_path / "run").exists()


# ---- the data ----------------------------------------------------------------------------
def test_every_dataset_crops_training_items_to_the_size_they_carry(
        image_folder: Path, cifar_root: Path) -> None:
    jpeg = JpegFolder(str(image_folder), "train", 32, train=True)
    assert jpeg[(3, 7, 48)][0].shape == (3, 48, 48)
    # Without a schedule the item's size is the dataset's own: the same pixels as before.
    assert torch.equal(jpeg[(3, 7)][0], jpeg[(3, 7, 32)][0])
    assert torch.equal(jpeg[(3, 7)][0], jpeg[(3, 7, None)][0])
    cifar = Cifar10(str(cifar_root), train=True)
    assert cifar[(3, 7, 40)][0].shape == (3, 40, 40) and cifar[(3, 7)][0].shape == (3, 32, 32)
    synthetic = Synthetic(16, 64, 4, seed=1, train=True)
    assert [image.shape[-1] for image, _ in synthetic.__getitems__([(1, 5, 32), (2, 6, 32)])] \
        == [32, 32]
    assert synthetic[(1, 5)][0].shape == (3, 64, 64)
    # A label's pattern at another size is the same pattern, resized (what is learnt carries).
    small, large = synthetic._patterns(32, [1]), synthetic._patterns(64, [1])
    assert (nn.functional.interpolate(large, size=32, mode="area") - small).abs().max() < 8


def test_the_sampler_hands_each_item_its_epochs_size_also_after_a_mid_epoch_resume() -> None:
    sizes = (32, 48, 64)
    sampler = TrainSampler(16, 0, 1, seed=3, micro_batch=4, size_of_epoch=sizes.__getitem__)
    sampler.set_epoch(1)
    whole = list(sampler)
    assert {size for _, _, size in whole} == {48} and len(whole) == 16
    sampler.resume_at(2)
    assert list(sampler) == whole[8:]


def test_a_pool_segment_holds_smaller_batches_in_place_and_grows_for_larger_ones() -> None:
    pool = BatchPool(workers=1, slots_per_worker=1)

    def batch(size: int, count: int = 4) -> list[tuple[torch.Tensor, int]]:
        return [(torch.full((3, size, size), i, dtype=torch.uint8), i) for i in range(count)]

    large, _ = pool._buffer(1, batch(64))
    smaller, labels = pool._buffer(1, batch(32, count=3))  # a smaller crop, a last short batch
    assert smaller.shape == (3, 32, 32, 3) and labels.shape == (3,)
    assert smaller.data_ptr() == large.data_ptr()  # the same segment
    larger, _ = pool._buffer(1, batch(96))
    assert larger.shape == (4, 96, 96, 3) and larger.data_ptr() != large.data_ptr()


def test_shared_memory_and_the_memory_check_plan_for_the_largest_crop(
        compose, image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imgtrain.data as data
    import imgtrain.memory as memory

    asked, pool_bytes = [], data.pool_bytes
    monkeypatch.setattr(data, "pool_bytes", lambda batch, crop, *rest:
                        asked.append((batch, crop)) or pool_bytes(batch, crop, *rest))
    plan = resolve(compose(*TINY, "dataset=imagenet", f"dataset.root={image_folder}",
                           "dataset.image_size=32", "dataset.workers=1", "train.batch_size=8",
                           "train.epochs=3", SCHEDULE), [])
    build_loaders(plan, World(), accelerator=False)  # workers start only when a pass does
    # Validation's pool at its own 32 px crop, training's at the schedule's largest, not 32 px.
    assert sorted(asked) == [(8, 32), (8, 64)]
    sizes = []
    monkeypatch.setattr(memory, "estimate", lambda arch, classes, size, *a, **k:
                        sizes.append(size))
    memory.plan(plan, CPU)
    assert sizes == [64]


# ---- training ------------------------------------------------------------------------------
def _trainer(compose, run_dir: Path, *overrides: str):
    plan = resolve(compose(*SMALL, *overrides), [])
    return build_trainer(plan, run_dir, world=World(), device=CPU, logger=NullLogger(),
                         model=small_net())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints/last.pt", map_location="cpu",
                      weights_only=True)["model"]


def test_stops_mid_epoch_and_at_an_epochs_end_during_the_ramp_resume_to_the_same_weights(
        compose, tmp_path: Path) -> None:
    straight = _trainer(compose, tmp_path / "straight")
    seen: list[int] = []  # the size of every batch the network sees, training and validation
    straight.model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-1]))
    straight.fit()
    # Each epoch: 4 training steps at its size, then 2 validation batches at 32 px.
    assert seen == [32] * 6 + [48] * 4 + [32] * 2 + [64] * 4 + [32] * 2
    assert [row["image_size"] for row in straight.state.history] == [32, 48, 64]
    assert sorted(straight.state.images_per_sec_by_size(), key=int) == ["32", "48", "64"]

    stopped = tmp_path / "stopped"
    # Global step 6: epoch 2 (48 px) step 3 of 4. Then step 8: epoch 2's end, where the next
    # epoch (64 px) begins. A checkpoint after every step: each stop resumes at its step.
    for fault in (6, 8):
        trainer = _trainer(compose, stopped, f"train.fault_at_step={fault}",
                           "train.checkpoint_every_steps=1")
        with pytest.raises(RuntimeError, match="injected fault"):
            trainer.fit()
        saved = torch.load(stopped / "checkpoints/last.pt", weights_only=True)["state"]
        assert saved["global_step"] == fault
    assert (saved["epoch"], saved["step_in_epoch"]) == (2, 0)
    resumed = _trainer(compose, stopped)
    assert resumed.resumed == {"epoch": 3, "step": 0, "restart": resumed.state.restarts}
    resumed.fit()
    assert [row["image_size"] for row in resumed.state.history] == [32, 48, 64]
    assert sorted(resumed.state.timed_by_size, key=int) == ["32", "48", "64"]
    theirs, ours = _weights(tmp_path / "straight"), _weights(stopped)
    for key, value in theirs.items():
        assert torch.equal(value, ours[key]), key  # diff 0


def test_compile_recompiles_for_the_second_size_and_never_again(compose, tmp_path: Path) -> None:
    """dynamo's automatic dynamic shapes: the first size compiles static, the second compiles
    the sizes dynamic, and every later size reuses that graph."""
    import torch._dynamo

    graphs: list[torch.fx.GraphModule] = []

    @torch._dynamo.register_backend(name="imgtrain_test_counting")
    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)  # one compilation; run as traced (no code generation)
        return gm.forward

    torch._dynamo.reset()
    trainer = _trainer(compose, tmp_path, "model.compile=true",
                       "model.compile_backend=imgtrain_test_counting",
                       "dataset.res_schedule={start:32,end:96,start_ramp:0,end_ramp:4,step:16}",
                       "train.epochs=5", "train.save_checkpoints=false")
    compiled_by_epoch = []
    for epoch in range(5):
        trainer.train_epoch(epoch)  # training alone: validation's size is its own
        trainer.state.epoch, trainer.state.step_in_epoch = epoch + 1, 0
        compiled_by_epoch.append(len(graphs))
    torch._dynamo.reset()
    assert trainer.plan.train_sizes == (32, 48, 64, 80, 96)
    assert compiled_by_epoch[0] >= 1  # compiled at all
    assert compiled_by_epoch[1] > compiled_by_epoch[0]  # the second size: once more
    assert compiled_by_epoch[4] == compiled_by_epoch[1], compiled_by_epoch  # then never again


@pytest.mark.e2e
def test_console_log_results_and_tensorboard_say_each_epochs_size(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "experiment=quickstart", "dataset.num_classes=4",
                   "dataset.train_size=8", "dataset.val_size=4", "dataset.image_size=32",
                   "train.batch_size=4", "train.epochs=2", "train.save_checkpoints=false",
                   "dataset.res_schedule={start:32,end:48,start_ramp:0,end_ramp:1,step:16}",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = " ".join(proc.stdout.split())
    assert "train 32 px (epoch 1), 48 px (epoch 2); val 32 px" in summary
    log = (run_dir / "train.log").read_text()
    for text in (proc.stdout, log):
        assert "epoch 2: training at 48 px (dataset.res_schedule)" in text
        assert "img/s at 32 px" in text and "img/s at 48 px" in text
    results = read_results(run_dir)
    assert [row["image_size"] for row in results["history"]] == [32, 48]
    assert sorted(results["throughput_by_size"]) == ["32", "48"]
    assert all(rate > 0 for rate in results["throughput_by_size"].values())
    events = EventAccumulator(str(run_dir)).Reload()
    assert [point.value for point in events.Scalars("train/image_size")] == [32, 48]
    json.dumps(results)  # plain data
