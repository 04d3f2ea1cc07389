"""Start-up to the first batch with an ImageNet-sized tree: every rank listing it (imgtrain before
the sample index) against the sample index (data/index.py), for 1 and 2 ranks.

    python benchmarks/index_startup.py --root /tmp/imgtrain-tree          # times
    python benchmarks/index_startup.py --root /tmp/imgtrain-tree --strace # + system calls

The tree is listing_tree.py's (1,000 classes x 1,281 train + 50 val entries), made on first use
(`--remove` deletes it at the end). Each measurement starts the ranks as forked processes, all at
once, after the parent's part: before, the parent checked the layout (the class folders' names)
and every rank listed both splits itself (torchvision's make_dataset); now the parent builds the
index (the first run) or checks it against the tree's directory times (a later run, a resume, a
requeue), and each rank maps it. A rank's time runs from its start to its first training batch
(256 images, 32 px, no loader workers), and its datasets' part of that (listing or mapping; the
rest is the sampler's epoch and the batch, the same work either way). `--strace` counts each
part's directory and stat calls with `strace -f -c` (one part per traced process; Python's
imports counted alone and taken off).
"""
from __future__ import annotations

import argparse
import multiprocessing
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from listing_tree import ListedFolder, make_tree

from imgtrain.data.imagefolder import JpegFolder, check_layout
from imgtrain.data.index import load
from imgtrain.data.samplers import TrainSampler
from torch.utils.data import DataLoader

warnings.filterwarnings("ignore", category=DeprecationWarning)
SPLITS = ("train", "val")
BATCH = 256
TRACED = "getdents64,openat,newfstatat,statx,fstat,stat,lstat,readlink"


def first_batch(train: JpegFolder, rank: int, world_size: int) -> None:
    sampler = TrainSampler(len(train), rank, world_size, seed=0, micro_batch=BATCH)
    loader = DataLoader(train, batch_size=BATCH, sampler=sampler, collate_fn=train.collate)
    images, labels = next(iter(loader))
    assert images.shape[0] == BATCH


def rank_listing(root: str, rank: int, world_size: int) -> float:
    """Before: each rank lists both splits into lists of tuples. Returns the datasets' seconds."""
    started = time.monotonic()
    train = ListedFolder(root, "train", 32, True)
    ListedFolder(root, "val", 32, False)
    datasets = time.monotonic() - started
    first_batch(train, rank, world_size)
    return datasets


def rank_index(root: str, builds: dict[str, str], rank: int, world_size: int) -> float:
    """Now: each rank maps the parent's index. Returns the datasets' seconds."""
    started = time.monotonic()
    train = JpegFolder(root, "train", 32, True, sample_index=load(builds["train"]))
    JpegFolder(root, "val", 32, False, sample_index=load(builds["val"]))
    datasets = time.monotonic() - started
    first_batch(train, rank, world_size)
    return datasets


def _timed_rank(target, args, results) -> None:
    started = time.monotonic()
    datasets = target(*args)
    results.put((datasets, time.monotonic() - started))


def measure(root: str, world_size: int,
            cache: Path | None) -> tuple[float, list[tuple[float, float]], float]:
    """(parent s, each rank's (datasets s, s to its first batch), s from the start to the last
    rank's first batch)."""
    started = time.monotonic()
    _, builds = check_layout(root, SPLITS, cache)
    parent = time.monotonic() - started
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_timed_rank, args=(
        rank_index if cache else rank_listing,
        (root, builds, rank, world_size) if cache else (root, rank, world_size), results))
        for rank in range(world_size)]
    for process in ranks:
        process.start()
    times = sorted(results.get() for _ in ranks)
    for process in ranks:
        process.join()
    return parent, times, time.monotonic() - started


