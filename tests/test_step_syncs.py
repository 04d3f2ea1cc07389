"""The training step on accelerators, checked on the CPU: no host sync between print points, no
overflowed step applied whatever the loss scaler does, and optimizers that keep views of the
gradients (torch_npu's fused ones) stepping this step's gradients.

The steps run through the real Trainer, built as a worker builds it (assembly.build_trainer),
on synthetic data; the model is a small Conv-BatchNorm-Linear net (every kind of layer O2 treats
differently) to keep the tests fast. float16 is refused on the CPU by the config (it is slow
there), so each case sets the plan's AMP itself: CPU autocast, the float16 model, torch's
GradScaler and the fused SGD kernel all run on the CPU in torch 2.14, so the scaled code paths are
the real ones.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO
from imgtrain.assembly import build_trainer
from imgtrain.config import DatasetConfig
from imgtrain.data.mixing import build_batch_mix
from imgtrain.device import DeviceInfo
from imgtrain.logger import NullLogger
from imgtrain.optim import build_optimizer
from imgtrain.plan import Amp, RunPlan
from imgtrain.resolve import resolve
from imgtrain.precision import Precision

sys.path.insert(0, str(REPO / "benchmarks"))
from host_syncs import HostReads, watching_steps  # noqa: E402

CPU = DeviceInfo("cpu")
STEPS, PRINT_FREQ = 6, 3  # print points after steps 3 and 6


def make_plan(compose, *overrides: str, device: str = "cpu") -> RunPlan:
    """The plan of these tests' runs: 6 steps of 8 synthetic 8-px images, 4 classes. The memory
    check is off: it estimates the plan's model.arch, and the steps train small_net instead."""
    return resolve(compose(
        f"device={device}", "dataset=synthetic", "dataset.image_size=8",
        "dataset.num_classes=4", "dataset.train_size=96", "dataset.val_size=8",
        "dataset.workers=0", "train.batch_size=8", "train.epochs=1",
        f"train.steps_per_epoch={STEPS}", f"train.print_freq={PRINT_FREQ}",
        "train.fps_warmup_steps=1", "train.memory_check=false", *overrides), [])


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def make_trainer(compose, tmp_path: Path, level: str, dtype: torch.dtype | None,
                 loss_scale: float | str | None, *overrides: str, optimizer_class=None):
    if dtype == torch.float16 and not any(o.startswith("optim.fused=") for o in overrides):
        # What optim.fused=auto gives the GPU that these float16 CPU steps stand in for.
        overrides = ("optim.fused=true", *overrides)
    # The AMP is set by hand: (level, dtype, loss_scale) stands for what amp= resolves to on an
    # accelerator (float16, loss scaled), which resolve refuses on the CPU.
    plan = dataclasses.replace(make_plan(compose, *overrides),
                               amp=Amp(level, dtype, loss_scale))
    trainer = build_trainer(plan, tmp_path, device=CPU, logger=NullLogger(), model=small_net())
    if optimizer_class is not None:
        trainer.optimizer = optimizer_class(
            [p for group in trainer.optimizer.param_groups for p in group["params"]])
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    return trainer


# ---- no host sync inside the steps ------------------------------------------------------------
SYNC_FREE = [("O0", None, None), ("O1", torch.bfloat16, None), ("O1", torch.float16, "dynamic"),
             ("O2", torch.bfloat16, None), ("O2", torch.float16, 1024.0),
             ("O2", torch.float16, "dynamic")]


@pytest.mark.parametrize("level, dtype, loss_scale", SYNC_FREE,
                         ids=[f"{lv}-{str(d).split('.')[-1]}-{s}" for lv, d, s in SYNC_FREE])
