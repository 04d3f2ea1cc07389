"""The sample index (data/index.py): an ImageFolder tree is listed once, mapped by every process,
and listed again only when it changed; its batches are the listing's own."""
from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from conftest import make_image_folder
from imgtrain.data import build_loaders, index, index_cache
from imgtrain.data.imagefolder import JpegFolder
from imgtrain.distributed import World
from imgtrain.errors import ConfigError
from imgtrain.jobenv import plan_job, prepares_shared_files
from imgtrain.resolve import resolve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "tree", num_classes=3, per_class=6, val_per_class=3,
                             size=36)


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Directory listings (os.scandir, os.listdir: what os.walk, find_classes and Path.iterdir
    call) by the folder listed, made in this process from now on."""
    counts: Counter = Counter()
    scandir, listdir = os.scandir, os.listdir

    def counted(real):
        def wrapper(path=".", *args):
            counts[os.fspath(path)] += 1
            return real(path, *args)
        return wrapper

    monkeypatch.setattr(os, "scandir", counted(scandir))
    monkeypatch.setattr(os, "listdir", counted(listdir))
    return counts


def _under(counts: Counter, root: Path) -> int:
    return sum(n for path, n in counts.items() if path.startswith(str(root)))


def _plan(compose, root: Path, cache: Path | None, *extra: str):
    overrides = ["device=cpu", "amp=O0", "model=resnet18", "dataset=imagenet",
                 f"dataset.root={root}", "dataset.image_size=32", "dataset.workers=0",
                 "train.batch_size=4",
                 f"dataset.index_cache={cache if cache is not None else 'null'}", *extra]
    return resolve(compose(*overrides), overrides)


def _first_batches(plan) -> tuple[torch.Tensor, ...]:
    loaders = build_loaders(plan, World(), accelerator=False)
    (train_images, train_labels), (val_images, val_labels) = \
        next(iter(loaders.train)), next(iter(loaders.val))
    return train_images, train_labels, val_images, val_labels


def test_a_tree_is_listed_once_then_mapped_with_the_listings_batches(
        compose, tree: Path, tmp_path: Path, listings: Counter) -> None:
    cache = tmp_path / "cache"
    first = _plan(compose, tree, cache)
    assert _under(listings, tree) > 0
    assert set(first.sample_index) == {"train", "val"}
    listings.clear()
    # A second run of a sweep, a resume, a requeue: the cached index, and not one listing.
    again = _plan(compose, tree, cache)
    assert again.sample_index == first.sample_index and again.num_classes == 3
    indexed = _first_batches(again)
    assert _under(listings, tree) == 0, listings
    listed = _first_batches(_plan(compose, tree, None))  # index_cache=null: listed in-process
    for mapped, own in zip(indexed, listed):
        assert torch.equal(mapped, own)
    # The samples are torchvision's, in its order, and no Python object per sample is kept.
    train = JpegFolder(str(tree), "train", 32, True,
                       sample_index=index.load(again.sample_index["train"]))
    folder = str(tree / "train")
    assert list(train.samples) == make_dataset(folder, find_classes(folder)[1],
                                               extensions=IMG_EXTENSIONS)
    assert all(isinstance(value, (np.ndarray, tuple, str, int, float, bool, type(None)))
               for value in vars(train.index).values())
    assert isinstance(train.index.paths, np.memmap) and train.index.labels.dtype == np.int16
    # A spawned loader worker maps the same files instead of receiving a copy.
    copy = pickle.loads(pickle.dumps(train))
    assert isinstance(copy.index.paths, np.memmap) and list(copy.samples) == list(train.samples)


def test_a_changed_tree_is_listed_again_saying_why(compose, tree: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    first = _plan(compose, tree, cache)
    caplog.set_level(logging.INFO, logger="imgtrain")
    caplog.clear()  # the first listing's line, captured where an earlier test set the level

    def relisted(plan) -> list[str]:
        lines = [r.getMessage() for r in caplog.records if "listing" in r.getMessage()]
        caplog.clear()
        assert plan.sample_index["val"] == first.sample_index["val"]  # val/ did not change
        return lines

    image = (tree / "train" / "class_1" / "img_0.JPEG").read_bytes()
    (tree / "train" / "class_1" / "added.JPEG").write_bytes(image)
    plan = _plan(compose, tree, cache)
    assert len(index.load(plan.sample_index["train"])) == 19
    assert relisted(plan) == [f"dataset: listing {tree}/train again: it changed since it was "
                              "listed (files added or removed in 1 folder(s), e.g. class_1/)"]
    (tree / "train" / "class_0" / "img_3.JPEG").unlink()
    plan = _plan(compose, tree, cache)
    assert len(index.load(plan.sample_index["train"])) == 18 and len(relisted(plan)) == 1
    # A class folder added to train/ alone: listed again, and the splits' classes disagree.
    (tree / "train" / "class_9").mkdir()
    (tree / "train" / "class_9" / "a.JPEG").write_bytes(image)
    with pytest.raises(ConfigError, match=r"class folders differ .*only in train: \['class_9'\]"):
        _plan(compose, tree, cache)
    assert "class folder" in relisted(first)[0]


def test_a_damaged_cached_index_is_listed_again_never_read_short(
        compose, tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    build = Path(_plan(compose, tree, cache).sample_index["train"])
    np.save(build / "labels.npy", np.zeros(5, dtype=np.int16))  # a half-written copy, say
    caplog.set_level(logging.INFO, logger="imgtrain")
    plan = _plan(compose, tree, cache)
    assert len(index.load(plan.sample_index["train"])) == 18
    assert any("its cached index is damaged: its arrays hold 5 samples where index.json says 18"
               in r.getMessage() for r in caplog.records)
    pointer = build.parent / index_cache.POINTER
    pointer.write_text("{not json")
    assert len(index.load(_plan(compose, tree, cache).sample_index["train"])) == 18
    assert json.loads(pointer.read_text())["count"] == 18


def test_an_unwritable_cache_is_one_line(compose, tree: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(ConfigError, match=r"dataset.index_cache: cannot write the sample index "
                       r"in .*file/cache/tree-train-\w+ \(Not a directory\).*or null"):
        _plan(compose, tree, not_a_folder / "cache")


def test_the_jobs_other_processes_wait_for_its_one_builder(
        tree: Path, tmp_path: Path, listings: Counter, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, folder = tmp_path / "cache", str(tree / "train")
    waiter_listed, got = [], []

    def waiter() -> None:
        got.append(index_cache.prepare(folder, cache, builds=False))
        waiter_listed.append(sum(n for path, n in listings.items() if path.startswith(folder)))

    thread = threading.Thread(target=waiter)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and not got  # nothing to map yet: it waits, it does not list
    built = index_cache.prepare(folder, cache, builds=True)
    thread.join(60)
    assert got == [built]
    # Counted while the builder listed too: its listings are the only ones.
    assert sum(n for path, n in listings.items() if path.startswith(folder)) == \
        waiter_listed[0] == 1 + 3  # train/ itself, then each class folder once
    # A node whose cache the builder never writes to (a node-local folder) gives up, in one line.
    monkeypatch.setattr(index_cache, "BUILDER_START_S", 0.3)
    with pytest.raises(ConfigError, match="dataset.index_cache must be a folder every node sees"):
        index_cache.prepare(str(tree / "val"), tmp_path / "elsewhere", builds=False)
    # A builder that stopped (its own error, e.g. an empty class folder): the others stop too.
    looks = iter([True, False])
    monkeypatch.setattr(index_cache, "_builder_alive", lambda entry: next(looks, False))
    with pytest.raises(ConfigError, match="the job's first process stopped listing .*val"):
        index_cache.prepare(str(tree / "val"), tmp_path / "elsewhere", builds=False)


@pytest.mark.parametrize("env, world, builds", [
    ({}, {}, True),                                                    # one node, its launcher
    ({}, {"nnodes": 2, "node_rank": 1, "master_port": 29500}, False),  # node 1's launcher
    ({"RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0"}, {}, True),   # torchrun: global rank 0
    ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}, {}, False),  # ... any other rank
])
def test_one_process_per_job_builds_the_index(compose, monkeypatch: pytest.MonkeyPatch,
                                              env: dict, world: dict, builds: bool) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    if env:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose(*[f"world.{key}={value}" for key, value in world.items()])
    from imgtrain.resolve import typed
    assert prepares_shared_files(plan_job(typed(cfg).world)) is builds
