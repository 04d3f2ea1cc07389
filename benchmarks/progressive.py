"""Progressive resizing (dataset.res_schedule, #31): what a lower training size saves, and what a
schedule costs in accuracy, measured with `python run.py` as a user runs it.

- `throughput`: training images/sec of one model at several sizes (ResNet-50 at 160, 192 and
  224 px by default) on synthetic data, in interleaved rounds (each round runs every size once,
  in a rotated order, so a slow spell on a shared machine hits every size alike); the table
  gives the median per size and its speed relative to the largest.
- `schedule`: a small real data set made here (JPEG shapes: 8 classes, drawn at random sizes,
  places and colours on noisy backgrounds), trained at a fixed full size and with a
  progressive schedule up to it, side by side with the same seed: Acc@1 and wall time.

usage:
  python benchmarks/progressive.py throughput [--arch resnet50] [--sizes 160 192 224]
                                              [--batch 2] [--steps 1] [--rounds 3]
  python benchmarks/progressive.py schedule [--epochs 5] [--seeds 1] [--size 48]
                                            [--schedule "{start:32,end:48,...}"]

The defaults are small on purpose: the machine they were written on is a 2-core VM shared by
eight engineers' test runs. Raise them where a machine is yours.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("disc", "ring", "square", "frame", "triangle", "diamond", "cross", "bar")


def run(overrides: list[str], out: Path) -> tuple[dict, float]:
    """`python run.py ...` on the CPU; (its results.json, its wall seconds)."""
    command = [sys.executable, str(REPO / "run.py"), "device=cpu", *overrides,
               f"hydra.run.dir={out}"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    return json.loads((out / "results.json").read_text()), wall


def machine() -> str:
    import torch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
            f"{platform.processor() or platform.machine()}, {cores} cores, torch "
            f"{torch.__version__}; load average {load:.1f}")


# ---- throughput --------------------------------------------------------------------------
def throughput(args: argparse.Namespace, work: Path) -> str:
    """One process, one Trainer per size (imgtrain's own, built as the worker builds it), their
    epochs interleaved: round r trains epoch r of every size, each `warmup` untimed steps then
    `steps` timed ones (the epoch's images/sec, as results.json reports it), the sizes' order
    rotated every round. A process per run would spend minutes importing on a loaded machine,
    and a slow spell lands on one step of every size rather than on one size's run."""
    sys.path.insert(0, str(REPO / "src"))
    import torch
    from hydra import compose, initialize_config_dir

    from imgtrain.assembly import build_trainer
    from imgtrain.config import register
    from imgtrain.logger import NullLogger
    from imgtrain.resolve import resolve

    register()
    trainers = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for size in args.sizes:
            steps = args.warmup + args.steps
            overrides = [
                "dataset=synthetic", f"model={args.arch}", "amp=O0", "device=cpu",
                f"dataset.image_size={size}", f"train.batch_size={args.batch}",
                "dataset.num_classes=10", f"dataset.train_size={args.batch * steps}",
                f"dataset.val_size={args.batch}", f"train.epochs={args.rounds}",
                f"train.steps_per_epoch={steps}", f"train.fps_warmup_steps={args.warmup}",
                "train.save_checkpoints=false", "train.memory_check=false", "dataset.workers=0"]
            torch.manual_seed(0)
            trainers[size] = build_trainer(resolve(compose("config", overrides=overrides), []),
                                           work / f"size-{size}", logger=NullLogger())
    rates: dict[int, list[float]] = {size: [] for size in args.sizes}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        shift = round_index % len(args.sizes)
        for size in args.sizes[shift:] + args.sizes[:shift]:
            trainer = trainers[size]
            rate = trainer.train_epoch(round_index)["images_per_sec"]
            trainer.state.epoch, trainer.state.step_in_epoch = round_index + 1, 0
            rates[size].append(rate)
            print(f"round {round_index + 1}: {args.arch} {size} px: {rate:.3f} img/s",
                  file=sys.stderr, flush=True)
    largest = statistics.median(rates[max(args.sizes)])
    lines = [f"{machine()}; {args.rounds} interleaved rounds in "
             f"{(time.perf_counter() - started) / 60:.1f} min; {args.arch}, fp32, batch "
             f"{args.batch}, {args.steps} timed steps after {args.warmup} warm-up a round; "
             f"{torch.get_num_threads()} threads",
             "", f"| size | images/s (median) | range | vs {max(args.sizes)} px | pixels vs "
             f"{max(args.sizes)} px |", "|---|---|---|---|---|"]
    for size in args.sizes:
        median = statistics.median(rates[size])
        lines.append(f"| {size} px | {median:.3f} | {min(rates[size]):.3f}-"
                     f"{max(rates[size]):.3f} | {median / largest:.2f}x | "
                     f"{(size / max(args.sizes)) ** 2:.2f} |")
    return "\n".join(lines)


# ---- schedule ----------------------------------------------------------------------------
def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
           angle: float, colour: tuple[int, int, int], width: int) -> None:
    def polygon(corners: int, start: float) -> list[tuple[float, float]]:
        return [(cx + r * math.cos(start + angle + 2 * math.pi * k / corners),
                 cy + r * math.sin(start + angle + 2 * math.pi * k / corners))
                for k in range(corners)]

    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "disc":
        draw.ellipse(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=width)
    elif kind == "square":
        draw.polygon(polygon(4, math.pi / 4), fill=colour)
    elif kind == "frame":
        draw.polygon(polygon(4, math.pi / 4), outline=colour, width=width)
    elif kind == "triangle":
        draw.polygon(polygon(3, -math.pi / 2), fill=colour)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)],
                     fill=colour)
    elif kind == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=width)
    else:  # bar: one thick stroke
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=2 * width)


