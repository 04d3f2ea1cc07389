"""dataset=imagenet|cifar10|synthetic: datasets, samplers and loaders that yield uint8 batches."""
from __future__ import annotations

import multiprocessing
import os
import random
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imgtrain.data import transforms as T
from imgtrain.data.augment import build_augment, check_augment
from imgtrain.data.batch_pool import BatchPool, PooledLoader, pool_fits
from imgtrain.data.cifar import Cifar10, find_root
from imgtrain.data.imagefolder import JpegFolder, check_layout
from imgtrain.data.samplers import ExactValSampler, TrainSampler
from imgtrain.data.synthetic import Synthetic
from imgtrain.errors import ConfigError
from imgtrain.preemption import ignore_stop_signals

DATASETS = ("imagenet", "cifar10", "synthetic")
# Held in memory: a batch takes about a millisecond to make, not worth a worker process on the CPU.
IN_MEMORY = ("cifar10", "synthetic")


SPLITS = ("train", "val")


@dataclass
class Loaders:
    train: DataLoader | None  # None for mode=eval, which reads only the validation split
    val: DataLoader
    train_sampler: TrainSampler | None
    num_classes: int
    per_rank_batch: int                    # samples per rank per optimizer step
    class_names: list[str] | None = None  # saved in checkpoints for predict and export
    accumulate_steps: int = 1             # loader batches per optimizer step


def describe(data_cfg: Any, with_root: bool = True) -> str:
    """The data as the console names it: `imagefolder <root>` (dataset=imagenet reads any
    ImageFolder tree, ImageNet or not), `cifar10 <root>`, or `synthetic`."""
    name = data_cfg["name"]
    label = "imagefolder" if name == "imagenet" else name
    if not with_root or name == "synthetic" or not data_cfg.get("root"):
        return label
    return f"{label} {data_cfg['root']}"


def check_dataset(data_cfg: Any, splits: tuple[str, ...] = SPLITS) -> int:
    """Validate the dataset's files without reading images; return the number of classes.
    `splits`: the ones the mode reads (mode=eval: val alone)."""
    name = data_cfg["name"]
    if name == "imagenet":
        inferred = len(check_layout(data_cfg["root"], splits))
    elif name == "cifar10":
        find_root(data_cfg["root"], data_cfg.get("download", False))
        inferred = Cifar10.num_classes
    elif name == "synthetic":
        inferred = data_cfg["num_classes"]
        if min(data_cfg["train_size"], data_cfg["val_size"], inferred) < 1:
            raise ConfigError("dataset.train_size, val_size and num_classes must be at least 1")
    else:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    wanted = data_cfg.get("num_classes")
    if name == "imagenet" and wanted not in (None, inferred):
        raise ConfigError(f"dataset.num_classes={wanted} but {data_cfg['root']}/{splits[0]} has "
                          f"{inferred} class folders")
    check_augmentation(data_cfg)
    return inferred


def check_augmentation(data_cfg: Any) -> None:
    """The augmentation, repeated-augmentation and validation-size keys (issue #16)."""
    check_augment(data_cfg)
    if int(data_cfg.get("ra_reps", 1)) < 1:
        raise ConfigError(f"dataset.ra_reps={data_cfg['ra_reps']} must be at least 1 (1: off)")
    given = [key for key in T.VAL_SIZE_KEYS if data_cfg.get(key) is not None]
    if given and data_cfg["name"] != "imagenet":
        raise ConfigError(f"dataset.{given[0]} applies to dataset=imagenet only: "
                          f"{data_cfg['name']} validates its images at their own size")
    T.val_sizes(data_cfg)


