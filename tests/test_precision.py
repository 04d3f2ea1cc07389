"""amp=O0|O1|O2 on the CPU (bfloat16): O2's shapes, loss scaling, training, and checkpoints across levels."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import TINY, assert_clean_error, read_results, run_cli
from imgtrain.assembly import build_trainer
from imgtrain.config import OptimConfig
from imgtrain.device import DeviceInfo
from imgtrain.distributed import World
from imgtrain.errors import ConfigError
from imgtrain.logger import NullLogger
from imgtrain.models import build_model
from imgtrain.optim import build_optimizer
from imgtrain.plan import RunPlan
from imgtrain.resolve import resolve
from imgtrain.precision import Precision, resolve_dtype, resolve_loss_scale

CPU = DeviceInfo("cpu")
SGD = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False,
                  fused=False)


def small_net(seed: int = 0) -> nn.Module:
    """Conv, BatchNorm and Linear: every kind of layer O2 treats differently, and fast."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def o2(loss_scale: float | str | None = None, model: nn.Module | None = None):
    """An O2 Precision on the CPU, its prepared model and an SGD over the parameters it returns."""
    precision = Precision("O2", torch.bfloat16, loss_scale, CPU)
    model, params = precision.prepare(model or small_net())
    return precision, model, build_optimizer(params, SGD, CPU, fused=False)


def train_step(precision: Precision, model: nn.Module, optimizer: torch.optim.Optimizer,
               inject_inf: bool = False, batch: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> None:
    """What Trainer._train_step does, with an optional inf planted in one half-precision gradient."""
    images, target = batch or (torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    with precision.autocast():
        loss = nn.functional.cross_entropy(model(images).float(), target)
    model.zero_grad(set_to_none=True)
    precision.backward(loss)
    if inject_inf:
        model[0].weight.grad[0, 0, 0, 0] = float("inf")
    precision.step(optimizer)


def coloured_batch(seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task for small_net: each of 4 classes a colour, under heavy noise."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 4, (size,), generator=generator)
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    noise = torch.randn(size, 3, 8, 8, generator=generator)
    return colours[target][:, :, None, None] + noise, target


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def scale_of(precision: Precision) -> float:
    return float(precision.loss_scale)


# ---- O2's shape ------------------------------------------------------------------------------
def test_o2_holds_half_convs_and_linears_fp32_batchnorm_and_fp32_masters(compose):
    plan = resolve(compose("device=cpu", "dataset=synthetic", "amp=O2"), [])  # dtype, scale: auto
    precision = Precision.from_plan(plan.amp, CPU)
    model, params = precision.prepare(build_model("resnet18", 10))
    optimizer = build_optimizer(params, SGD, CPU, fused=False)
    halves = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(halves) == 21 and len(norms) == 20  # resnet18: 20 convs + fc, 20 BatchNorms
    assert all(p.dtype == torch.bfloat16 for m in halves for p in m.parameters())
    assert all(t.dtype == torch.float32 for m in norms
               for t in (m.weight, m.bias, m.running_mean, m.running_var))
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(stepped) == len(list(model.parameters()))
    assert all(p.dtype == torch.float32 for p in stepped)
    model_params = {id(p) for m in halves for p in m.parameters()}
    assert not model_params & {id(p) for p in stepped}, "the optimizer must step masters, not halves"


def test_o2_casts_inputs_in_and_outputs_out_and_steps_masters_into_half_weights():
    precision, model, optimizer = o2()
    assert model(torch.rand(2, 3, 8, 8)).dtype == torch.float32  # fp32 in, fp32 out, as apex O2
    before = weights(model)
    train_step(precision, model, optimizer)
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    for param, master, old in zip(model.parameters(), masters, before):
        assert not torch.equal(param, old), "every weight moves on a clean step"
        assert torch.equal(param, master.to(param.dtype)), "half weights are the rounded masters"


def test_checkpoint_state_holds_the_fp32_masters_not_the_rounded_halves():
    precision, model, optimizer = o2()
    for _ in range(2):
        train_step(precision, model, optimizer)
    state = precision.full_precision_state(model)
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    for (name, param), master in zip(model.named_parameters(), masters):
        assert state[name].dtype == torch.float32 and torch.equal(state[name], master), name
    conv = state["0.weight"]
    assert not torch.equal(conv, conv.bfloat16().float()), "masters keep precision bf16 lacks"
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def _first_weights_of_rank(rank: int, plan: RunPlan, init_file: str, out_dir: str) -> None:
    """One rank of a 2-process gloo group, seeded per rank as the worker seeds, building its
    Trainer as the worker does: save the model it started from, its EMA and its O2 masters."""
    torch.set_num_threads(1)  # forked: as a DataLoader worker, away from the parent's thread pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(plan.train.seed + rank)
        model = small_net(seed=rank)
        own = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = build_trainer(plan, out_dir, world=World(rank, rank, 2, 2), device=CPU,
                                logger=NullLogger(), model=model)
        masters = [p.detach() for group in trainer.optimizer.param_groups for p in group["params"]]
        torch.save({"own": own, "ema": trainer.ema.module.state_dict(), "masters": masters},
                   Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_starts_its_ema_and_o2_masters_from_rank_0s_weights(compose, tmp_path: Path):
    """Ranks are seeded differently, so each builds other weights; DDP would broadcast rank 0's
    only when it wraps the model, after the EMA and the masters were copied. Before any update,
    every rank's EMA and masters are rank 0's model (as torchvision's EMA, built from the
    DDP-synchronised model)."""
    # amp=O2 on the CPU: bfloat16 masters. The memory check is off: it estimates the plan's
    # model.arch, and the ranks train small_net instead.
    plan = resolve(compose("device=cpu", "dataset=synthetic", "dataset.workers=0", "amp=O2",
                           "dataset.image_size=8", "dataset.num_classes=4",
                           "dataset.train_size=16", "dataset.val_size=8",
                           "world.nproc_per_node=2", "train.batch_size=16", "ema.decay=0.9",
                           "train.memory_check=false"), [])
    assert (plan.world_size, plan.batches.per_rank, plan.amp.dtype) == (2, 8, torch.bfloat16)
    mp.start_processes(_first_weights_of_rank, args=(plan, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, start_method="fork")  # spawned, each would import torch (~8 s)
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(rank0["own"]["0.weight"], rank1["own"]["0.weight"]), \
        "rank 1 started elsewhere"
    names = [name for name, _ in small_net().named_parameters()]
    for saved in (rank0, rank1):
        for key, value in rank0["own"].items():
            assert torch.equal(saved["ema"][key], value), key
        for name, master in zip(names, saved["masters"]):
            assert torch.equal(master, rank0["own"][name]), name


# ---- loss scaling ----------------------------------------------------------------------------
def test_inf_gradient_skips_the_step_and_a_dynamic_scale_drops():
    precision, model, optimizer = o2("dynamic")
    before = weights(model)
    train_step(precision, model, optimizer, inject_inf=True)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model))), "step not skipped"
    assert not optimizer.state, "a skipped step leaves no momentum behind"
    assert scale_of(precision) == 2.0 ** 15  # from 2**16, halved
    train_step(precision, model, optimizer)
    assert not torch.equal(before[0], model[0].weight), "a clean step steps"
    assert scale_of(precision) == 2.0 ** 15  # growth waits 2000 clean steps


def test_static_scale_stays_at_1024_through_overflow_and_clean_steps():
    precision, model, optimizer = o2(1024.0)
    before = weights(model)
    train_step(precision, model, optimizer, inject_inf=True)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model))), "step not skipped"
    assert scale_of(precision) == 1024.0
    for _ in range(3):
        train_step(precision, model, optimizer)
    assert scale_of(precision) == 1024.0
    assert precision.scaler.get_growth_interval() > 10 ** 6  # it could never grow in a real run


