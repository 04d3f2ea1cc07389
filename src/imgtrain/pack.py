"""python -m imgtrain.pack <imagefolder> <out>: pack an ImageFolder tree into WebDataset-layout tar
shards with an index, for dataset.format=shards (layout: data/shard_format.py).

One shard per task over a pool of processes; each shard is written to `<name>.tmp` and renamed
when complete, so a pack stopped anywhere (Ctrl-C, a killed job) goes on where it was when the
same command runs again: finished shards are checked and kept, partial ones rewritten.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np

from imgtrain.data import cpu_cores
from imgtrain.data.imagefolder import check_layout
from imgtrain.data.pack_listing import list_split
from imgtrain.data.shard_format import INDEX_FILE, Manifest, ShardInfo, index_name
from imgtrain.data.shard_writer import (ShardTask, SplitFiles, is_finished, plan_split,
                                        write_shard)
from imgtrain.errors import ConfigError
from imgtrain.pack_progress import PackProgress

SPLITS = ("train", "val")
STATE_FILE = "pack-state.json"  # the plan an unfinished pack follows (its fingerprint)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def shard_size(text: str) -> int:
    """`--shard-size`: bytes, with an optional unit (500M, 1G, 1GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match or float(match.group(1)) * _UNITS[match.group(2) or ""] < 4096:
        raise argparse.ArgumentTypeError(f"takes a size of 4k or more such as 500M or 1G, "
                                         f"not {text}")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"takes a number of 1 or more, not {text}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as imgtrain's other errors
        self.exit(2, f"error: {message} (python -m imgtrain.pack --help)\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m imgtrain.pack",
                     description="Pack an ImageFolder tree into WebDataset-layout tar shards "
                                 "with an index, for dataset.format=shards. Run it again after "
                                 "an interruption: finished shards are kept.")
    parser.add_argument("source", help="an ImageFolder tree: train/<class>/*, val/<class>/*")
    parser.add_argument("out", help="the folder to write the shards and index to")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=shard_size, default=shard_size("1G"), metavar="BYTES",
                      help="bytes a shard holds at most (default 1G: ImageNet-1k's train split "
                           "in ~140 shards)")
    size.add_argument("--samples-per-shard", type=positive, metavar="N",
                      help="images a shard holds, instead of --shard-size")
    parser.add_argument("--workers", type=positive, default=None, metavar="N",
                        help="processes writing shards (default: the cores this process may use)")
    return parser.parse_args(argv)


def pack(source: Path, out: Path, shard_bytes: int | None, samples_per_shard: int | None,
         workers: int, progress: PackProgress) -> Manifest:
    """Pack every split that `source` has; returns the manifest written last as index.json."""
    splits = tuple(split for split in SPLITS if (source / split).is_dir())
    if not source.is_dir():
        raise ConfigError(f"{source} does not exist")
    if not splits:
        raise ConfigError(f"{source} is not an ImageFolder tree with train/ or val/ "
                          "(train/<class>/<image>, val/<class>/<image>)")
    if out.resolve() == source.resolve() or any(
            out.resolve().is_relative_to((source / split).resolve()) for split in splits):
        raise ConfigError(f"the output folder {out} is inside the tree it packs; choose another")
    classes = check_layout(str(source), splits)[0]  # no index: the packer lists for itself
    context = multiprocessing.get_context("fork" if "fork" in
                                          multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers, initializer=_ignore_interrupts) as pool:
        progress.stage("listing", source)
        files = [list_split(source / split, classes, pool) for split in splits]
        out.mkdir(parents=True, exist_ok=True)
        plans = {split_files.split: plan_split(split_files, out, shard_bytes, samples_per_shard)
                 for split_files in files}
        _claim(out, _fingerprint(source, files, plans))
        tasks = [task for split_tasks, _ in plans.values() for task in split_tasks]
        done = [task for task in tasks if is_finished(task)]
        progress.start(tasks, done)
        for name, samples, written in pool.imap_unordered(
                write_shard, [task for task in tasks if task not in done]):
            progress.finished(name, samples, written)
    for split, (_, index) in plans.items():
        temporary = out / (index_name(split) + ".tmp")
        with open(temporary, "wb") as f:
            np.save(f, index)
        temporary.replace(out / index_name(split))
    manifest = Manifest(classes, {split: [ShardInfo(task.name, task.bytes, len(task.paths))
                                          for task in split_tasks]
                                  for split, (split_tasks, _) in plans.items()})
    manifest.write(out / INDEX_FILE)
    progress.done(out, manifest)
    return manifest


def _ignore_interrupts() -> None:
    """Pool workers leave Ctrl-C to the packing process, which stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _fingerprint(source: Path, files: list[SplitFiles],
                 plans: dict[str, tuple[list[ShardTask], np.ndarray]]) -> str:
    """What the shards' bytes follow from: the files (paths, sizes, change times), the labels
    and the shard boundaries."""
    digest = hashlib.sha256(str(source.resolve()).encode())
    for split_files in files:
        digest.update("\0".join([split_files.split, *split_files.paths]).encode())
        for array in (split_files.labels, split_files.sizes, split_files.mtimes,
                      plans[split_files.split][1]):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _claim(out: Path, fingerprint: str) -> None:
    """Refuse to mix shards of two packs in `out`: a finished shard is kept only if the tree and
    the shard size it was written from are this command's."""
    state = out / STATE_FILE
    if state.exists():
        if json.loads(state.read_text()).get("fingerprint") != fingerprint:
            raise ConfigError(f"{out} holds a pack of another tree, or of this tree before it "
                              "changed, or with another shard size; remove it or choose another "
                              "output folder")
        return
    if any(out.iterdir()):
        raise ConfigError(f"the output folder {out} is not empty; give a new or empty folder")
    temporary = state.with_name(state.name + ".tmp")
    temporary.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    temporary.replace(state)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    progress = PackProgress(started)
    try:
        pack(Path(args.source).expanduser(), Path(args.out).expanduser(),
             None if args.samples_per_shard else args.shard_size, args.samples_per_shard,
             args.workers or cpu_cores(), progress)
    except ConfigError as exc:
        progress.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.stop()
        print("interrupted: the same command goes on from the finished shards", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