def test_training_steps_read_nothing_on_the_host(compose, tmp_path: Path, level, dtype, loss_scale):
    """Steps 2..5 of 6, the print point at 3 left out: not one read of a device value, and no
    device tensor made from host data (the first step and the epoch's end may read)."""
    trainer = make_trainer(compose, tmp_path, level, dtype, loss_scale)
    with HostReads() as watch, watching_steps(trainer, watch, first=1, last=STEPS - 2):
        metrics = trainer.train_epoch(0)
    assert watch.events == []
    assert trainer.state.step_in_epoch == STEPS and metrics["loss"] > 0


# Every ingredient of the V2 recipe that runs in the step (the augmentations run in the loader).
RECIPE = ["dataset.mixup_alpha=0.2", "dataset.cutmix_alpha=1.0", "train.label_smoothing=0.1",
          "train.clip_grad_norm=1.0", "train.accumulate_steps=2", "optim.norm_weight_decay=0",
          "ema.decay=0.9", "ema.steps=1", "sched.warmup_epochs=0"]


@pytest.mark.parametrize("level, dtype, loss_scale", [("O0", None, None),
                                                      ("O2", torch.float16, 1024.0)])
def test_the_v2_recipes_steps_read_nothing_on_the_host(compose, tmp_path: Path, level, dtype,
                                                       loss_scale):
    """MixUp/CutMix draw their weight, box and choice from torch's CPU generator: host numbers,
    no device read (the next test runs them on a batch that cannot be read at all). Everything
    else the step does reads nothing."""
    trainer = make_trainer(compose, tmp_path, level, dtype, loss_scale, *RECIPE)
    mix = trainer.batch_mix
    with HostReads() as watch, watching_steps(trainer, watch, first=1, last=STEPS - 2):
        def mix_unwatched(images, target):
            active, watch.active = watch.active, False
            try:
                return mix(images, target)
            finally:
                watch.active = active

        trainer.batch_mix = mix_unwatched
        trainer.train_epoch(0)
    assert watch.events == []
    assert trainer.ema is not None and int(trainer.ema.averaged.n_averaged) == STEPS


def test_mixup_and_cutmix_never_read_the_batch():
    """On the meta device a tensor has no values: a read of the images or labels would raise."""
    mix = build_batch_mix(DatasetConfig(mixup_alpha=0.2, cutmix_alpha=1.0), num_classes=4)
    for seed in range(8):  # both transforms, several boxes
        torch.manual_seed(seed)
        images, soft = mix(torch.empty(8, 3, 8, 8, device="meta"),
                           torch.empty(8, dtype=torch.long, device="meta"))
        assert images.device.type == soft.device.type == "meta" and soft.shape == (8, 4)


def test_the_watch_sees_a_host_read_in_every_step(compose, tmp_path: Path):
    """The control: torch's default SGD cannot take the overflow verdict on the device, so each
    scaled step reads it on the host once; the watch must see exactly those reads."""
    trainer = make_trainer(compose, tmp_path, "O2", torch.float16, 1024.0, "optim.fused=false")
    with HostReads() as watch, watching_steps(trainer, watch, first=1, last=STEPS - 2):
        trainer.train_epoch(0)
    assert watch.events == ["item"] * (STEPS - 2)