def test_static_scale_is_unscaled_exactly():
    """Scaling by a power of two is exact, so a 1024-scaled step equals an unscaled one bit for bit."""
    runs = []
    for scale in (None, 1024.0):
        torch.manual_seed(1)
        precision, model, optimizer = o2(scale)
        train_step(precision, model, optimizer)
        runs.append(weights(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_dynamic_scale_resumes_and_static_scale_comes_from_the_config():
    precision, model, optimizer = o2("dynamic")
    train_step(precision, model, optimizer, inject_inf=True)
    saved = precision.state_dict()
    resumed, model, optimizer = o2("dynamic")
    resumed.load_state_dict(saved)
    train_step(resumed, model, optimizer)
    assert scale_of(resumed) == 2.0 ** 15
    static, model, optimizer = o2(1024.0)
    static.load_state_dict(saved)  # a loaded state must not break the first step
    train_step(static, model, optimizer)
    assert scale_of(static) == 1024.0


# ---- overflow on an NPU in saturation mode ---------------------------------------------------
class OverflowRegister:
    """Stands for an Ascend 910/910A's overflow status register in saturation mode: an fp16
    overflow saturates at the fp16 maximum (finite) and raises this flag; nothing becomes inf."""

    def __init__(self) -> None:
        self.flag = torch.zeros(())

    def read_and_clear(self) -> torch.Tensor:
        value = self.flag.clone()
        self.flag.zero_()
        return value


class SaturationModeScaler(torch.amp.GradScaler):
    """Stands for torch_npu's GradScaler (its dynamic mode, as imgtrain builds it) on such a chip.
    Its check ignores the gradients' values: it reads the device's overflow register and clears
    it (npu_get_float_status / npu_clear_float_status; aclrtGetOverflowStatus /
    aclrtResetOverflowStatus on newer releases), then all-reduces the verdict across ranks
    (_sync_dist_overflow_count, each device having its own register) and adds 1 to found_inf when
    any rank overflowed. The unscaling itself is torch's."""

    def __init__(self, register: OverflowRegister, init_scale: float) -> None:
        super().__init__("cpu", init_scale=init_scale)
        self.register = register

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        torch._foreach_mul_(grads, inv_scale)
        found_inf.add_(self.register.read_and_clear())
        any_rank = found_inf.clone()
        if dist.is_initialized():
            dist.all_reduce(any_rank)
        if any_rank.item():
            found_inf.add_(1.0)
        return {found_inf.device: found_inf}


def saturation_mode_o2(loss_scale: float | str, fused: bool, register: OverflowRegister):
    """O2 float16 (as on the NPU) with the saturation-mode scaler, starting at 1024."""
    precision = Precision("O2", torch.float16, loss_scale, CPU)
    model, params = precision.prepare(small_net())
    precision.scaler = SaturationModeScaler(register, init_scale=1024.0)
    return precision, model, build_optimizer(params, SGD, CPU, fused=fused)


def saturating_step(precision: Precision, model: nn.Module, optimizer: torch.optim.Optimizer,
                    register: OverflowRegister, overflow: bool) -> None:
    """A training step; with `overflow`, what the device does when a gradient overflows: it
    saturates at the fp16 maximum and the register rises."""
    images, target = coloured_batch(seed=0, size=8)
    loss = nn.functional.cross_entropy(model(images).float(), target)
    model.zero_grad(set_to_none=True)
    precision.backward(loss)
    if overflow:
        model[0].weight.grad[0, 0, 0, 0] = torch.finfo(torch.float16).max
        register.flag.fill_(1.0)
    precision.step(optimizer)


def _saturated_steps(overflow: bool, loss_scale: float | str, fused: bool) -> dict:
    """One step (overflowing where asked), then a clean one: what each left behind."""
    register = OverflowRegister()
    precision, model, optimizer = saturation_mode_o2(loss_scale, fused, register)
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    before = weights(model) + [m.detach().clone() for m in masters]
    saturating_step(precision, model, optimizer, register, overflow)
    after = weights(model) + [m.detach().clone() for m in masters]
    first = {"moved": not all(torch.equal(a, b) for a, b in zip(before, after)),
             "scale": scale_of(precision)}
    saturating_step(precision, model, optimizer, register, overflow=False)
    return {**first, "clean_moved": not torch.equal(after[0], model[0].weight),
            "clean_scale": scale_of(precision)}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("loss_scale, lowered", [("dynamic", 512.0), (1024.0, 1024.0)])
def test_a_saturated_overflow_is_skipped_on_the_scalers_verdict(loss_scale, lowered, fused):
    """The gradients stay finite, and the register is clear once the scaler has read it: only
    the scaler's verdict knows. The step changes no weight and no master, a dynamic scale halves
    (a static one stays), and the next clean step steps."""
    result = _saturated_steps(overflow=True, loss_scale=loss_scale, fused=fused)
    assert not result["moved"], "a saturated overflow was applied to the weights"
    assert result["scale"] == lowered
    assert result["clean_moved"] and result["clean_scale"] == lowered


def _saturated_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of a 2-process gloo group: only rank 0's device overflows. Both ranks compute
    the same gradients (DDP would all-reduce them; here they are equal already)."""
    torch.set_num_threads(1)  # forked: as a DataLoader worker, away from the parent's thread pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for fused in (False, True):
            register = OverflowRegister()
            precision, model, optimizer = saturation_mode_o2("dynamic", fused, register)
            before = weights(model)
            saturating_step(precision, model, optimizer, register, overflow=rank == 0)
            results[fused] = {"moved": not all(torch.equal(a, b)
                                               for a, b in zip(before, weights(model))),
                              "scale": scale_of(precision)}
        torch.save(results, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_saturated_overflow_on_one_rank_is_skipped_on_every_rank(tmp_path: Path):
    """Rank 1's own register stays clear: it skips on the verdict its scaler all-reduced, and
    with torch's fused SGD too (rank 0's found_inf is 2 there: its own 1, plus 1 for the ranks)."""
    mp.start_processes(_saturated_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    for rank in (0, 1):
        for fused, result in torch.load(tmp_path / f"{rank}.pt").items():
            assert not result["moved"], (rank, fused)
            assert result["scale"] == 512.0, (rank, fused)


@pytest.mark.parametrize("level, dtype, setting, expected", [
    ("O2", torch.float16, "auto", 1024.0),
    ("O1", torch.float16, "auto", "dynamic"),
    ("O2", torch.bfloat16, "auto", None),
    ("O1", torch.bfloat16, "auto", None),
    ("O0", None, "auto", None),
    ("O1", torch.float16, 512, 512.0),
    ("O2", torch.float16, "dynamic", "dynamic"),
])
def test_loss_scale_settings(level, dtype, setting, expected):
    assert resolve_loss_scale(level, dtype, setting) == expected


@pytest.mark.parametrize("setting", [1024, "dynamic"])
def test_explicit_loss_scale_with_bfloat16_is_refused(setting):
    with pytest.raises(ConfigError, match="bfloat16 needs no loss scaling"):
        resolve_loss_scale("O2", torch.bfloat16, setting)


def test_dtype_auto_is_bfloat16_on_the_cpu_and_float16_on_accelerators():
    assert resolve_dtype("O2", "auto", CPU) == torch.bfloat16
    assert resolve_dtype("O2", "auto", DeviceInfo("gpu", 0)) == torch.float16
    assert resolve_dtype("O1", "auto", DeviceInfo("npu", 0)) == torch.float16
    assert resolve_dtype("O0", "float16", CPU) is None
    with pytest.raises(ConfigError, match="amp.dtype=bfloat16"):
        resolve_dtype("O2", "float16", CPU)


# ---- the command line ------------------------------------------------------------------------
BASE = [o for o in TINY if not o.startswith("amp=")]  # each test names its own level
SMALL = [*BASE, "experiment=quickstart", "dataset.train_size=320",
         "dataset.val_size=100", "train.epochs=2", "train.batch_size=16", "optim.lr=0.02",
         "dataset.noise=1.0"]  # the easy task: 40 steps of 16 reach well above chance (~98%)


@pytest.mark.parametrize("overrides, fragments", [
    (["amp=O2", "amp.dtype=float16"], ["amp.dtype=float16", "amp.dtype=bfloat16"]),
    (["amp=O2", "amp.loss_scale=1024"], ["amp.loss_scale=1024", "amp.loss_scale=auto"]),
    (["amp=O1", "amp.loss_scale=dynamic"], ["bfloat16", "amp.loss_scale=auto"]),
    (["amp.level=O3"], ["O3", "O0, O1, O2"]),
])
def test_bad_amp_settings_exit_with_one_error_line(tmp_path: Path, overrides, fragments):
    proc = run_cli(*BASE, "dataset=synthetic", *overrides,
                   f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, *fragments)


# bfloat16 backward passes take ~30x fp32's on CPUs without native bfloat16 (AVX512-BF16, AMX),
# ~8 s a step at batch 32 here, so the runs below take two small steps at O1/O2: the in-process
# tests above cover learning.
FEW_STEPS = ["dataset.train_size=16", "train.batch_size=8", "train.epochs=1",
             "sched.warmup_epochs=0"]


@pytest.fixture(scope="module")
def trained(module_dir: Path) -> dict[str, Path]:
    """resnet18 trained at O0 on a small learnable task, then two O2 steps on from its weights:
    run dir by level."""
    runs = {level: module_dir / f"train-{level}" for level in ("O0", "O2")}
    proc = run_cli(*SMALL, "amp=O0", f"hydra.run.dir={runs['O0']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(*SMALL, *FEW_STEPS, "amp=O2",
                   f"model.weights={runs['O0'] / 'checkpoints' / 'last.pt'}",
                   f"hydra.run.dir={runs['O2']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if Precision("O2", torch.bfloat16, None, CPU).emulated_on_this_cpu:
        assert "amp=O2 on this CPU has no native bfloat16 kernels" in proc.stdout + proc.stderr
    return runs


@pytest.mark.parametrize("level", ["O0", "O1", "O2"])
def test_each_level_learns_a_noisy_colour_task(level: str):
    """The same steps at every level: the loss falls and held-out accuracy is far above chance."""
    torch.manual_seed(0)
    precision = Precision(level, None if level == "O0" else torch.bfloat16, None, CPU)
    model, params = precision.prepare(small_net())
    optimizer = build_optimizer(params, SGD, CPU, fused=False)
    held_out, target = coloured_batch(seed=1000, size=256)

    def accuracy() -> float:
        with torch.no_grad(), precision.autocast():
            model.eval()
            correct = (model(held_out).argmax(1) == target).float().mean().item()
            model.train()
        return correct

    before = accuracy()
    for step in range(60):
        train_step(precision, model, optimizer, batch=coloured_batch(seed=step))
    assert accuracy() > max(0.8, before + 0.3), (before, accuracy())  # chance is 0.25


def test_o0_trains_resnet18_well_above_chance_and_o2_trains_on_from_its_weights(
        trained: dict[str, Path]):
    for level in ("O0", "O2"):
        results = read_results(trained[level])
        assert results["status"] == "completed"
        assert results["final_acc1"] > 50.0, (level, results)  # chance is 10% with 10 classes
        assert results["best_acc1"] >= results["final_acc1"]
    weights = [torch.load(trained[level] / "checkpoints" / "last.pt", weights_only=True)["model"]
               for level in ("O0", "O2")]
    assert not torch.equal(weights[0]["conv1.weight"], weights[1]["conv1.weight"]), \
        "O2's steps moved the weights"


def evaluate(checkpoint: Path, level: str, run_dir: Path) -> dict:
    proc = run_cli(*SMALL, f"amp={level}", "mode=eval", f"model.weights={checkpoint}",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(run_dir)


@pytest.mark.parametrize("trained_with, evaluated_with", [("O2", "O0"), ("O2", "O1"),
                                                          ("O0", "O2")])
def test_checkpoints_evaluate_under_another_level(trained: dict[str, Path], tmp_path: Path,
                                                  trained_with: str, evaluated_with: str):
    source = trained[trained_with]
    saved = torch.load(source / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in saved["model"].values() if v.is_floating_point())
    own = read_results(source)["final_acc1"]
    other = evaluate(source / "checkpoints" / "last.pt", evaluated_with, tmp_path)
    assert other["val_samples"] == 100
    # Same weights, same images: only the arithmetic's precision differs.
    assert abs(other["final_acc1"] - own) <= 5.0, (own, other)


def test_an_o0_checkpoint_resumes_under_o2(tmp_path: Path):
    short = [*SMALL, *FEW_STEPS, "dataset.val_size=32"]
    assert run_cli(*short, "amp=O0", f"hydra.run.dir={tmp_path / 'o0'}").returncode == 0
    last = tmp_path / "o0" / "checkpoints" / "last.pt"
    proc = run_cli(*short, "amp=O2", "train.epochs=2", f"train.resume={last}",
                   f"hydra.run.dir={tmp_path / 'o2'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_results(tmp_path / "o2")["status"] == "completed"
    before, after = (torch.load(path, weights_only=True)
                     for path in (last, tmp_path / "o2" / "checkpoints" / "last.pt"))
    assert len(after["state"]["history"]) == 2 and after["state"]["global_step"] == 4
    assert after["model"]["conv1.weight"].dtype == torch.float32  # O2's fp32 masters
    assert not torch.equal(before["model"]["conv1.weight"], after["model"]["conv1.weight"])


def test_o2_fine_tuning_a_frozen_backbone_keeps_its_exact_fp32_values_in_the_ema(tmp_path: Path):
    """amp=O2 model.freeze=backbone with an EMA updated every step past the warm-up: the EMA
    averages each frozen tensor's fp32 value, not its rounded bfloat16 copy, so it stays the
    file's value bit for bit (and the average's second update finds matching dtypes)."""
    model = build_model("resnet18", 10)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.normal_()  # statistics bfloat16 would round too
        norm.running_var.uniform_(0.5, 2.0)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": source}, tmp_path / "pretrained.pt")
    # Two steps of 4 images at 16 px: bfloat16 convolutions are slow on CPUs without native ones.
    proc = run_cli(*SMALL, *FEW_STEPS, "dataset.train_size=8", "train.batch_size=4",
                   "dataset.val_size=4", "dataset.image_size=16", "amp=O2",
                   "model.freeze=backbone", "ema.decay=0.9", "ema.steps=1",
                   f"model.weights={tmp_path / 'pretrained.pt'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert int(saved["model_ema"]["n_averaged"]) == 2  # a copy, then an average
    frozen = [key for key in source if not key.startswith("fc.")]
    assert any(not torch.equal(source[key], source[key].bfloat16().float()) for key in frozen)
    for key in frozen:
        assert torch.equal(saved["model_ema"][f"module.{key}"], source[key]), key
        assert torch.equal(saved["model"][key], source[key]), key
    assert not torch.equal(saved["model_ema"]["module.fc.weight"], source["fc.weight"])
