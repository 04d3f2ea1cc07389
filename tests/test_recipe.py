"""The V2 recipe's trainer-side ingredients, in-process: each off by default and inert there, and
each doing what torchvision's references do when on (zero-init, weight-decay groups, label
smoothing, MixUp/CutMix, accumulation with no_sync, clipping on O2's masters, the warm-up start,
the EMA of the fp32 weights)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from imgtrain.assembly import build_trainer
from imgtrain.checkpoint_files import rng_state
from imgtrain.config import DatasetConfig, SchedConfig
from imgtrain.data.mixing import build_batch_mix, dominant_label
from imgtrain.data.transforms import Normalizer
from imgtrain.device import DeviceInfo
from imgtrain.distributed import World, free_port
from imgtrain.ema import WeightAverage, adjusted_decay
from imgtrain.errors import ConfigError
from imgtrain.logger import NullLogger
from imgtrain.models import build_model
from imgtrain.optim import build_optimizer, lr_factor
from imgtrain.resolve import identify, resolve
from imgtrain.precision import Precision
from test_precision import SGD, coloured_batch, small_net

CPU = DeviceInfo("cpu")
SMALL = ["experiment=quickstart", "device=cpu", "amp=O0", "dataset.train_size=64",
         "dataset.val_size=16", "train.batch_size=16", "train.print_freq=2", "train.epochs=2",
         "train.save_checkpoints=false"]


def make_trainer(compose: Any, tmp_path: Path, *overrides: str, model: nn.Module | None = None,
                 seed: int = 0) -> Any:
    """The Trainer `worker` builds, for SMALL plus `overrides`, in this process."""
    plan = resolve(compose(*SMALL, *overrides), [])
    torch.manual_seed(seed)
    return build_trainer(plan, tmp_path, world=World(), device=CPU, logger=NullLogger(),
                         model=model)


def recording_losses(trainer: Any) -> list[torch.Tensor]:
    """Wrap the trainer's criterion to keep each micro-step's loss (and nothing else changes)."""
    losses, criterion = [], trainer.criterion

    def recorded(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses.append(criterion(output, target))
        return losses[-1]

    trainer.criterion = recorded
    return losses


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# ---- with every setting at its default, the seed's step ----------------------------------
def seed_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The seed's schedule: (step + 1) / warm-up steps, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def test_defaults_train_bit_for_bit_as_the_seeds_bare_step(compose: Any, tmp_path: Path) -> None:
    """A bare loop of the seed's recipe (one SGD group with weight decay on everything, plain
    cross-entropy, the seed's warm-up ramp) over the same batches: the trainer's losses and
    weights equal it exactly, so none of the new ingredients acts at its default."""
    trainer = make_trainer(compose, tmp_path)
    blocks = [m.bn2 for m in trainer.model.modules() if hasattr(m, "bn2")]
    assert all(bn.weight.abs().sum() > 0 for bn in blocks)  # zero_init_residual is off
    reference = build_model("resnet18", trainer.loaders.num_classes)
    reference.load_state_dict(trainer.model.state_dict())
    optimizer = torch.optim.SGD(reference.parameters(), lr=trainer.plan.optim.lr, momentum=0.9,
                                weight_decay=1e-4)  # the seed's: torch's plain loop on the CPU
    steps = trainer.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: seed_factor(step, steps, 2 * steps))  # quickstart: 1 warm-up epoch
    normalize, expected_losses = Normalizer(CPU.torch_device, False), []
    trainer.loaders.train_sampler.set_epoch(0)
    for images, target in trainer.loaders.train:
        loss = nn.functional.cross_entropy(reference(normalize(images)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        expected_losses.append(loss.detach())

    assert len(trainer.optimizer.param_groups) == 1 and trainer.ema is None
    assert trainer.batch_mix is None and trainer.criterion.label_smoothing == 0.0
    losses = recording_losses(trainer)
    trainer.train_epoch(0)
    assert torch.equal(torch.stack(losses), torch.stack(expected_losses))
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in trainer.model.state_dict().items())


# ---- model.zero_init_residual and the weight-decay groups --------------------------------
@pytest.mark.parametrize("arch,last_norm", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_each_blocks_last_batchnorm(arch: str, last_norm: str) -> None:
    model = build_model(arch, 4, zero_init_residual=True)
    blocks = [m for m in model.modules() if hasattr(m, last_norm) and hasattr(m, "conv1")]
    assert blocks and all(getattr(b, last_norm).weight.abs().sum() == 0 for b in blocks)
    assert model.bn1.weight.abs().sum() > 0  # only the blocks' last norms


def _groups(trainer: Any) -> dict[str, dict[str, Any]]:
    return {group.get("kind", "other"): group for group in trainer.optimizer.param_groups}


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_norm_and_bias_weight_decay_make_torchvisions_groups(compose: Any, tmp_path: Path,
                                                             level: str) -> None:
    trainer = make_trainer(compose, tmp_path, f"amp={level}", "optim.norm_weight_decay=0",
                           "optim.bias_weight_decay=0.5")
    # amp=O2 on the CPU: bfloat16, no loss scale
    assert trainer.precision.dtype == (torch.bfloat16 if level == "O2" else None)
    groups, model = _groups(trainer), trainer.model
    assert (groups["norm"]["weight_decay"], groups["bias"]["weight_decay"],
            groups["other"]["weight_decay"]) == (0.0, 0.5, 1e-4)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in groups["norm"]["params"]} == {id(m.weight) for m in norms}
    # Biases: every BatchNorm's and fc's (O2 steps fc's fp32 master, of the same shape).
    assert len(groups["bias"]["params"]) == len(norms) + 1
    assert all(p.dim() == 1 and p.dtype == torch.float32 for p in groups["bias"]["params"])
    # The rest: every conv weight and fc's weight, as fp32 values (O2's masters).
    assert sorted(p.dim() for p in groups["other"]["params"]) == [2] + [4] * 20
    assert all(p.dtype == torch.float32 for p in groups["other"]["params"])


def test_norm_weight_decay_alone_puts_batchnorm_biases_with_their_layer(compose: Any,
                                                                        tmp_path: Path) -> None:
    groups = _groups(make_trainer(compose, tmp_path, "optim.norm_weight_decay=0"))
    assert set(groups) == {"other", "norm"}
    assert len(groups["norm"]["params"]) == 2 * 20  # weight and bias of resnet18's 20 norms
    assert groups["other"]["params"][-1].shape == (10,)  # fc's bias keeps optim.weight_decay


def test_a_resume_applies_this_runs_group_decays_and_refuses_other_groups(compose: Any,
                                                                          tmp_path: Path) -> None:
    saved = make_trainer(compose, tmp_path, "optim.norm_weight_decay=0").state_dict(
        [rng_state()])
    resumed = make_trainer(compose, tmp_path, "optim.norm_weight_decay=0.01",
                           "optim.weight_decay=0.001")
    resumed.load_state_dict(saved)
    groups = _groups(resumed)
    assert (groups["norm"]["weight_decay"], groups["other"]["weight_decay"]) == (0.01, 0.001)
    single = make_trainer(compose, tmp_path)
    with pytest.raises(ConfigError, match="weight-decay groups.*norm_weight_decay"):
        single.load_state_dict(saved)


# ---- label smoothing and MixUp/CutMix ------------------------------------------------------
def test_label_smoothing_reaches_the_loss(compose: Any, tmp_path: Path) -> None:
    trainer = make_trainer(compose, tmp_path, "train.label_smoothing=0.1",
                           "train.steps_per_epoch=1")
    outputs = []
    trainer.model.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
    losses = recording_losses(trainer)
    trainer.loaders.train_sampler.set_epoch(0)
    _, target = next(iter(trainer.loaders.train))
    trainer.train_epoch(0)
    smoothed = nn.functional.cross_entropy(outputs[0], target, label_smoothing=0.1)
    assert torch.equal(losses[0], smoothed)
    assert not torch.equal(losses[0], nn.functional.cross_entropy(outputs[0], target))


def test_mixup_and_cutmix_give_soft_targets_drawn_from_the_cpu_generator() -> None:
    mix = build_batch_mix(DatasetConfig(mixup_alpha=0.2, cutmix_alpha=1.0), num_classes=4)
    images, labels = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    torch.manual_seed(5)
    mixed, soft = mix(images, labels)
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
    assert not torch.equal(mixed, images)
    # Each row weighs its own label and its neighbour's: the dominant one is one of them.
    assert all(dominant_label(soft)[i] in (labels[i], labels[i - 1]) for i in range(8))
    torch.manual_seed(5)  # a resume restores this generator: the same draw, the same batch
    again, soft_again = mix(images, labels)
    assert torch.equal(again, mixed) and torch.equal(soft_again, soft)
    assert build_batch_mix(DatasetConfig(mixup_alpha=0.0, cutmix_alpha=0.0), 4) is None


def test_the_trainer_mixes_normalised_batches_and_counts_the_dominant_label(
        compose: Any, tmp_path: Path) -> None:
    trainer = make_trainer(compose, tmp_path, "dataset.mixup_alpha=0.4",
                           "train.steps_per_epoch=2")
    seen, mix = [], trainer.batch_mix

    def watched(images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, soft = mix(images, target)
        seen.append((images.dtype, float(images.min()), soft))
        return mixed, soft

    trainer.batch_mix = watched
    losses = recording_losses(trainer)
    metrics = trainer.train_epoch(0)
    assert [dtype for dtype, _, _ in seen] == [torch.float32] * 2
    assert all(low < 0 for _, low, _ in seen)  # normalised (uint8 pixels are never negative)
    assert all(soft.dim() == 2 for _, _, soft in seen) and len(losses) == 2
    assert 0.0 <= metrics["acc1"] <= 100.0 and math.isfinite(metrics["loss"])


# ---- gradient accumulation ---------------------------------------------------------------
def no_norm_net() -> nn.Module:
    """Without BatchNorm, two micro-batches of 8 give exactly one batch of 16's gradient."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