# ---- an overflowed step is never applied -----------------------------------------------------
class AppliesOverflowedSteps(torch.amp.GradScaler):
    """Stands in for torch_npu's GradScaler(dynamic=False): it unscales without looking for inf
    or nan, and its step() applies the optimizer step whatever the gradients hold."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        torch._foreach_mul_(grads, inv_scale)
        return {found_inf.device: found_inf}  # never raised

    def step(self, optimizer, *args, **kwargs):
        if self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] == {}:
            self.unscale_(optimizer)
        return optimizer.step()


def _batch():
    torch.manual_seed(1)
    return torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 4, (8,))


def _weights_after(trainer, overflow_first: bool) -> list[torch.Tensor]:
    """One step whose gradients hold an inf (when asked), then one clean step."""
    images, target = _batch()
    if overflow_first:
        first = next(p for p in trainer.model.parameters())
        hook = first.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        trainer._train_step(((images, target),), epoch=0)
        hook.remove()
    trainer._train_step(((images, target),), epoch=0)
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize("npu_like_scaler", [False, True])
def test_an_overflowed_step_changes_nothing_whatever_the_scaler(compose, tmp_path: Path,
                                                                fused: str, npu_like_scaler: bool):
    """O2 float16, static scale 1024: a step with an inf gradient is skipped (no weight, no
    momentum changes), so overflow-then-clean ends exactly where the clean step alone does. Also
    with a scaler that would apply it, and with torch's fused SGD, whose first step skipped on
    the device must not leave uninitialised momentum behind."""
    results = []
    for overflow_first in (False, True):
        trainer = make_trainer(compose, tmp_path, "O2", torch.float16, 1024.0, f"optim.fused={fused}")
        if npu_like_scaler:
            trainer.precision.scaler = AppliesOverflowedSteps("cpu", init_scale=1024.0)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
        results.append(_weights_after(trainer, overflow_first))
        assert float(trainer.precision.loss_scale) == 1024.0
    for clean, after_overflow in zip(*results):
        assert torch.isfinite(after_overflow).all()
        assert torch.equal(clean, after_overflow)


def test_a_skipped_step_is_left_out_of_the_epochs_loss(compose, tmp_path: Path):
    """The first of 6 steps has an inf gradient but a finite loss: the scaler skips it, and the
    epoch's loss is the mean of the 5 steps applied (each of the same 8 images)."""
    trainer = make_trainer(compose, tmp_path, "O2", torch.float16, 1024.0)
    step, losses = trainer._train_step, []

    def recorded(micro_batches, epoch):
        result = step(micro_batches, epoch)
        losses.append(result[0].item())  # the step's mean loss
        return result

    trainer._train_step = recorded
    first = next(p for p in trainer.model.parameters())
    first.register_hook(lambda grad: torch.full_like(grad, float("inf")) if not losses else grad)
    metrics = trainer.train_epoch(0)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert metrics["loss"] == pytest.approx(sum(losses[1:]) / (STEPS - 1), rel=1e-6)