def build_datasets(data_cfg: Any, seed: int,
                   train: bool = True) -> tuple[Dataset | None, Dataset]:
    """The training (None unless `train`) and validation sets."""
    name, size = data_cfg["name"], data_cfg["image_size"]
    augment = build_augment(data_cfg)  # training only: validation never augments
    if name == "imagenet":
        skip = data_cfg.get("skip_bad_images", False)
        val_resize, val_crop = T.val_sizes(data_cfg)
        return (JpegFolder(data_cfg["root"], "train", size, True, skip, augment) if train
                else None, JpegFolder(data_cfg["root"], "val", val_crop, False, skip,
                                      val_resize_size=val_resize))
    if name == "cifar10":
        download = data_cfg.get("download", False)
        return (Cifar10(data_cfg["root"], True, download, augment) if train else None,
                Cifar10(data_cfg["root"], False))
    common = dict(image_size=size, num_classes=data_cfg["num_classes"], seed=seed,
                  noise=data_cfg["noise"])
    return (Synthetic(data_cfg["train_size"], train=True, augment=augment, **common) if train
            else None, Synthetic(data_cfg["val_size"], train=False, **common))


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_workers(dataset: str, world_size_on_node: int, accelerator: bool) -> int:
    """dataset.workers=auto: this process's share of the node's cores, at most 8.

    On the CPU, in-memory datasets get none: the model already uses every core, and worker
    processes taking turns on them made training 3-9% slower (2 workers on 2 cores) than
    making the batches in the training process.
    """
    if dataset in IN_MEMORY and not accelerator:
        return 0
    return max(1, min(8, cpu_cores() // max(1, world_size_on_node)))


def _seed_worker(worker_id: int) -> None:
    ignore_stop_signals()  # the training process acts on them; see preemption.py
    # DataLoader already gives each worker torch seed base_seed + worker_id, derived from the
    # rank-specific generator below; numpy and random follow it so any library code is seeded too.
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def worker_start_method() -> str | None:
    """fork where the OS has it, as under torchrun: imgtrain's own launcher spawns the ranks, and
    a spawned process spawns its loader workers too, each importing torch and torchvision anew
    (about 7 s each on a 2-core VM, for every loader of every rank)."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def build_loaders(data_cfg: Any, global_batch: int, rank: int, world_size: int,
                  local_world_size: int, seed: int, accelerator: bool,
                  accumulate_steps: int = 1, val_batch: int | None = None,
                  train: bool = True) -> Loaders:
    """Loaders whose training batches are one micro-step's: `accumulate_steps` of them make the
    global batch of one optimizer step. Validation's global batch is `val_batch` if given, else a
    micro-step's. Without `train` (mode=eval) only the validation split is read or checked, and
    `global_batch` is evaluation's."""
    num_classes = check_dataset(data_cfg, SPLITS if train else ("val",))
    per_rank_batch = global_batch // world_size
    micro_batch = per_rank_batch // accumulate_steps
    train_set, val_set = build_datasets(data_cfg, seed, train)
    if train_set is not None and len(train_set) < global_batch:
        raise ConfigError(f"train.batch_size={global_batch} is larger than the training set "
                          f"({len(train_set)} images)")
    common = _loader_settings(data_cfg, local_world_size, accelerator,
                              torch.Generator().manual_seed(seed + 1000 * rank))
    data_cfg = _with_pool_checked(data_cfg, common, micro_batch, train_set or val_set,
                                  local_world_size)
    train_sampler, train_loader = None, None
    if train_set is not None:
        train_sampler = TrainSampler(len(train_set), rank, world_size, seed,
                                     ra_reps=int(data_cfg.get("ra_reps", 1)),
                                     micro_batch=micro_batch, accumulate_steps=accumulate_steps)
        # drop_last keeps every step's shape static (graph-compiling NPUs, torch.compile).
        train_loader = _loader(train_set, data_cfg, common, batch_size=micro_batch,
                               sampler=train_sampler, drop_last=True)
    val = _loader(val_set, data_cfg, common,
                  batch_size=val_batch // world_size if val_batch else micro_batch,
                  sampler=ExactValSampler(len(val_set), rank, world_size), drop_last=False)
    return Loaders(train_loader, val, train_sampler, num_classes, per_rank_batch,
                   class_names=getattr(val_set, "classes", None),
                   accumulate_steps=accumulate_steps)


def _loader_settings(data_cfg: Any, local_world_size: int, accelerator: bool,
                     generator: torch.Generator) -> dict[str, Any]:
    """The DataLoader arguments both loaders share: workers, pinning, seeding."""
    workers = data_cfg["workers"]
    workers = (default_workers(data_cfg["name"], local_world_size, accelerator)
               if workers in ("auto", None) else int(workers))
    pin_memory = accelerator and bool(data_cfg.get("pin_memory", True))
    common: dict[str, Any] = dict(num_workers=workers, pin_memory=pin_memory,
                                  worker_init_fn=_seed_worker, generator=generator)
    if workers > 0:
        common.update(persistent_workers=bool(data_cfg.get("persistent_workers", True)),
                      prefetch_factor=int(data_cfg.get("prefetch_factor", 2)),
                      multiprocessing_context=worker_start_method())
    return common


def _with_pool_checked(data_cfg: Any, common: dict[str, Any], loader_batch: int,
                       dataset: Dataset, processes_on_node: int) -> Any:
    """data_cfg, with reuse_batch_memory turned off where /dev/shm cannot hold the pools."""
    pooled = (getattr(dataset, "collate", None) and common.get("persistent_workers")
              and data_cfg.get("reuse_batch_memory", True))
    if not pooled:
        return data_cfg
    # The pool's segments hold the larger of the training crop and validation's.
    size = max(int(data_cfg["image_size"]), T.val_sizes(data_cfg)[1])
    batch_bytes = loader_batch * (3 * size * size + 8)  # uint8 images and int64 labels
    if pool_fits(batch_bytes, common["num_workers"], common["prefetch_factor"], loaders=2,
                 processes_on_node=processes_on_node):
        return data_cfg
    return {**data_cfg, "reuse_batch_memory": False}


def _loader(dataset: Dataset, data_cfg: Any, common: dict[str, Any], **kwargs: Any) -> DataLoader:
    """A DataLoader; a PooledLoader where persistent workers collate the dataset's own batches."""
    collate = getattr(dataset, "collate", None)
    if not (collate and common.get("persistent_workers")
            and data_cfg.get("reuse_batch_memory", True)):
        return DataLoader(dataset, collate_fn=collate, **common, **kwargs)
    # A worker has at most prefetch_factor batches in flight, and the training process holds
    # one more (the batch it is using): with that many segments a worker never falls back.
    pool = BatchPool(common["num_workers"], slots_per_worker=common["prefetch_factor"] + 1)
    return PooledLoader(dataset, pool, collate_fn=partial(pool.collate, fallback=collate),
                        **common, **kwargs)