def run_piece(piece: str, root: str, cache: str) -> None:
    """One part alone, for strace to count."""
    if piece == "listing-parent":
        check_layout(root, SPLITS, None)
    elif piece == "index-parent":
        check_layout(root, SPLITS, Path(cache))
    elif piece == "listing-rank":
        rank_listing(root, 0, 1)
    elif piece == "index-rank":
        rank_index(root, check_layout(root, SPLITS, Path(cache))[1], 0, 1)
    elif piece == "index-check":
        check_layout(root, SPLITS, Path(cache))
    # "imports": nothing, the baseline


def traced(piece: str, root: str, cache: str) -> dict[str, int]:
    """The piece's system calls by name, under strace -f -c."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(["strace", "-f", "-c", "-e", f"trace={TRACED}", "-o", out.name,
                        sys.executable, __file__, "--root", root, "--cache", cache,
                        "--piece", piece], check=True, stdout=subprocess.DEVNULL)
        counts = {}
        for line in out.read().splitlines():
            fields = line.split()
            if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
                counts[fields[-1]] = int(fields[3])
        return counts


def syscall_table(root: str, cache: Path) -> None:
    shutil.rmtree(cache, ignore_errors=True)
    base = traced("imports", root, str(cache))
    rows = {}
    for piece in ("listing-parent", "listing-rank", "index-parent", "index-check"):
        rows[piece] = {k: v - base.get(k, 0) for k, v in traced(piece, root, str(cache)).items()}
    # index-rank re-checks the cache in the process (its check's calls are index-check's).
    rank = traced("index-rank", root, str(cache))
    rows["index-rank"] = {k: v - base.get(k, 0) - rows["index-check"].get(k, 0)
                          for k, v in rank.items()}
    print("\n| process part | getdents64 | stat calls (newfstatat/statx/fstat/lstat) | openat |")
    print("|---|---|---|---|")
    names = {"listing-parent": "before: parent (class folder names)",
             "listing-rank": "before: each rank (lists both splits; first batch)",
             "index-parent": "now, first run: parent (lists once, writes the index)",
             "index-check": "now, later runs: parent (checks the cached index)",
             "index-rank": "now: each rank (maps the index; first batch)"}
    for piece, counts in rows.items():
        stats = sum(counts.get(k, 0) for k in ("newfstatat", "statx", "fstat", "stat", "lstat"))
        print(f"| {names[piece]} | {counts.get('getdents64', 0):,} | {stats:,} | "
              f"{counts.get('openat', 0):,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/imgtrain-tree")
    parser.add_argument("--cache", default=None, help="the index cache (default: a temp folder)")
    parser.add_argument("--strace", action="store_true", help="also count system calls")
    parser.add_argument("--remove", action="store_true", help="delete the tree at the end")
    parser.add_argument("--classes", type=int, default=1000, help="smaller: a smoke run")
    parser.add_argument("--per-class", type=int, default=1281)
    parser.add_argument("--piece", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = Path(args.cache or tempfile.mkdtemp(prefix="imgtrain-index-"))
    if args.piece:
        return run_piece(args.piece, args.root, str(cache))
    root = str(make_tree(Path(args.root), args.classes, args.per_class))
    print("| start-up | ranks | parent s | each rank: its datasets s | each rank: to its first "
          "batch s | to the last first batch s |\n|---|---|---|---|---|---|")
    for world_size in (1, 2):
        for label, use_cache, fresh in (("before: every rank lists", None, False),
                                        ("now, first run: index built", cache, True),
                                        ("now, later run: index cached", cache, False)):
            if fresh:
                shutil.rmtree(cache, ignore_errors=True)
            parent, ranks, total = measure(root, world_size, use_cache)
            print(f"| {label} | {world_size} | {parent:.2f} | "
                  f"{', '.join(f'{datasets:.2f}' for datasets, _ in ranks)} | "
                  f"{', '.join(f'{batch:.2f}' for _, batch in ranks)} | {total:.2f} |", flush=True)
    if args.strace:
        syscall_table(root, cache)
    shutil.rmtree(cache, ignore_errors=True)
    if args.remove:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