# ---- optimizers that keep views of the gradients ----------------------------------------------
class FlatBufferSGD(torch.optim.Optimizer):
    """Stands in for torch_npu.optim.NpuFusedSGD: on its first step it copies every gradient into
    one flat buffer and points each .grad into it; afterwards it reads only that buffer. Its math
    is torch's SGD (weight decay, momentum), op for op."""

    is_fused_optimizer = True  # what torch_npu's NpuFusedOptimizerBase sets

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=1e-4):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.flat_grads: list[torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        if self.flat_grads is None:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            self.flat_grads, offset = [], 0
            for p in params:
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                self.flat_grads.append(p.grad)
                offset += p.numel()
        group = self.param_groups[0]
        for p, grad in zip(params, self.flat_grads):
            grad = grad.add(p, alpha=group["weight_decay"])
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.clone(grad).detach()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
            p.add_(state["momentum_buffer"], alpha=-group["lr"])

    def zero_grad(self, set_to_none: bool = True):
        if set_to_none:  # as torch_npu's fused optimizers
            raise ValueError("set_to_none is not supported in fused optimizers")
        super().zero_grad(set_to_none=False)


def _trained(trainer, steps: int = 3) -> list[torch.Tensor]:
    for step in range(steps):
        torch.manual_seed(step)
        batch = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 4, (8,))
        trainer._train_step((batch,), epoch=0)
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("level, dtype", [("O0", None), ("O2", torch.bfloat16)])
def test_a_flat_buffer_optimizer_steps_each_steps_own_gradients(compose, tmp_path: Path, level,
                                                                 dtype):
    """Three steps with the flat-buffer optimizer end where torch's SGD ends: gradients are zeroed
    in place and O2 copies into the masters' existing .grad, so the buffer is never stale."""
    flat = _trained(make_trainer(compose, tmp_path, level, dtype, None,
                                 optimizer_class=FlatBufferSGD))
    plain = _trained(make_trainer(compose, tmp_path, level, dtype, None, "optim.fused=false",
                                  optimizer_class=lambda params: torch.optim.SGD(
                                      params, lr=0.1, momentum=0.9, weight_decay=1e-4)))
    for a, b in zip(flat, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_sgd_starts_from_zero_momentum_and_matches_torchs_default(compose, tmp_path: Path):
    """optim.fused=true is torch's fused kernel; its zero-initialised momentum gives the same
    training as torch's default SGD."""
    fused = make_trainer(compose, tmp_path, "O0", None, None, "optim.fused=true")
    assert fused.optimizer.param_groups[0]["fused"] is True
    assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in fused.optimizer.state.values())
    default = make_trainer(compose, tmp_path, "O0", None, None, "optim.fused=false")
    for a, b in zip(_trained(fused), _trained(default)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(build_optimizer(nn.Linear(2, 2).parameters(), fused.plan.optim, CPU,
                                      fused=fused.plan.fused_sgd), torch.optim.SGD)


class NamedGpu(DeviceInfo):
    """A GPU by name only, which is all optim.fused=auto reads: its tensors stay on the CPU
    (torch's fused SGD kernel runs there too)."""

    torch_device = torch.device("cpu")


@pytest.mark.parametrize("device, amp, level, dtype, loss_scale, fused", [
    (CPU, ["amp=O2"], "O2", torch.bfloat16, None, False),    # the seed's defaults on the CPU
    (NamedGpu("gpu", 0), ["amp=O2"], "O2", torch.float16, 1024.0, True),  # ... and on a GPU
    (NamedGpu("gpu", 0), ["amp=O2", "amp.dtype=bfloat16"], "O2", torch.bfloat16, None, False),
    (NamedGpu("gpu", 0), ["amp=O0"], "O0", None, None, False)],
    ids=["cpu-O2-bfloat16", "gpu-O2-float16-scaled", "gpu-O2-bfloat16", "gpu-O0"])
def test_optim_fused_auto_is_fused_only_for_scaled_float16_on_a_gpu(
        compose, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: DeviceInfo,
        amp: list[str], level, dtype, loss_scale, fused: bool):
    """auto keeps torch's fused SGD only where it removes a host sync (it takes the loss scaler's
    verdict on the device); elsewhere it is torch's default SGD, the plain loop on the CPU, the
    kernel the seed's recipe ran (benchmarks/README.md: fused rounds differently on the CPU)."""
    if device.name == "gpu":
        # The plan is made as on a machine with one GPU (none here): device=gpu is found, and
        # one device is visible for world=1p. What it resolves (amp, fused SGD) is the plan's own.
        monkeypatch.setattr("imgtrain.device.resolve_name", lambda requested: "gpu")
        monkeypatch.setattr("imgtrain.distributed.visible_count", lambda name: 1)
    plan = make_plan(compose, *amp, "optim.fused=auto", device=device.name)
    assert (plan.device, plan.amp) == (device.name, Amp(level, dtype, loss_scale))
    trainer = build_trainer(plan, tmp_path, device=device, logger=NullLogger(), model=small_net())
    defaults = trainer.optimizer.defaults
    assert type(trainer.optimizer) is torch.optim.SGD and bool(defaults["fused"]) is fused
    assert not defaults["foreach"]  # None: torch's choice, the plain loop for CPU tensors
    if device is CPU:  # what the seed's defaults give on the CPU: bfloat16 O2, no loss scale
        seed = resolve(compose("device=cpu", "dataset=synthetic"), [])
        assert (seed.amp.level, seed.optim.fused) == ("O2", "auto")
        assert Precision.from_plan(seed.amp, CPU).scaler is None
