"""Loader workers' private memory over an epoch of a 1.28M-sample ImageFolder: the list of
`(path, label)` tuples imgtrain kept before (copied into each worker as reference counts are
written on read, pytorch/pytorch#13246) against the sample index's mapped arrays.

    python benchmarks/worker_memory.py --root /tmp/imgtrain-tree [--workers 2]

The tree is listing_tree.py's (made on first use). One epoch of the training sampler (1,281,000
samples, batches of 256) through a DataLoader with forked persistent workers, as imgtrain runs
it; each sample's file is opened and read (`read`, `label` and `where` are the real ones), but
not decoded: decoding allocates and frees the same memory whatever holds the paths, and would make
an epoch take an hour here. Each worker's USS (its private pages) and PSS (private pages plus its
share of the shared ones) come from /proc/<pid>/smaps_rollup after the first batch, at each
quarter of the epoch, and at its end.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from listing_tree import ListedFolder, make_tree
from torch.utils.data import DataLoader

from imgtrain.data.imagefolder import JpegFolder, check_layout
from imgtrain.data.index import load
from imgtrain.data.samplers import TrainSampler

warnings.filterwarnings("ignore", category=DeprecationWarning)
BATCH = 256
IMAGE = torch.zeros(3, 32, 32, dtype=torch.uint8)


class Listed(ListedFolder):
    def _load(self, data: bytearray, seed: int) -> torch.Tensor:
        return IMAGE


class Indexed(JpegFolder):
    def _load(self, data: bytearray, seed: int) -> torch.Tensor:
        return IMAGE


def memory_mb(pid: int) -> tuple[float, float]:
    """(USS, PSS) in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024, fields["Pss"] / 1024


def workers_of(loader_iterator) -> list[int]:
    return [worker.pid for worker in loader_iterator._workers]


def epoch(dataset: JpegFolder, workers: int) -> list[tuple[str, list[tuple[float, float]]]]:
    sampler = TrainSampler(len(dataset), 0, 1, seed=0, micro_batch=BATCH)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=dataset.collate,
                        num_workers=workers, persistent_workers=True, prefetch_factor=4,
                        multiprocessing_context="fork")
    iterator = iter(loader)
    next(iterator)
    pids = workers_of(iterator)
    points = [("first batch", [memory_mb(pid) for pid in pids])]
    batches = len(loader)
    marks = {batches * q // 4: f"{q}/4 epoch" for q in (1, 2, 3)}
    for step, _ in enumerate(iterator, start=2):
        if step in marks:
            points.append((marks[step], [memory_mb(pid) for pid in pids]))
    points.append(("epoch end", [memory_mb(pid) for pid in pids]))
    del iterator, loader
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/imgtrain-tree")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=1000, help="smaller: a smoke run")
    parser.add_argument("--per-class", type=int, default=1281)
    args = parser.parse_args()
    root = str(make_tree(Path(args.root), args.classes, args.per_class))
    cache = Path(tempfile.mkdtemp(prefix="imgtrain-index-"))
    builds = check_layout(root, ("train",), cache)[1]
    print("| samples held as | point | each worker's USS, MB | each worker's PSS, MB |\n"
          "|---|---|---|---|")
    for label, make in (("list of tuples (before)", lambda: Listed(root, "train", 32, True)),
                        ("mapped index (now)", lambda: Indexed(
                            root, "train", 32, True, sample_index=load(builds["train"])))):
        started = time.monotonic()
        dataset = make()
        for point, values in epoch(dataset, args.workers):
            print(f"| {label} | {point} | {', '.join(f'{uss:.0f}' for uss, _ in values)} | "
                  f"{', '.join(f'{pss:.0f}' for _, pss in values)} |", flush=True)
        print(f"<!-- {label}: {len(dataset):,} samples, {time.monotonic() - started:.0f} s -->",
              flush=True)
        del dataset
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
