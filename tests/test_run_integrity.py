"""Run integrity, in-process: checkpoint files, divergence versus skipped steps, the schedule,
the config's types and lr rule, CIFAR-10 pickles that try to run code, the batch pool's edges."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, ValidationError

from conftest import assert_clean_error, make_cifar10, run_cli
from imgtrain import app, checkpoint_files
from imgtrain.assembly import build_trainer
from imgtrain.config import Config, SchedConfig, unknown_keys
from imgtrain.data.batch_pool import BatchPool, PooledLoader
from imgtrain.data.cifar import Cifar10
from imgtrain.device import DeviceInfo
from imgtrain.errors import ConfigError
from imgtrain.logger import NullLogger
from imgtrain.optim import build_scheduler, lr_factor
from imgtrain.plan import Amp
from imgtrain.resolve import resolve

SMALL = ["experiment=quickstart", "device=cpu", "dataset.train_size=64", "dataset.val_size=16",
         "train.batch_size=16", "train.print_freq=2", "train.epochs=2"]


# ---- checkpoint files ------------------------------------------------------------------------
def test_best_and_numbered_checkpoints_are_links_to_one_serialisation(tmp_path: Path) -> None:
    writer = checkpoint_files.CheckpointWriter(tmp_path, keep=5)
    writer.write({"model": {"w": torch.ones(3)}}, "epoch-1.pt", best=True)
    last, best, numbered = (tmp_path / name for name in ("last.pt", "best.pt", "epoch-1.pt"))
    assert os.path.samefile(last, best) and os.path.samefile(last, numbered)
    writer.write({"model": {"w": torch.zeros(3)}}, "epoch-2.pt", best=False)
    # last.pt was replaced by a new file: best.pt and epoch-1.pt still hold the first state.
    assert not os.path.samefile(last, best)
    assert torch.equal(torch.load(best, weights_only=True)["model"]["w"], torch.ones(3))
    assert torch.equal(torch.load(last, weights_only=True)["model"]["w"], torch.zeros(3))


def test_retention_orders_by_step_number_not_by_name(tmp_path: Path) -> None:
    for number in (8, 18, 28, 9):
        (tmp_path / f"step-{number}.pt").write_bytes(b"x")
        os.utime(tmp_path / f"step-{number}.pt", ns=(10**18, 10**18))  # a tie in write time
    checkpoint_files.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-18.pt", "step-28.pt"]


def test_a_failed_write_in_warn_mode_waits_for_the_next_interval(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the checkpoint folder should be")
    writer = checkpoint_files.CheckpointWriter(blocked, on_error="warn")
    writer.last_attempt = 0.0
    assert writer.write({"model": {}}, "step-2.pt", best=False) is False
    assert writer.last_attempt > 0.0  # checkpoint_every_minutes counts from this failed try


def test_a_failed_write_in_fail_mode_is_one_clear_error(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")
    with pytest.raises(ConfigError, match="previous checkpoint is kept"):
        checkpoint_files.CheckpointWriter(blocked).write({"model": {}}, "step-2.pt", best=False)


def test_save_checkpoints_false_writes_nothing(tmp_path: Path) -> None:
    writer = checkpoint_files.CheckpointWriter(tmp_path / "ckpt", enabled=False)
    assert writer.write({"model": {}}, "epoch-1.pt", best=True) is False
    assert not (tmp_path / "ckpt").exists()


# ---- the schedule --------------------------------------------------------------------------
def test_lr_factor_at_the_warmup_and_cosine_boundaries() -> None:
    cosine = SchedConfig(name="cosine", warmup_epochs=2)
    steps, epochs = 10, 6  # 20 warm-up steps, then 40 cosine steps
    assert lr_factor(0, steps, cosine, epochs) == pytest.approx(1 / 20)
    assert lr_factor(19, steps, cosine, epochs) == pytest.approx(1.0)  # the last warm-up step
    assert lr_factor(20, steps, cosine, epochs) == pytest.approx(1.0)  # cosine starts at the top
    assert lr_factor(40, steps, cosine, epochs) == pytest.approx(0.5)  # half way down
    assert lr_factor(59, steps, cosine, epochs) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert lr_factor(60, steps, cosine, epochs) == pytest.approx(0.0, abs=1e-12)
    step = SchedConfig(name="step", warmup_epochs=0, step_epochs=2, gamma=0.1)
    assert lr_factor(19, steps, step, epochs) == 1.0
    assert lr_factor(20, steps, step, epochs) == pytest.approx(0.1)
    assert lr_factor(40, steps, step, epochs) == pytest.approx(0.01)


def test_a_schedule_built_at_a_step_continues_with_this_runs_lr() -> None:
    cosine = SchedConfig(name="cosine", warmup_epochs=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    for group in optimizer.param_groups:
        group["initial_lr"] = 0.2  # a resume with optim.lr=0.2
    scheduler = build_scheduler(optimizer, cosine, 4, 10, start_step=13)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * lr_factor(13, 10, cosine, 4))
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * lr_factor(14, 10, cosine, 4))


# ---- divergence versus a step the loss scaler skipped --------------------------------------
def _trainer(compose: Any, tmp_path: Path, amp: Amp | None = None, *overrides: str) -> Any:
    plan = resolve(compose(*SMALL, "train.save_checkpoints=false", *overrides), [])
    if amp is not None:
        plan = dataclasses.replace(plan, amp=amp)
    torch.manual_seed(0)  # the plan's resnet18 is built from this seed
    return build_trainer(plan, tmp_path, device=DeviceInfo("cpu"), logger=NullLogger())


def _loss_not_finite_at_step(trainer: Any, bad_step: int) -> None:
    """The criterion returns inf at one step: what an fp16 overflow of the logits gives."""
    criterion, calls = trainer.criterion, [0]

    def overflowing(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        loss = criterion(output, target)
        return loss * float("inf") if calls[0] == bad_step else loss

    trainer.criterion = overflowing


def test_a_step_the_scaler_skipped_does_not_fail_the_epoch(compose: Any, tmp_path: Path) -> None:
    # O2 with a static scale skips a step whose gradients are not finite (torch's GradScaler).
    # Three steps of 4 images: a bfloat16 step of 16 costs ~4 s on a CPU without bf16 units.
    # The AMP is faked: resolve refuses a loss scale with bfloat16 (and float16 on the CPU); the
    # static scale stands for an accelerator's O2 float16 with amp.loss_scale=128.
    trainer = _trainer(compose, tmp_path, Amp("O2", torch.bfloat16, 128.0),
                       "train.batch_size=4", "dataset.train_size=12")
    _loss_not_finite_at_step(trainer, bad_step=2)
    metrics = trainer.train_epoch(0)
    assert math.isfinite(metrics["loss"])  # the skipped step is left out of the epoch's loss
    assert all(torch.isfinite(p).all() for p in trainer.precision.master_params(trainer.model))


def test_a_non_finite_step_that_reached_the_weights_is_divergence(compose: Any,
                                                                  tmp_path: Path) -> None:
    trainer = _trainer(compose, tmp_path)  # quickstart: O0, no scaler to skip anything
    _loss_not_finite_at_step(trainer, bad_step=2)
    with pytest.raises(ConfigError, match="training diverged"):
        trainer.train_epoch(0)


# ---- the config: types, unknown keys, the lr rule ------------------------------------------
def _typed_keys() -> list[tuple[str, type]]:
    from dataclasses import fields
    found = []
    for group in fields(Config):
        if group.name == "mode":
            continue
        for key in fields(group.default_factory()):
            kind = {"int": int, "float": float, "bool": bool, "Optional[int]": int,
                    "Optional[float]": float}.get(str(key.type))
            if kind is not None:
                found.append((f"{group.name}.{key.name}", kind))
    return found


def test_every_numeric_and_boolean_key_refuses_a_word(compose: Any) -> None:
    keys = _typed_keys()
    assert {"train.batch_size", "optim.lr", "optim.nesterov", "world.master_port"} <= \
        {key for key, _ in keys}
    # Hydra applies a key=value override with this very call, onto the config it composed (the
    # schema's typed nodes): composed once, not once a key (0.3 s each).
    composed = compose("experiment=quickstart")
    for key, kind in keys:
        with pytest.raises(ValidationError) as caught:
            OmegaConf.update(copy.deepcopy(composed), key, "abc", merge=True)
        assert key in str(caught.value), key
    with pytest.raises(ConfigCompositionException, match="train.batch_size"):  # the same, via Hydra
        compose("experiment=quickstart", "train.batch_size=abc")


# What each key that takes a word or a value takes: accepted settings, refused ones, and a phrase
# its error line must carry.
WORD_OR_VALUE = {
    "dataset.workers": (["auto", 0, 3], ["many", -1, True, 2.5], "a number of loader processes"),
    "model.channels_last": (["auto", True, False], ["maybe", 1, "yes"], "true or false"),
    "optim.fused": (["auto", True, False], ["maybe", 0], "true or false"),
    "amp.loss_scale": (["auto", "dynamic", 1024, 65536.0], ["maybe", 0, -8, True],
                       "a positive number"),
    "export.batch": (["dynamic", 1, 8], ["maybe", 0, -1, 2.5, False], "a batch size"),
    "amp.dtype": (["auto", "float16", "bfloat16"], ["maybe", "fp16"], "bfloat16"),
    "device.name": (["auto", "cpu"], ["maybe", "cuda"], "npu, gpu or cpu"),
    "export.exporter": (["auto", "dynamo", "torchscript"], ["maybe", "onnx"], "torchscript"),
    "model.stem": (["auto", "imagenet", "cifar"], ["maybe", "cifar10"], "cifar"),
}


def _word_or_value_keys() -> list[str]:
    """The schema's keys that OmegaConf cannot check: typed Any, or a str whose default is a word
    (auto, dynamic) standing for a value."""
    from dataclasses import fields
    found = []
    for group in fields(Config):
        if group.name == "mode":
            continue
        for key in fields(group.default_factory()):
            if str(key.type) == "Any" or key.default in ("auto", "dynamic"):
                found.append(f"{group.name}.{key.name}")
    return found


def test_every_key_that_takes_a_word_or_a_value_refuses_anything_else(compose: Any) -> None:
    keys = set(_word_or_value_keys())
    # Paths, checked where they are read (any text may name a file): train.resume (auto or a
    # checkpoint), predict.inputs (a path or a list of them: predict.gather), dataset.index_cache
    # (auto or a folder: data/index_cache.py).
    assert keys - {"train.resume", "predict.inputs", "dataset.index_cache"} == set(WORD_OR_VALUE), keys
    composed = compose("experiment=quickstart", "device=cpu", "amp=O0")
    for key, (accepted, refused, phrase) in WORD_OR_VALUE.items():
        for setting in accepted:
            cfg = copy.deepcopy(composed)
            OmegaConf.update(cfg, key, setting, merge=True)
            resolve(cfg, [])
        for setting in refused:
            cfg = copy.deepcopy(composed)
            OmegaConf.update(cfg, key, setting, merge=True)
            with pytest.raises(ConfigError) as caught:  # at resolve time: no process started
                resolve(cfg, [])
            text = str(caught.value)
            assert text.startswith(f"{key} takes ") and phrase in text, (key, setting, text)
            assert "auto" in text or "dynamic" in text, text


def test_a_word_where_a_number_goes_is_one_error_line(tmp_path: Path) -> None:
    proc = run_cli(*SMALL, "dataset.workers=many", f"hydra.run.dir={tmp_path / 'run'}",
                   timeout=120)
    assert_clean_error(proc, "dataset.workers takes auto or a number", "not many")
    assert not (tmp_path / "run").exists()


def test_plus_adds_no_key_imgtrain_does_not_know(compose: Any) -> None:
    cfg = compose("experiment=quickstart", "+optim.lrr=0.1", "+extra=1")
    assert unknown_keys(cfg) == ["optim.lrr", "extra"]
    with pytest.raises(ConfigError, match="unknown config key optim.lrr"):
        resolve(cfg, [])


@pytest.mark.parametrize("overrides,lr", [
    ([], 0.1),                                                           # the seed, 1 device
    (["world=8p"], 0.8),                                                 # the seed, 8 devices
    (["world=8p", "world.nproc_per_node=2", "train.batch_size=64"], 0.025),  # the README's example
    (["world=8p", "optim.lr=0.3"], 0.3),                                 # set outright
    (["optim.lr_base=0.2", "train.batch_size=512"], 0.4),
])
def test_lr_follows_the_global_batch_unless_set(compose: Any, overrides: list[str],
                                                lr: float) -> None:
    # dataset=synthetic: the plan checks the data too, and the default ImageNet has no root here
    plan = resolve(compose("device=cpu", "dataset=synthetic", *overrides), [])
    assert plan.optim.lr == pytest.approx(lr)
    rule = plan.lr_rule
    assert ("set by optim.lr" in rule) == any(o.startswith("optim.lr=") for o in overrides)


def test_a_warmup_longer_than_the_run_is_a_warning(compose: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from imgtrain.logger import close_logging
    close_logging()  # whatever an earlier in-process run left attached
    plan = resolve(compose(*SMALL, "sched.warmup_epochs=5"), [])
    app.warn_about(plan)
    assert "sched.warmup_epochs=5" in caplog.text and "train.epochs=2" in caplog.text


# ---- CIFAR-10 pickles ----------------------------------------------------------------------
class _Payload:
    """What a hostile pickle carries: unpickling it would call os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_pickle_runs_nothing(tmp_path: Path) -> None:
    root = make_cifar10(tmp_path / "data", per_class=1, test_per_class=1)
    marker = tmp_path / "pwned"
    victim = root / "cifar-10-batches-py" / "test_batch"
    victim.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}))
    with pytest.raises(ConfigError, match="os.system|posix.system") as caught:
        Cifar10(str(root), train=False)
    assert str(victim) in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_real_cifar_pickles_still_load(tmp_path: Path, protocol: int) -> None:
    """Protocol 2 is the official files' (numpy arrays by _reconstruct), 5 what numpy 2 writes."""
    root = make_cifar10(tmp_path / "data", per_class=1, test_per_class=2)
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps(pickle.loads(batch.read_bytes()), protocol=protocol))
    dataset = Cifar10(str(root), train=False)
    assert len(dataset) == 20 and dataset[3][0].shape == (3, 32, 32)


