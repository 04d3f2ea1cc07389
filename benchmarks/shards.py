"""Packed shards against the ImageFolder they were packed from, side by side in one session (#30).

- system calls per image while loading: `strace -f -c` of a loader (1 worker, batch pool, as
  training runs it) over N1 and then N2 images; the difference over N2 - N1 images leaves out
  start-up (imports, worker start);
- loader images/s with 1 and 2 workers (imgtrain's own build_loaders and bench.time_loader, as
  mode=bench_data), folder and shards alternating within each round, which one first swapping
  every round, so that load from other processes hits both alike.

Data: compare.py's generated ImageNet-sized JPEGs (500x375, quality 90, ~100 KB), trained at
224 px, on local disk; both read from the page cache after the first round.

usage: python benchmarks/shards.py [--rounds 3] [--quick] [--work DIR]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from compare import QUICK, Sizes, make_jpegs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
FORMATS = ("folder", "shards")
WORKERS = (1, 2)
# Calls that touch the file system (on NFS or Lustre each is a round trip to a server).
FILE_CALLS = ("openat", "open", "newfstatat", "fstat", "statx", "lseek", "read", "pread64",
              "preadv", "preadv2", "close")


def plan_for(root: Path, fmt: str, workers: int, sizes: Sizes):
    from hydra import compose, initialize_config_dir

    from imgtrain.resolve import resolve
    overrides = ["device=cpu", "amp=O0", "dataset=imagenet", f"dataset.root={root}",
                 f"dataset.format={fmt}", f"dataset.workers={workers}",
                 f"dataset.image_size={sizes.loader_image_size}",
                 f"train.batch_size={sizes.loader_batch}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return resolve(compose(config_name="config", overrides=overrides), overrides)


def loaders_for(root: Path, fmt: str, workers: int, sizes: Sizes):
    from imgtrain.data import build_loaders
    from imgtrain.distributed import World
    return build_loaders(plan_for(root, fmt, workers, sizes), World(), accelerator=False)


def images_per_sec(root: Path, fmt: str, workers: int, sizes: Sizes, batches: int) -> float:
    from imgtrain.bench import time_loader
    loaders = loaders_for(root, fmt, workers, sizes)
    images, seconds = time_loader(loaders, warmup_batches=2, timed_batches=batches)
    del loaders  # its workers end before the next loader's start
    return images / seconds


def per_image_cost(root: Path, fmt: str, what: str, passes: int = 2) -> float:
    """Microseconds of this process's CPU time (time.process_time: user + system, so another
    process's load on the machine does not count) per training image: `read` its bytes alone,
    or `item`, the whole dataset[i] (read, decode, crop, flip), over every image shuffled."""
    import random

    from imgtrain.data.imagefolder import JpegFolder
    from imgtrain.data.shards import ShardFolder
    dataset = (ShardFolder if fmt == "shards" else JpegFolder)(str(root), "train", 224, True)
    order = list(range(len(dataset))) * passes
    random.Random(0).shuffle(order)
    started = time.process_time()
    for index in order:
        dataset.read(index) if what == "read" else dataset[(index, index)]
    return (time.process_time() - started) / len(order) * 1e6


def load_only(root: Path, fmt: str, epochs: int, sizes: Sizes) -> None:
    """What strace watches: one worker loading `epochs` whole epochs of training images. Whole
    epochs, so that the images read are exactly those (prefetching stops at an epoch's end)."""
    loaders = loaders_for(root, fmt, 1, sizes)
    for epoch in range(epochs):
        loaders.train_sampler.set_epoch(epoch)
        for _ in loaders.train:
            pass


def syscalls(root: Path, fmt: str, epochs: int, sizes: Sizes, work: Path) -> Counter:
    out = work / f"strace-{fmt}-{epochs}.txt"
    subprocess.run(["strace", "-f", "-c", "-o", str(out), sys.executable, __file__, "--load",
                    fmt, str(epochs), "--root", str(root)] + (["--quick"] if sizes is QUICK
                                                              else []),
                   check=True, capture_output=True, cwd=REPO)
    counts: Counter = Counter()
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            # % time, seconds, usecs/call, calls, [errors,] name
            counts[fields[-1]] = int(fields[3])
    return counts


def per_image_calls(root: Path, fmt: str, sizes: Sizes, work: Path,
                    images_per_epoch: int) -> dict[str, float]:
    """System calls per image: 3 epochs' counts less 1 epoch's, over 2 epochs' images."""
    before = syscalls(root, fmt, 1, sizes, work)
    after = syscalls(root, fmt, 3, sizes, work)
    return {name: (after[name] - before[name]) / (2 * images_per_epoch)
            for name in set(before) | set(after)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--load", nargs=2, metavar=("FORMAT", "EPOCHS"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    if args.load:
        fmt, epochs = args.load
        return load_only(args.root, fmt, int(epochs), sizes)

    work = args.work or Path(tempfile.mkdtemp(prefix="shards_bench"))
    started = time.monotonic()
    folder = work / "folder"
    if not folder.exists():
        make_jpegs(folder, sizes)
    from imgtrain import pack
    packed = work / "packed"
    shutil.rmtree(packed, ignore_errors=True)
    pack_started = time.monotonic()
    assert pack.main([str(folder), str(packed), "--workers=2"]) == 0
    pack_seconds = time.monotonic() - pack_started
    roots = {"folder": folder, "shards": packed}
    images = sum(1 for _ in (folder / "train").rglob("*.JPEG"))

    per_epoch = images // sizes.loader_batch * sizes.loader_batch  # drop_last
    calls = {fmt: per_image_calls(roots[fmt], fmt, sizes, work, per_epoch) for fmt in FORMATS}

    batches = sizes.loader_epochs * images // sizes.loader_batch
    rates: dict[tuple[str, int], list[float]] = {}
    for round_index in range(args.rounds):
        for fmt in (FORMATS if round_index % 2 == 0 else FORMATS[::-1]):
            for what in ("read", "item"):
                rates.setdefault((fmt, what), []).append(per_image_cost(roots[fmt], fmt, what))
        for workers in WORKERS:
            order = FORMATS if round_index % 2 == 0 else FORMATS[::-1]
            for fmt in order:
                rate = images_per_sec(roots[fmt], fmt, workers, sizes, batches)
                rates.setdefault((fmt, workers), []).append(rate)
                print(f"round {round_index + 1} {fmt} {workers} workers: {rate:.1f} img/s",
                      flush=True)
    print(report(calls, rates, sizes, images, batches, pack_seconds, args.rounds,
                 time.monotonic() - started, per_epoch))


def report(calls: dict, rates: dict, sizes: Sizes, images: int, batches: int,
           pack_seconds: float, rounds: int, seconds: float, per_epoch: int) -> str:
    load = os.getloadavg()
    lines = [f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{platform.machine()}, {os.cpu_count()} cores, load average "
             f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end; {seconds:.0f} s in all",
             f"{images} training JPEGs {sizes.jpeg_width}x{sizes.jpeg_height} at "
             f"{sizes.loader_image_size} px, batch {sizes.loader_batch}; packed in "
             f"{pack_seconds:.1f} s (2 pack workers)", "",
             f"system calls per image (strace -f -c: 3 epochs less 1 epoch, over {2 * per_epoch} "
             "images; 1 worker):", "",
             "| call | folder | shards |", "|---|---|---|"]
    names = sorted({name for fmt in FORMATS for name, count in calls[fmt].items()
                    if count >= 0.05}, key=lambda name: -calls["folder"].get(name, 0.0))
    for name in names:
        lines.append(f"| {name} | {calls['folder'].get(name, 0.0):.2f} | "
                     f"{calls['shards'].get(name, 0.0):.2f} |")
    file_calls = {fmt: sum(calls[fmt].get(name, 0.0) for name in FILE_CALLS) for fmt in FORMATS}
    lines += [f"| file-system calls ({', '.join(FILE_CALLS)}) | {file_calls['folder']:.2f} | "
              f"{file_calls['shards']:.2f} |", "",
              f"loader images/s ({batches} timed batches after 2, {rounds} rounds alternating):",
              "", "| workers | folder per round | shards per round | median ratio shards/folder |",
              "|---|---|---|---|"]
    for workers in WORKERS:
        folder, shards = rates[("folder", workers)], rates[("shards", workers)]
        ratio = statistics.median(s / f for s, f in zip(shards, folder))
        lines.append(f"| {workers} | {', '.join(f'{r:.0f}' for r in folder)} | "
                     f"{', '.join(f'{r:.0f}' for r in shards)} | {ratio:.2f} |")
    lines += ["", "CPU time per image in one process (time.process_time, us; median ratio "
              "folder/shards):", ""]
    for what, meaning in (("read", "the bytes alone (dataset.read)"),
                          ("item", "the whole item (dataset[i]: read, decode, crop, flip)")):
        folder, shards = rates[("folder", what)], rates[("shards", what)]
        lines.append(f"- {meaning}: folder {', '.join(f'{r:.0f}' for r in folder)}; shards "
                     f"{', '.join(f'{r:.0f}' for r in shards)}; "
                     f"{statistics.median(f / s for f, s in zip(folder, shards)):.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