def test_accumulated_micro_steps_equal_one_full_batch(compose: Any, tmp_path: Path) -> None:
    whole = make_trainer(compose, tmp_path, model=no_norm_net())
    accumulated = make_trainer(compose, tmp_path, "train.accumulate_steps=2", model=no_norm_net())
    assert accumulated.loaders.train.batch_size == 8 and accumulated.plan.batches.global_batch == 16
    assert accumulated.steps_per_epoch == whole.steps_per_epoch == 4
    whole_metrics, accumulated_metrics = whole.train_epoch(0), accumulated.train_epoch(0)
    for a, b in zip(whole.model.parameters(), accumulated.model.parameters()):
        assert (a - b).abs().max() <= 1e-6
    # The schedule and the step count follow optimizer steps, not micro-steps.
    assert accumulated.scheduler.last_epoch == whole.scheduler.last_epoch == 4
    assert accumulated.state.global_step == 4
    assert accumulated_metrics["loss"] == pytest.approx(whole_metrics["loss"], rel=1e-5)
    assert accumulated_metrics["acc1"] == whole_metrics["acc1"]


def test_micro_steps_before_the_last_skip_the_gradient_all_reduce(compose: Any,
                                                                  tmp_path: Path) -> None:
    """A real DDP (gloo, one process): its communication hook runs once per optimizer step."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        trainer = make_trainer(compose, tmp_path, "train.accumulate_steps=2", model=no_norm_net())
        trainer.model = nn.parallel.DistributedDataParallel(trainer.model)
        reductions = []

        def counting(_state, bucket):  # unannotated: DDP checks the annotation's object
            reductions.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        trainer.model.register_comm_hook(None, counting)
        trainer.train_epoch(0)
        assert len(reductions) == trainer.steps_per_epoch  # one bucket: one reduce per step
    finally:
        dist.destroy_process_group()


# ---- clipping, the warm-up start -----------------------------------------------------------
def total_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([t.grad.norm() for t in tensors])))


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_clipping_scales_the_stepped_gradients_after_unscaling(level: str) -> None:
    precision = Precision(level, torch.bfloat16 if level == "O2" else None,
                          128.0 if level == "O2" else None, CPU)
    model, params = precision.prepare(small_net())
    optimizer = build_optimizer(params, SGD, CPU, fused=False)
    images, target = coloured_batch(0)
    precision.backward(nn.functional.cross_entropy(model(images * 50).float(), target))
    precision.step(optimizer, clip_grad_norm=0.01)
    # The stepped gradients (O2: the fp32 masters', unscaled from 128) have norm 0.01.
    assert total_norm(params) == pytest.approx(0.01, rel=1e-3)


def test_an_overflowed_step_is_still_skipped_when_clipping() -> None:
    precision = Precision("O2", torch.bfloat16, 128.0, CPU)
    model, params = precision.prepare(small_net())
    optimizer = build_optimizer(params, SGD, CPU, fused=False)
    before = [p.detach().clone() for p in params]
    images, target = coloured_batch(0)
    precision.backward(nn.functional.cross_entropy(model(images).float(), target))
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    precision.step(optimizer, clip_grad_norm=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_warmup_starts_at_the_start_factor_and_reaches_the_lr() -> None:
    sched = SchedConfig(name="cosine", warmup_epochs=2, warmup_start_factor=0.01)
    assert lr_factor(0, 10, sched, 5) == pytest.approx(0.01)
    assert lr_factor(10, 10, sched, 5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(20, 10, sched, 5) == pytest.approx(1.0)  # warm-up over: cosine at its top
    seed = SchedConfig(name="cosine", warmup_epochs=2, warmup_start_factor=None)
    assert [lr_factor(s, 10, seed, 5) for s in (0, 19)] == [pytest.approx(0.05), 1.0]


# ---- EMA ---------------------------------------------------------------------------------
def test_ema_decay_is_adjusted_as_torchvision_does() -> None:
    # torchvision: alpha = (1 - decay) * world_size * batch_size * ema_steps / epochs
    assert adjusted_decay(0.99998, 32, 1024, 600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert adjusted_decay(0.9, 32, 1024, 1) == 0.0  # alpha capped at 1: a plain copy


def test_ema_averages_o2s_fp32_masters_every_n_steps_and_restarts_in_warmup() -> None:
    precision = Precision("O2", torch.bfloat16, None, CPU)
    model, params = precision.prepare(small_net())
    optimizer = build_optimizer(params, SGD, CPU, fused=False)
    ema = WeightAverage(small_net(), decay=0.5, every_steps=2, warmup_epochs=1)
    expected = [p.detach().clone() for p in params]
    for step in range(1, 7):
        images, target = coloured_batch(step)
        precision.backward(nn.functional.cross_entropy(model(images).float(), target))
        precision.step(optimizer)
        model.zero_grad(set_to_none=True)
        epoch = 0 if step <= 2 else 1  # steps 1-2 in the warm-up
        if ema.due(step):
            ema.update(epoch, precision.master_params(model), list(model.buffers()))
        masters = [m.detach() for m in precision.master_params(model)]
        # Step 2 is in the warm-up, after which the average restarts: the first update after
        # it (step 4) starts from the current fp32 weights.
        if step in (2, 4):
            expected = [m.clone() for m in masters]
        elif step % 2 == 0:
            expected = [0.5 * e + 0.5 * m for e, m in zip(expected, masters)]
    averaged = list(ema.module.parameters())
    assert all(a.dtype == torch.float32 for a in averaged)
    for a, e in zip(averaged, expected):
        assert torch.allclose(a, e, atol=1e-7)
    assert int(ema.averaged.n_averaged) == 2  # updates at steps 4 and 6 (step 2 restarted it)


def test_the_trainers_ema_under_o2_follows_the_fp32_masters(compose: Any, tmp_path: Path) -> None:
    # decay 0.5 adjusted for 16 images x 1 step / 2 epochs: alpha capped at 1, a plain copy.
    trainer = make_trainer(compose, tmp_path, "ema.decay=0.5", "ema.steps=1",
                           "train.steps_per_epoch=1", "sched.warmup_epochs=0", "train.batch_size=4",
                           "amp=O2")  # on the CPU: bfloat16, no loss scale
    trainer.train_epoch(0)
    masters = trainer.precision.master_params(trainer.model)
    averaged = list(trainer.ema.module.parameters())
    assert all(a.dtype == torch.float32 and torch.equal(a, m) for a, m in zip(averaged, masters))
    halves = [p for p in trainer.model.parameters() if p.dtype == torch.bfloat16]
    assert halves and any(not torch.equal(p.float(), m) for p, m in zip(
        trainer.model.parameters(), masters) if p.dtype == torch.bfloat16)
    buffers = dict(trainer.model.named_buffers())
    assert all(torch.equal(value, buffers[name]) for name, value in
               trainer.ema.module.named_buffers())  # BatchNorm statistics averaged too


class _CountedPasses:
    """The validation loader, counting the passes made over it."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.passes = loader, 0

    def __iter__(self) -> Any:
        self.passes += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def _validate_on_rank(rank: int, plan: Any, init_file: str, out_dir: str) -> None:
    """One rank of a 2-process gloo group: the epoch's validation of the model and its EMA in one
    pass, then each alone, as the two passes an epoch used to be."""
    torch.set_num_threads(1)  # forked: as a DataLoader worker, away from the parent's thread pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        trainer = build_trainer(plan, out_dir, world=World(rank, rank, 2, 2), device=CPU,
                                logger=NullLogger(), model=small_net())
        with torch.no_grad():  # an average that is not the trained weights
            for param in trainer.ema.module.parameters():
                param.mul_(0.5)
        counted = trainer.loaders.val = _CountedPasses(trainer.loaders.val)
        one_pass = trainer.validate()
        passes = counted.passes
        alone = {"model": trainer.evaluate(), "ema": trainer.evaluate(trainer.ema.module)}
        torch.save({"one_pass": one_pass, "passes": passes, "alone": alone},
                   Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_one_validation_pass_gives_the_model_and_the_ema_their_own_passes_numbers(
        compose: Any, tmp_path: Path) -> None:
    """With an EMA each validation batch is read once and evaluated by both networks: on two
    ranks (the exact sampler gives them 11 and 10 of 21 images), one pass over the loader per
    epoch, and every number equal to what a pass of each network alone gives."""
    plan = resolve(compose("device=cpu", "dataset=synthetic", "dataset.workers=0", "amp=O0",
                           "dataset.image_size=8", "dataset.num_classes=4",
                           "dataset.train_size=16", "dataset.val_size=21",
                           "world.nproc_per_node=2", "train.batch_size=8", "ema.decay=0.9",
                           "train.memory_check=false"), [])
    mp.start_processes(_validate_on_rank, args=(plan, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, start_method="fork")  # spawned, each would import torch (~8 s)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        one_pass, alone = saved["one_pass"], saved["alone"]
        assert saved["passes"] == 1, "the validation set is read once for both networks"
        assert one_pass == {**alone["model"], **{f"ema_{key}": value for key, value in
                                                 alone["ema"].items() if key != "samples"}}
        assert one_pass["samples"] == 21  # every image once, over both ranks
        assert one_pass["loss"] != one_pass["ema_loss"]  # two networks, not one twice


def test_each_epoch_reads_the_validation_set_once_with_an_ema(compose: Any,
                                                              tmp_path: Path) -> None:
    trainer = make_trainer(compose, tmp_path, "ema.decay=0.5", "ema.steps=1",
                           "train.steps_per_epoch=1", "sched.warmup_epochs=0")
    counted = trainer.loaders.val = _CountedPasses(trainer.loaders.val)
    val = trainer.fit()
    assert counted.passes == trainer.plan.train.epochs == 2
    assert {"acc1", "ema_acc1", "ema_acc5", "ema_loss"} <= set(val)
    assert [row["ema_acc1"] for row in trainer.state.history][-1] == val["ema_acc1"]


# ---- bad values --------------------------------------------------------------------------
@pytest.mark.parametrize("override,named", [
    ("train.accumulate_steps=0", "train.accumulate_steps=0"),
    ("train.accumulate_steps=3", "train.accumulate_steps=3"),
    ("train.label_smoothing=1.5", "train.label_smoothing=1.5"),
    ("train.clip_grad_norm=0", "train.clip_grad_norm=0"),
    ("optim.norm_weight_decay=-1", "optim.norm_weight_decay=-1"),
    ("sched.warmup_start_factor=2", "sched.warmup_start_factor=2"),
    ("dataset.mixup_alpha=-0.2", "dataset.mixup_alpha=-0.2"),
    ("dataset.cutmix_alpha=-1", "dataset.cutmix_alpha=-1"),
    ("ema.decay=1.5", "ema.decay=1.5"),
    ("ema.steps=0", "ema.steps=0"),
])
def test_each_bad_value_is_one_error_naming_it(compose: Any, override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        resolve(compose(*SMALL, override), [])


# ---- experiment=resnet152_v2 ---------------------------------------------------------------
@pytest.mark.parametrize("world,accumulate", [([], 8), (["world=8p"], 1)])
def test_the_v2_experiment_holds_torchvisions_recipe_on_any_world(compose: Any, world: list[str],
                                                                  accumulate: int) -> None:
    # What the composed config says, before the checks (dataset.root is not set here).
    config = identify(compose("experiment=resnet152_v2", *world), []).cfg
    train, data, optim = config.train, config.dataset, config.optim
    # The global batch of 1024 stays, in micro-steps of 128 per device.
    assert (train.batch_size, train.accumulate_steps, optim.lr) == (1024, accumulate, 0.5)
    assert (train.epochs, train.label_smoothing, config.model.arch) == (600, 0.1, "resnet152")
    assert (optim.weight_decay, optim.norm_weight_decay) == (2e-5, 0.0)
    assert (config.sched.warmup_epochs, config.sched.warmup_start_factor) == (5, 0.01)
    assert (data.image_size, data.val_resize_size, data.val_crop_size) == (176, 232, 224)
    assert (data.auto_augment, data.random_erase, data.mixup_alpha, data.cutmix_alpha,
            data.ra_reps) == ("ta_wide", 0.1, 0.2, 1.0, 4)
    assert (config.ema.decay, config.ema.steps) == (0.99998, 32)


# ---- experiment=resnet152_lowres, cifar10_resnet18 (#31.5) ---------------------------------
def test_the_low_resolution_preset_holds_ffcvs_schedule_and_tests_larger(compose: Any) -> None:
    from imgtrain.data.resolution import train_sizes
    config = identify(compose("experiment=resnet152_lowres"), []).cfg
    data, train = config.dataset, config.train
    sizes = train_sizes(data, train.epochs)
    # FFCV's get_resolution over 88 epochs: 160 px until the ramp, 192 px at its end and after.
    assert len(sizes) == 88 and set(sizes[:66]) == {160} and set(sizes[76:]) == {192}
    assert sizes == tuple(sorted(sizes)) and all(size % 32 == 0 for size in sizes)
    assert (config.model.arch, train.label_smoothing, config.optim.norm_weight_decay) == (
        "resnet152", 0.1, 0.0)
    # Validation above the largest training size (FixRes), with the seed's optimizer and schedule.
    assert (data.val_resize_size, data.val_crop_size) == (256, 224) and data.image_size == 192
    assert (config.optim.lr, config.optim.weight_decay, config.sched.warmup_epochs) == (0.1, 1e-4, 5)


def test_the_cifar10_preset_is_the_cifar_resnet18_recipe(compose: Any) -> None:
    config = identify(compose("experiment=cifar10_resnet18"), []).cfg
    assert (config.dataset.name, config.model.arch, config.model.stem) == (
        "cifar10", "resnet18", "cifar")
    assert (config.train.epochs, config.train.batch_size, config.optim.lr) == (200, 128, 0.1)
    assert (config.optim.weight_decay, config.sched.warmup_epochs) == (5e-4, 0)
    assert config.dataset.scale is None  # CIFAR's 4-pixel padded crop, not a random-resized one


def test_the_small_images_preset_keeps_the_imagenet_stem(compose: Any) -> None:
    # Measured (benchmarks/README.md, "Small images"): in the preset's 30 epochs of 1,500 digits
    # the CIFAR stem stayed at chance where the ImageNet stem reached 94.4.
    config = identify(compose("experiment=small_images", "dataset.root=/data/mine"), []).cfg
    assert (config.model.arch, config.model.stem, config.train.epochs) == (
        "resnet18", "imagenet", 30)