# ---- the batch pool's edges -----------------------------------------------------------------
def test_a_batch_that_pin_memory_copied_frees_its_segment_at_once() -> None:
    pool = BatchPool(workers=1, slots_per_worker=2)
    loader = PooledLoader.__new__(PooledLoader)  # only _hand_over is exercised
    loader.pool = pool
    segment = 1
    pool.state[segment] = 5  # claimed by a worker

    class PinnedCopy(torch.Tensor):
        """Stands for the pinned host copy that DataLoader's pin_memory thread makes on a GPU/NPU
        machine (pinning needs an accelerator); only `is_pinned` is faked."""

        def is_pinned(self, *args: Any) -> bool:
            return True

    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).as_subclass(PinnedCopy)
    loader._hand_over((images, torch.zeros(2, dtype=torch.int64), segment))
    assert int(pool.state[segment]) == 0


def test_the_pool_resumes_when_the_dataloader_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BatchPool(workers=1, slots_per_worker=2)
    pool.resume(3)
    loader = PooledLoader(list(range(4)), pool, batch_size=2)

    def broken_iter(self: Any) -> None:
        raise RuntimeError("worker could not start")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", broken_iter)
    with pytest.raises(RuntimeError):
        iter(loader)
    assert int(pool.state[0]) == 3  # not left paused at 0, where no worker could claim a segment


