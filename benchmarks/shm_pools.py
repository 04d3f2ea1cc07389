"""The /dev/shm that the batch pools hold, measured against what the check asks for.

Builds imgtrain's loaders for a generated JPEG folder (data.build_loaders, dataset.workers
processes with persistent workers and dataset.reuse_batch_memory), runs `--passes` passes over
the training loader and the validation loader, holding each batch `--step-seconds` as a training
step does (the workers run ahead and fill their prefetch), and then sums the shared-memory segments each
loader worker still maps (its /proc/<pid>/maps: torch's segments are /dev/shm files unlinked
at once, so `df` would count other processes' too). Prints that beside data.shm_per_process, the
figure the /dev/shm check asks for, and the old worst case.

    PYTHONPATH=src python benchmarks/shm_pools.py [--image-size 224] [--batch 32] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _make_folder(root: Path, classes: int, train: int, val: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=90)
    return root


def _worker_segments(pid: int) -> dict[tuple[str, int], int]:
    """(device, inode) -> bytes of each shared-memory file `pid` maps."""
    segments: dict[tuple[str, int], int] = {}
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or "/dev/shm/" not in fields[5]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            key = (fields[3], int(fields[4]))
            segments[key] = segments.get(key, 0) + end - start
    return segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--val-crop", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--step-seconds", type=float, default=0.3,
                        help="how long the consumer holds each batch (a training step), so that "
                             "the workers run ahead and fill their prefetch")
    parser.add_argument("--train-images", type=int, default=24, help="per class, 4 classes")
    parser.add_argument("--val-images", type=int, default=10, help="per class, 4 classes")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from imgtrain.data import build_loaders, shm_per_process
    from imgtrain.distributed import World
    from imgtrain.resolve import resolve

    with tempfile.TemporaryDirectory() as tmp:
        root = _make_folder(Path(tmp), 4, args.train_images, args.val_images, args.image_size)
        overrides = ["dataset=imagenet", f"dataset.root={root}", "device=cpu",
                     f"dataset.image_size={args.image_size}", f"dataset.workers={args.workers}",
                     f"dataset.prefetch_factor={args.prefetch}", "dataset.reuse_batch_memory=true",
                     f"train.batch_size={args.batch}", "train.memory_check=false"]
        if args.val_crop:
            overrides.append(f"dataset.val_crop_size={args.val_crop}")
        if args.eval_batch:
            overrides.append(f"eval.batch_size={args.eval_batch}")
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            plan = resolve(compose("config", overrides=overrides), [])
        world = World(rank=0, local_rank=0, world_size=1, local_world_size=1)
        loaders = build_loaders(plan, world, accelerator=False)
        measured = {}
        for name, loader in (("train", loaders.train), ("val", loaders.val)):
            for _ in range(args.passes):
                for batch in loader:
                    time.sleep(args.step_seconds)
                    del batch
            pids = [worker.pid for worker in loader._iterator._workers]
            measured[name] = sum(sum(_worker_segments(pid).values()) for pid in pids)
        asked = shm_per_process(plan, args.workers, loaders.train_sampler,
                                loaders.val.sampler)
        size = max(args.image_size, plan.val_crop_size)
        worst = (2 * args.prefetch + 1) * args.workers * plan.batches.micro * (
            3 * size * size + 8) * 2
        print(f"pid {os.getpid()}: {args.workers} workers, prefetch {args.prefetch}, batch "
              f"{plan.batches.micro} at {args.image_size} px, val batch "
              f"{plan.batches.val_per_rank} at {plan.val_crop_size} px, {args.passes} passes")
        print(f"  mapped by the workers: train {measured['train']:,} B, val {measured['val']:,} B,"
              f" total {sum(measured.values()):,} B")
        print(f"  the check asks for:    {asked:,} B")
        print(f"  the old worst case:    {worst:,} B")


if __name__ == "__main__":
    main()
