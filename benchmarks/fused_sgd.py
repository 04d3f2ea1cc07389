"""Fused against plain SGD on the CPU: final val Acc@1 over several seeds each way (#26.9).

The task is small but made of real images: a generated ImageFolder of JPEG files (10 shape
classes: disc, ring, square, frame, triangle, cross, stripes three ways, checkerboard), each shape
at a random place and size, in a colour near its class's over a random background, plus noise.
Each run is `python run.py` with the seed's recipe otherwise
(amp=O2 unless --amp says otherwise: bfloat16 without a loss scale on the CPU; SGD 0.9 / 1e-4,
cosine):

    dataset=imagenet dataset.image_size=32 model=resnet18 train.batch_size=64 optim.lr=0.1
    sched.warmup_epochs=1 train.epochs=E train.seed=S optim.fused=true|false

one thread each, `--parallel` at a time, fused and plain interleaved so that load from other
processes hits both alike. Prints a Markdown table (each seed, mean ± sd) to stdout.

usage: python benchmarks/fused_sgd.py [--seeds 5] [--epochs 10] [--per-class 128]
                                      [--parallel 2] [--amp O2] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHAPES = ["disc", "ring", "square", "frame", "triangle", "cross", "hstripes", "vstripes",
          "dstripes", "checker"]


def shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of one shape at a random centre and radius inside a size x size image."""
    radius = rng.uniform(0.22, 0.4) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = y - cy, x - cx
    inside = (np.abs(dy) < radius) & (np.abs(dx) < radius)
    period = rng.uniform(3.0, 6.0)
    masks = {
        "disc": dy ** 2 + dx ** 2 < radius ** 2,
        "ring": np.abs(np.sqrt(dy ** 2 + dx ** 2) - 0.75 * radius) < 0.22 * radius,
        "square": (np.abs(dy) < 0.8 * radius) & (np.abs(dx) < 0.8 * radius),
        "frame": inside & ~((np.abs(dy) < 0.55 * radius) & (np.abs(dx) < 0.55 * radius)),
        "triangle": (dy < radius * 0.8) & (dy > -radius) & (np.abs(dx) < (dy + radius) * 0.55),
        "cross": inside & ((np.abs(dy) < 0.25 * radius) | (np.abs(dx) < 0.25 * radius)),
        "hstripes": inside & ((y // period) % 2 == 0),
        "vstripes": inside & ((x // period) % 2 == 0),
        "dstripes": inside & (((x + y) // period) % 2 == 0),
        "checker": inside & (((x // period) + (y // period)) % 2 == 0),
    }
    return masks[kind]


def shape_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    mask = shape_mask(SHAPES[label], size, rng)
    # The shape's colour leans to its class's (a hint that survives crops, as in the tests'
    # images) but varies; the background is any colour far enough from it.
    hint = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 181 + 160) % 256])
    foreground = (hint + rng.normal(0, 40, 3)).clip(0, 255)
    background = rng.uniform(0, 255, 3)
    while np.abs(background - foreground).sum() < 150:  # keep the shape visible
        background = rng.uniform(0, 255, 3)
    pixels = np.where(mask[..., None], foreground, background)
    pixels = pixels + rng.normal(0, 25, pixels.shape)
    return pixels.clip(0, 255).astype(np.uint8)


def make_dataset(root: Path, per_class: int, val_per_class: int, size: int = 40) -> Path:
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label, name in enumerate(SHAPES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(shape_image(label, size, rng)).save(folder / f"{i}.JPEG",
                                                                    quality=90)
    (root / "done").write_text("")
    return root


def command(data: Path, run_dir: Path, seed: int, fused: bool, epochs: int,
            amp: str) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), "device=cpu", f"amp={amp}", "dataset=imagenet",
            f"dataset.root={data}", "dataset.image_size=32", "dataset.workers=0",
            "model=resnet18", "train.batch_size=64", "optim.lr=0.1", "sched.warmup_epochs=1",
            f"train.epochs={epochs}", f"train.seed={seed}", f"optim.fused={str(fused).lower()}",
            "train.save_checkpoints=false", "train.print_freq=1000", f"hydra.run.dir={run_dir}"]


def run_all(args: argparse.Namespace, data: Path) -> dict[tuple[bool, int], dict]:
    jobs = [(fused, seed) for seed in range(1, args.seeds + 1) for fused in (True, False)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    running: list[tuple[tuple[bool, int], subprocess.Popen]] = []
    results: dict[tuple[bool, int], dict] = {}
    while jobs or running:
        while jobs and len(running) < args.parallel:
            fused, seed = jobs.pop(0)
            run_dir = args.out / f"{'fused' if fused else 'plain'}_seed{seed}"
            log = open(args.out / f"{run_dir.name}.log", "w")
            proc = subprocess.Popen(command(data, run_dir, seed, fused, args.epochs, args.amp),
                                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=args.out)
            running.append(((fused, seed), proc))
        time.sleep(2)
        for job in [job for job in running if job[1].poll() is not None]:
            running.remove(job)
            key, proc = job
            name = f"{'fused' if key[0] else 'plain'}_seed{key[1]}"
            path = args.out / name / "results.json"
            results[key] = json.loads(path.read_text()) if path.exists() else {}
            acc = results[key].get("final_acc1")
            print(f"{name}: rc {proc.returncode}, final acc1 {acc}", file=sys.stderr, flush=True)
    return results


def table(results: dict[tuple[bool, int], dict], seeds: int) -> str:
    lines = ["| optim.fused | " + " | ".join(f"seed {s}" for s in range(1, seeds + 1))
             + " | mean ± sd | epoch-1 val loss (median) |",
             "|---|" + "---|" * (seeds + 2)]
    for fused in (True, False):
        runs = [results.get((fused, s), {}) for s in range(1, seeds + 1)]
        accs = [r.get("final_acc1") for r in runs]
        done = [a for a in accs if a is not None]
        first_losses = [r["history"][0].get("loss") for r in runs if r.get("history")]
        spread = (f"**{statistics.mean(done):.1f} ± {statistics.stdev(done):.1f}**"
                  if len(done) > 1 else "-")
        loss = f"{statistics.median(first_losses):.3g}" if first_losses else "-"
        lines.append(f"| {str(fused).lower()} | "
                     + " | ".join("failed" if a is None else f"{a:.1f}" for a in accs)
                     + f" | {spread} | {loss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=128)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--amp", default="O2", choices=["O0", "O1", "O2"])  # O2: the default
    parser.add_argument("--out", type=Path, default=Path("outputs/fused_sgd"))
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_dataset(args.out / "shapes", args.per_class, args.val_per_class)
    started = time.time()
    results = run_all(args, data)
    machine = platform.processor() or platform.machine()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}, "
          f"torch {__import__('torch').__version__}, amp={args.amp}, {args.seeds} seeds, "
          f"{args.epochs} epochs, "
          f"{args.per_class * 10} training images, {time.time() - started:.0f} s")
    print(table(results, args.seeds))


if __name__ == "__main__":
    main()
