"""The one-screen summaries rank 0 prints when a run starts and when it ends."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgtrain.config import SchedConfig
from imgtrain.data import describe, describe_augmentation
from imgtrain.data.resolution import describe as describe_sizes
from imgtrain.eta import duration
from imgtrain.models import STEM_NAMES
from imgtrain.wrap import KEY_COLUMN

if TYPE_CHECKING:
    from imgtrain.plan import RunPlan


def _precision(precision: Any) -> str:
    dtype = str(precision.dtype).replace("torch.", "") if precision.dtype else "float32"
    if precision.scaler is None:
        scale = "no loss scaling"
    elif precision.static_scale is not None:
        scale = f"static loss scale {precision.static_scale:g}"
    else:
        scale = "dynamic loss scale"
    return f"amp={precision.level} ({dtype}), {scale}"


WIDTH = 80  # the summaries' lines fit a terminal of this width (and stay greppable in train.log)
INDENT = " " * KEY_COLUMN  # a wrapped value goes on under its value, past the key's column


def counted(number: float, noun: str) -> str:
    """`1 epoch`, `1,200 steps`, `1.5 warm-up epochs`: a whole float is written as an int."""
    text = f"{int(number):,}" if number == int(number) else f"{number:g}"
    return f"{text} {noun}{'s' * (number != 1)}"


def _schedule(sched: SchedConfig) -> str:
    warmup = sched.warmup_epochs or 0
    return f"{sched.name}" + (f" after {counted(warmup, 'warm-up epoch')}" if warmup else "")


def _lr(plan: RunPlan) -> str:
    rule, lr = plan.lr_rule, plan.optim.lr
    return f"{lr:g} ({rule})" if rule.startswith("set by") else f"{lr:g} = {rule}"


def fitted(lines: list[str], width: int = WIDTH) -> list[str]:
    """Each `  key        value` line wrapped at spaces to `width` columns, continued under its
    value; a word longer than the line (a path) stays whole, beside its key: files keep it
    whole, and a terminal's console breaks it at path boundaries (wrap.py)."""
    out = []
    for line in lines:
        head = len(INDENT) if line.startswith("  ") else 0  # the key's column is not split
        words = line[head:].split(" ")
        current = line[:head] + words[0]
        for word in words[1:]:
            if len(current) + 1 + len(word) > width:
                out.append(current)
                current = INDENT + word
            else:
                current += " " + word
        out.append(current)
    return out


def _frozen(plan: RunPlan, model: Any) -> list[str]:
    """model.freeze=backbone: what stays fixed and what trains, counted."""
    if plan.model.freeze == "none":
        return []
    counts = {True: 0, False: 0}
    for param in model.parameters():
        counts[param.requires_grad] += param.numel()
    return [f"  frozen     backbone ({counts[False]:,} parameters), training: fc "
            f"({counts[True]:,} parameters)"]


def _ranks_note(world_size: int) -> list[str]:
    """Print points read rank 0's own numbers (no collective for the console): say so."""
    if world_size == 1:
        return []
    return [f"  console    print-point loss and acc1: rank 0's; epoch lines: all {world_size} "
            "processes'"]


def _per_device(plan: RunPlan) -> str:
    batches = plan.batches
    per_device, micro_steps = batches.per_rank, batches.accumulate_steps
    if micro_steps == 1:
        return f"{per_device} per device"
    return f"{per_device} per device in {micro_steps} micro-steps of {batches.micro}"


def _sizes(plan: RunPlan) -> str:
    """`224 px`; under dataset.res_schedule the training sizes by epoch, then validation's."""
    if not plan.scheduled_sizes:
        return f"{plan.dataset.image_size} px"
    val = (f"val {plan.val_crop_size} px (resize {plan.val_resize_size})"
           if plan.dataset.name == "imagenet" else f"val {plan.dataset.image_size} px")
    return f"{describe_sizes(plan.train_sizes, scheduled=True)}; {val}"


def recipe(plan: RunPlan, trainer: Any) -> str:
    """The ingredients beyond the seed's recipe that this run turns on; empty when none."""
    train, optim = plan.train, plan.optim  # the data's ingredients: the augment line
    on = [f"label smoothing {train.label_smoothing:g}"] if train.label_smoothing else []
    on += [f"{kind} weight decay {decay:g}" for kind, decay in (
        ("norm", optim.norm_weight_decay), ("bias", optim.bias_weight_decay)) if decay is not None]
    if plan.model.zero_init_residual:
        on.append("zero-init residual")
    if train.clip_grad_norm is not None:
        on.append(f"grad norm clipped at {train.clip_grad_norm:g}")
    if trainer.ema is not None:
        on.append(f"EMA every {trainer.ema.every_steps} steps, decay {plan.ema.decay:g} "
                  f"({trainer.ema.decay:.6f} per update)")
    return ", ".join(on)


