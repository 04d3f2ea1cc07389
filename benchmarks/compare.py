"""imgtrain against the references in ../shared/reference/, side by side, in one session.

Two comparisons, each a ratio (imgtrain / reference) measured in interleaved rounds so that load
from other processes hits both sides alike; the table reports the median of the per-round ratios.

- step time: `python run.py dataset=synthetic` training images/sec against bare_loop.py, on the
  same arch, image size, batch, class count and device: fp32 on the CPU; with `--device gpu|npu`,
  ResNet-50 and ResNet-152 at 224 px with float16 autocast (amp=O1) and channels_last on both
  sides, on the accelerator.
- loader: `python run.py mode=bench_data` on a folder of ImageNet-sized JPEGs (500x375, quality
  90, about 100 KB each) against loader_baseline.py, with the same worker count and batch size.

The loader comparison is host work and always runs with device=cpu.

usage: python benchmarks/compare.py [--rounds 3] [--quick] [--device cpu|gpu|npu] [--reference-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = REPO.parent / "shared" / "reference"
# The two step-time shapes: (arch, image size, batch, timed steps). A resnet18 step is
# about 4x shorter, so it gets more steps: each timed window lasts several seconds.
STEP_SHAPES = [("resnet18", 32, 64, 60), ("resnet50", 64, 32, 20)]
# On an accelerator: the shapes the recipe trains, in mixed precision with channels_last.
ACCELERATOR_SHAPES = [("resnet50", 224, 256, 40), ("resnet152", 224, 128, 30)]
ACCELERATOR_WARMUP = 10
# imgtrain's device names -> torch's, as bare_loop.py takes them
TORCH_DEVICE = {"cpu": "cpu", "gpu": "cuda", "npu": "npu"}
LOADER_WORKERS = [1, 2]


@dataclass
class Sizes:
    warmup_steps: int = 3
    jpeg_classes: int = 4
    jpegs_per_class: int = 128
    jpeg_width: int = 500
    jpeg_height: int = 375
    loader_batch: int = 64
    loader_image_size: int = 224
    loader_epochs: int = 2


QUICK = Sizes(warmup_steps=1, jpeg_classes=2, jpegs_per_class=4, jpeg_width=80,
              jpeg_height=60, loader_batch=4, loader_image_size=32, loader_epochs=1)


def make_jpegs(root: Path, sizes: Sizes, seed: int = 0) -> Path:
    """Photo-like JPEGs (smooth colour fields, texture and sensor-like noise) at quality 90.

    The noise level is chosen so files weigh about what ImageNet's do at this size (~100 KB for
    500x375): the entropy decoder's work, which dominates decoding, scales with the bytes.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:sizes.jpeg_height, 0:sizes.jpeg_width].astype(np.float32)
    for split, count in (("train", sizes.jpegs_per_class), ("val", 1)):
        for label in range(sizes.jpeg_classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                phase = rng.uniform(0, 6.3, 3)
                base = np.stack([128 + 100 * np.sin(x / (20 + 7 * label) + phase[0]),
                                 128 + 100 * np.cos(y / (15 + i % 9) + phase[1]),
                                 128 + 60 * np.sin((x + y) / 33 + phase[2])], axis=-1)
                pixels = base + rng.normal(0, 18, base.shape)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                    folder / f"img_{i}.JPEG", quality=90)
    return root