def test_checkpoint_writes_are_left_out_of_images_per_sec(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgtrain import throughput as throughput_module

    clock = iter([0.0, 10.0])  # the timed window opens at 0 and closes at 10 s
    monkeypatch.setattr(throughput_module.time, "perf_counter", lambda: next(clock))
    throughput = throughput_module.Throughput(DeviceInfo("cpu"), warmup=1, global_batch=8)
    for _ in range(11):
        throughput.step()
    throughput.exclude(4.0)  # a mid-epoch checkpoint took 4 of those seconds
    assert throughput.finish(epoch_start=0.0) == (80, 6.0)


def test_a_crafted_cifar_label_file_runs_nothing(tmp_path: Path) -> None:
    root = make_cifar10(tmp_path / "data", per_class=1, test_per_class=1)
    marker = tmp_path / "pwned"
    (root / "cifar-10-batches-py" / "batches.meta").write_bytes(
        pickle.dumps({"label_names": _Payload(marker)}))
    with pytest.raises(ConfigError, match="batches.meta"):
        Cifar10(str(root), train=False)
    assert not marker.exists()


def test_a_failure_record_counts_the_processes_the_launcher_planned(
        compose: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgtrain.results import RESULTS, read

    # One rank of `torchrun --nproc_per_node 4 run.py ...` (world=1p): 4 processes, not 1. The
    # run fails its checks (train.epochs=0) after its world is planned: app.run records it.
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    outcome = app.run(compose(*SMALL, "train.epochs=0"), str(tmp_path / "torchrun"),
                      ["train.epochs=0"], multirun=False)
    assert outcome.exit_code == 1 and "train.epochs=0" in outcome.error
    assert read(tmp_path / "torchrun" / RESULTS)["world_size"] == 4
    # A world its SLURM job cannot hold (the error being recorded): recorded without a size.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    outcome = app.run(compose(*SMALL, "world.nnodes=2"), str(tmp_path / "slurm"),
                      ["world.nnodes=2"], multirun=False)
    assert outcome.exit_code == 1 and "world.nnodes=2" in outcome.error
    record = read(tmp_path / "slurm" / RESULTS)
    assert record["status"] == "failed" and "world_size" not in record