def start_lines(plan: RunPlan, trainer: Any, output_dir: Path,
                resumed_from: Path | None) -> list[str]:
    """arch, data, device and world, precision, batch and lr, length, run folder, resume."""
    data, train, arch, world_size = plan.dataset, plan.train, plan.model.arch, plan.world_size
    loaders, state = trainer.loaders, trainer.state
    params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
    total_steps = train.epochs * trainer.steps_per_epoch
    ingredients = recipe(plan, trainer)
    if resumed_from is None:
        resume = "no: a new run"
    else:
        why = plan.launch.run_dir_reason
        resume = (f"resumed from epoch {state.epoch + 1} step {state.step_in_epoch} (restart "
                  f"{state.restarts}), {state.global_step} of {total_steps} steps done: "
                  + (f"{output_dir}, {why}" if why else str(resumed_from)))
    return fitted([
        f"imgtrain: {plan.mode} {arch} on {describe(data, with_root=False)}",
        f"  model      {arch}, {STEM_NAMES[plan.model.stem]}, {params:.1f} M parameters",
        *_frozen(plan, trainer.model),
        f"  data       {describe(data)}: {len(loaders.train.dataset):,} train / "
        f"{len(loaders.val.dataset):,} val images, {plan.num_classes} classes, "
        f"{_sizes(plan)}",
        f"  device     {trainer.device.device_string} x {world_size} "
        f"process{'es' * (world_size > 1)} ({trainer.device.backend})",
        f"  precision  {_precision(trainer.precision)}",
        f"  batch      {plan.batches.global_batch} global ({_per_device(plan)})",
        f"  lr         {_lr(plan)}",
        f"  schedule   {_schedule(plan.sched)}",
        f"  length     {counted(train.epochs, 'epoch')} x "
        f"{counted(trainer.steps_per_epoch, 'step')} = {counted(total_steps, 'step')}",
        f"  augment    {describe_augmentation(data)}",
        *([f"  recipe     {ingredients}"] if ingredients else []),
        *_ranks_note(world_size),
        f"  run dir    {output_dir}",
        f"  resume     {resume}",
    ])


def epoch_done_line(epoch: int, train: dict[str, Any], val: dict[str, Any]) -> str:
    """`epoch N done: ...`: the finished epoch's (0-based `epoch`) training and validation, the
    EMA's where there is one."""
    ema = (f" | ema acc1 {val['ema_acc1']:.3f} acc5 {val['ema_acc5']:.3f}"
           if "ema_acc1" in val else "")
    return (f"epoch {epoch + 1} done: train loss {train['loss']:.4f} acc1 {train['acc1']:.2f} | "
            f"val loss {val['loss']:.4f} acc1 {val['acc1']:.3f} acc5 {val['acc5']:.3f} "
            f"({val['samples']} images){ema} | {train['images_per_sec']:.1f} img/s at "
            f"{train['image_size']} px")


def _by_size(results: dict[str, Any]) -> str:
    """` (160 px 812.0, 192 px 560.3)` where the run trained at more than one size."""
    by_size = results.get("throughput_by_size") or {}
    if len(by_size) < 2:
        return ""
    return " (" + ", ".join(f"{size} px {rate:.1f}" for size, rate in by_size.items()) + ")"


def end_lines(results: dict[str, Any], wall_seconds: float, output_dir: Path) -> list[str]:
    """Best and final Acc@1, img/s, wall time, and where results and the best weights are."""
    history = results.get("history") or []
    best_epoch = max(history, key=lambda row: row["acc1"])["epoch"] if history else None
    best = output_dir / "checkpoints" / "best.pt"
    lines = [
        f"done in {duration(wall_seconds)}: best acc1 {results['best_acc1']:.3f}"
        + (f" (epoch {best_epoch})" if best_epoch else "")
        + f", final acc1 {results['final_acc1']:.3f} acc5 {results['final_acc5']:.3f}",
        f"  speed      {results['images_per_sec']:.1f} img/s{_by_size(results)}",
        f"  results    {output_dir / 'results.json'}",
    ]
    if best.exists():
        lines.append(f"  best       {best}")
    return fitted(lines)