def run_json(command: list[str]) -> dict:
    """Run a command; return the last JSON line it printed."""
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def imgtrain_run(overrides: list[str], out: Path, device: str = "cpu") -> dict:
    command = [sys.executable, str(REPO / "run.py"), f"device={device}", *overrides,
               f"hydra.run.dir={out}"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads((out / "results.json").read_text())


def step_pair(arch: str, size: int, batch: int, timed_steps: int, sizes: Sizes, reference: Path,
              out: Path, device: str = "cpu") -> tuple[float, float]:
    """(bare loop, imgtrain) training images/sec, each timed after the same number of warm-up steps."""
    accelerator = device != "cpu"
    warmup = max(sizes.warmup_steps, ACCELERATOR_WARMUP) if accelerator else sizes.warmup_steps
    like = ["--amp", "fp16", "--channels-last"] if accelerator else []
    bare = run_json([sys.executable, str(reference / "bare_loop.py"), "--arch", arch,
                     "--image-size", str(size), "--batch-size", str(batch), "--num-classes", "10",
                     "--steps", str(timed_steps), "--warmup", str(warmup),
                     "--device", TORCH_DEVICE[device], *like])
    steps = warmup + timed_steps
    precision = ["amp=O1", "model.channels_last=true"] if accelerator else ["amp=O0"]
    ours = imgtrain_run([
        "dataset=synthetic", f"model={arch}", *precision, f"dataset.image_size={size}",
        f"train.batch_size={batch}", "dataset.num_classes=10", f"dataset.train_size={batch * steps}",
        f"dataset.val_size={batch}", "train.epochs=1", f"train.steps_per_epoch={steps}",
        f"train.fps_warmup_steps={warmup}"], out, device)
    return bare["images_per_sec"], ours["images_per_sec"]


def loader_pair(root: Path, workers: int, sizes: Sizes, reference: Path,
                out: Path) -> tuple[float, float]:
    """(reference, imgtrain) loader images/sec over the same number of images."""
    ref = run_json([sys.executable, str(reference / "loader_baseline.py"), str(root),
                    "--workers", str(workers), "--batch-size", str(sizes.loader_batch),
                    "--image-size", str(sizes.loader_image_size),
                    "--epochs", str(sizes.loader_epochs)])
    batches = sizes.loader_epochs * sizes.jpeg_classes * sizes.jpegs_per_class // sizes.loader_batch
    ours = imgtrain_run([
        "mode=bench_data", "dataset=imagenet", f"dataset.root={root}",
        f"dataset.image_size={sizes.loader_image_size}", f"dataset.workers={workers}",
        f"train.batch_size={sizes.loader_batch}", f"train.steps_per_epoch={batches}",
        "train.fps_warmup_steps=2"], out)
    return ref["images_per_sec"], ours["loader_images_per_sec"]


@dataclass
class Row:
    name: str
    reference: list[float]
    ours: list[float]
    target: float

    @property
    def ratios(self) -> list[float]:
        return [o / r for r, o in zip(self.reference, self.ours)]

    def markdown(self) -> str:
        ratio = statistics.median(self.ratios)
        spread = f"{min(self.ratios):.2f}-{max(self.ratios):.2f}"
        verdict = "yes" if ratio >= self.target else "no"
        return (f"| {self.name} | {statistics.median(self.reference):.1f} | "
                f"{statistics.median(self.ours):.1f} | **{ratio:.2f}x** | {spread} | "
                f">= {self.target:.2f}x | {verdict} |")


def measure(rounds: int, sizes: Sizes, reference: Path, work: Path, quick: bool,
            device: str = "cpu") -> list[Row]:
    """Every comparison once per round, rounds interleaved, so slow spells hit all pairs alike."""
    shapes = STEP_SHAPES if device == "cpu" else ACCELERATOR_SHAPES
    loader_workers = LOADER_WORKERS
    if quick:  # one of each kind, tiny: the script runs end to end, nothing is measured
        shapes, loader_workers = [(arch, 32, 4, 2) for arch, *_ in shapes[:1]], [1]
    rows = {**{f"step {a} {s}px batch {b}": Row(f"step: {a}, {s} px, batch {b} (vs bare_loop)",
                                                 [], [], 0.97) for a, s, b, _ in shapes},
            **{f"loader {w}": Row(f"loader: {w} worker{'s' * (w > 1)}, batch "
                                  f"{sizes.loader_batch} (vs loader_baseline)", [], [], 2.0)
               for w in loader_workers}}
    root = make_jpegs(work / "jpegs", sizes)
    started = time.perf_counter()
    for round_index in range(rounds):
        for arch, size, batch, timed_steps in shapes:
            pair = step_pair(arch, size, batch, timed_steps, sizes, reference,
                             work / f"run-{round_index}-{arch}", device)
            _record(rows[f"step {arch} {size}px batch {batch}"], pair, round_index)
        for workers in loader_workers:
            pair = loader_pair(root, workers, sizes, reference, work / f"data-{round_index}-{workers}")
            _record(rows[f"loader {workers}"], pair, round_index)
        # The table so far, so an interrupted session still has its medians.
        print(table(list(rows.values()), round_index + 1, time.perf_counter() - started, device),
              file=sys.stderr, flush=True)
    return list(rows.values())


def _record(row: Row, pair: tuple[float, float], round_index: int) -> None:
    row.reference.append(pair[0])
    row.ours.append(pair[1])
    print(f"round {round_index + 1}: {row.name}: reference {pair[0]:.1f}, imgtrain {pair[1]:.1f} "
          f"img/s ({pair[1] / pair[0]:.2f}x)", file=sys.stderr, flush=True)


def device_present(device: str) -> bool:
    """Whether this host can run the device (the npu check imports torch_npu, as imgtrain does)."""
    if device == "cpu":
        return True
    sys.path.insert(0, str(REPO / "src"))
    from imgtrain.device import resolve_name
    from imgtrain.errors import ConfigError
    try:
        return resolve_name(device) == device
    except ConfigError:
        return False


def device_name(device: str) -> str:
    if device == "cpu":
        return f"{platform.processor() or platform.machine()}, {_cores()} cores"
    import torch
    return getattr(torch, TORCH_DEVICE[device]).get_device_name(0)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def table(rows: list[Row], rounds: int, seconds: float, device: str = "cpu") -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = [f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {device_name(device)}, "
              f"torch {_torch_version()}; {rounds} interleaved rounds in "
              f"{seconds / 60:.1f} min; load average at the end {load:.1f}",
              "",
              "| comparison | reference img/s | imgtrain img/s | ratio (median) | ratio range | "
              "target | met |",
              "|---|---|---|---|---|---|---|"]
    return "\n".join(header + [row.markdown() for row in rows])


def _torch_version() -> str:
    import torch
    return torch.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--reference-dir", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--device", choices=sorted(TORCH_DEVICE), default="cpu",
                        help="where the step-time pairs run (the loader pairs stay on the CPU)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    if not device_present(args.device):
        sys.exit(f"compare.py: --device {args.device} but no {args.device.upper()} is visible "
                 "here; run it on a host with one, or use --device cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgtrain-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        rows = measure(args.rounds, sizes, args.reference_dir, work, args.quick, args.device)
    print(table(rows, args.rounds, time.perf_counter() - started, args.device))


if __name__ == "__main__":
    main()