def make_shapes(root: Path, per_class: int, val_per_class: int, size: int, seed: int = 0,
                classes: int = len(SHAPES)) -> Path:
    """An ImageFolder of JPEGs: one shape per image, at a random size, place, angle and colour,
    on a noisy two-colour gradient; outlined and filled shapes are different classes, which
    takes some resolution to tell."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label, kind in enumerate(SHAPES[:classes]):
            folder = root / split / f"{label}_{kind}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
                mix = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1))[..., None] % 1.0
                background = a * (1 - mix) + b * mix + rng.normal(0, 20, (size, size, 3))
                image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
                colour = tuple(int(v) for v in (255 - (a + b) / 2 + rng.uniform(-40, 40, 3))
                               .clip(0, 255))
                r = size * rng.uniform(0.18, 0.36)
                cx, cy = rng.uniform(r, size - r, 2)
                _shape(ImageDraw.Draw(image), kind, cx, cy, r, rng.uniform(0, math.pi), colour,
                       max(2, int(size * 0.04)))
                image.save(folder / f"{i}.JPEG", quality=90)
    return root


def schedule(args: argparse.Namespace, work: Path) -> str:
    root = make_shapes(work / "shapes", args.per_class, args.val_per_class, args.file_size,
                       classes=args.classes)
    common = ["dataset=imagenet", f"dataset.root={root}", "model=resnet18", "amp=O0",
              f"dataset.image_size={args.size}", f"train.epochs={args.epochs}",
              f"train.batch_size={args.batch}", f"optim.lr={args.lr}", "sched.warmup_epochs=1",
              f"dataset.scale=[{args.scale[0]},{args.scale[1]}]",
              "dataset.workers=0", "train.save_checkpoints=false", "train.print_freq=1000"]
    setups = {f"fixed {args.size} px": [], "progressive": [f"dataset.res_schedule={args.schedule}"]}
    rows: dict[str, list[tuple[dict, float]]] = {name: [] for name in setups}
    for seed in range(args.seeds):
        # Alternate which goes first: a slow spell on a shared machine hits both alike.
        names = list(setups) if seed % 2 == 0 else list(reversed(setups))
        for name in names:
            out = work / f"{name.replace(' ', '-')}-{seed}"
            results, wall = run([*common, *setups[name], f"train.seed={seed}"], out)
            rows[name].append((results, wall))
            print(f"seed {seed}: {name}: acc1 {results['final_acc1']:.1f} (best "
                  f"{results['best_acc1']:.1f}), train {results['train_seconds']:.0f} s, wall "
                  f"{wall:.0f} s, {results['throughput_by_size']}", file=sys.stderr, flush=True)
    lines = [f"{machine()}; shapes ({', '.join(SHAPES[:args.classes])}) x {args.per_class} train / "
             f"{args.val_per_class} val, {args.file_size} px JPEGs; resnet18 fp32, "
             f"{args.epochs} epochs, batch {args.batch}, lr {args.lr}, crop scale "
             f"{args.scale[0]}-{args.scale[1]}; validation at "
             f"{args.size} px (resize {round(args.size / 0.875)}); seeds {args.seeds}",
             f"progressive: dataset.res_schedule={args.schedule}", "",
             "| setup | sizes trained | final Acc@1 | best Acc@1 | training s | wall s |",
             "|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        sizes = sorted({row["image_size"] for results, _ in runs for row in results["history"]})
        final = [results["final_acc1"] for results, _ in runs]
        best = [results["best_acc1"] for results, _ in runs]
        train = [results["train_seconds"] for results, _ in runs]
        wall = [w for _, w in runs]
        lines.append(f"| {name} | {', '.join(map(str, sizes))} | {_spread(final)} | "
                     f"{_spread(best)} | {_spread(train, 0)} | {_spread(wall, 0)} |")
    return "\n".join(lines)


def _spread(values: list[float], digits: int = 1) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = parser.add_subparsers(dest="part", required=True)
    speed = parts.add_parser("throughput", help="training images/s at several sizes")
    speed.add_argument("--arch", default="resnet50")
    speed.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    speed.add_argument("--batch", type=int, default=2)
    speed.add_argument("--steps", type=int, default=1, help="timed steps per round")
    speed.add_argument("--warmup", type=int, default=1)
    speed.add_argument("--rounds", type=int, default=3)
    accuracy = parts.add_parser("schedule", help="progressive vs fixed size on generated shapes")
    accuracy.add_argument("--epochs", type=int, default=5)
    accuracy.add_argument("--size", type=int, default=48, help="the full (and validation) size")
    accuracy.add_argument("--schedule", default="{start:32,end:48,start_ramp:1,end_ramp:3,step:8}")
    accuracy.add_argument("--per-class", type=int, default=40)
    accuracy.add_argument("--classes", type=int, default=len(SHAPES),
                          help="the first N shapes (4: disc, ring, square, frame)")
    accuracy.add_argument("--val-per-class", type=int, default=15)
    accuracy.add_argument("--file-size", type=int, default=64, help="the JPEGs' side")
    accuracy.add_argument("--batch", type=int, default=32)
    accuracy.add_argument("--lr", type=float, default=0.1)
    accuracy.add_argument("--scale", type=float, nargs=2, default=(0.35, 1.0),
                          metavar=("MIN", "MAX"), help="the crop's share of the image (dataset."
                          "scale; experiment=small_images's: ImageNet's 0.08 crops a shape away)")
    accuracy.add_argument("--seeds", type=int, default=1)
    for part in (speed, accuracy):
        part.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgtrain-progressive-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(throughput(args, work) if args.part == "throughput" else schedule(args, work))


if __name__ == "__main__":
    main()
