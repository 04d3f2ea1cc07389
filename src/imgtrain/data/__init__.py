"""dataset=imagenet|cifar10|synthetic: datasets, samplers and loaders that yield uint8 batches."""
from __future__ import annotations

import multiprocessing
import os
import random
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # plan.py imports this package: the types only, to keep the import one-way
    from imgtrain.config import DatasetConfig
    from imgtrain.distributed import World
    from imgtrain.plan import RunPlan

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
    class_names: list[str] | None = None  # saved in checkpoints for predict and export


def describe(dataset: DatasetConfig, with_root: bool = True) -> str:
    """The data as the console names it: `imagefolder <root>` (dataset=imagenet reads any
    ImageFolder tree, ImageNet or not), `cifar10 <root>`, or `synthetic`."""
    label = "imagefolder" if dataset.name == "imagenet" else dataset.name
    if not with_root or dataset.name == "synthetic" or not dataset.root:
        return label
    return f"{label} {dataset.root}"


def check_dataset(dataset: DatasetConfig, splits: tuple[str, ...] = SPLITS) -> int:
    """Validate the dataset's files without reading images; return the number of classes.
    `splits`: the ones the mode reads (mode=eval: val alone). Run once, in the parent
    (checks.data_for_mode): the workers build what it passed."""
    name = dataset.name
    if name == "imagenet":
        inferred = len(check_layout(dataset.root, splits))
    elif name == "cifar10":
        find_root(dataset.root, dataset.download)
        inferred = Cifar10.num_classes
    elif name == "synthetic":
        inferred = dataset.num_classes
        if min(dataset.train_size, dataset.val_size, inferred) < 1:
            raise ConfigError("dataset.train_size, val_size and num_classes must be at least 1")
    else:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    wanted = dataset.num_classes
    if name == "imagenet" and wanted not in (None, inferred):
        raise ConfigError(f"dataset.num_classes={wanted} but {dataset.root}/{splits[0]} has "
                          f"{inferred} class folders")
    check_augmentation(dataset)
    return inferred


def check_augmentation(dataset: DatasetConfig) -> None:
    """The augmentation, repeated-augmentation and validation-size keys (issue #16)."""
    check_augment(dataset)
    if int(dataset.ra_reps) < 1:
        raise ConfigError(f"dataset.ra_reps={dataset.ra_reps} must be at least 1 (1: off)")
    given = [key for key in T.VAL_SIZE_KEYS if getattr(dataset, key) is not None]
    if given and dataset.name != "imagenet":
        raise ConfigError(f"dataset.{given[0]} applies to dataset=imagenet only: "
                          f"{dataset.name} validates its images at their own size")
    T.val_sizes(dataset)


def build_datasets(dataset: DatasetConfig, seed: int, val_sizes: tuple[int, int],
                   train: bool = True, largest_train_size: int | None = None
                   ) -> tuple[Dataset | None, Dataset]:
    """The training (None unless `train`) and validation sets; `val_sizes`: validation's
    (resize, crop), the plan's val_resize_size and val_crop_size. Training items name their
    crop size (TrainSampler); `largest_train_size` (None: image_size) is the largest they may."""
    name, size = dataset.name, dataset.image_size
    augment = build_augment(dataset)  # training only: validation never augments
    if name == "imagenet":
        skip = dataset.skip_bad_images
        val_resize, val_crop = val_sizes
        return (JpegFolder(dataset.root, "train", size, True, skip, augment) if train
                else None, JpegFolder(dataset.root, "val", val_crop, False, skip,
                                      val_resize_size=val_resize))
    if name == "cifar10":
        return (Cifar10(dataset.root, True, dataset.download, augment) if train else None,
                Cifar10(dataset.root, False))
    common = dict(image_size=size, num_classes=dataset.num_classes, seed=seed,
                  noise=dataset.noise)
    # Training's noise bank is sized for its largest crop; validation's stays image_size's.
    train_common = {**common, "image_size": largest_train_size or size}
    return (Synthetic(dataset.train_size, train=True, augment=augment, **train_common) if train
            else None, Synthetic(dataset.val_size, train=False, **common))


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


def build_loaders(plan: RunPlan, world: World, accelerator: bool) -> Loaders:
    """Loaders whose training batches are one micro-step's (plan.batches.micro):
    plan.batches.accumulate_steps of them make one optimizer step. Validation's are
    plan.batches.val_per_rank. mode=eval reads the validation split alone."""
    dataset, batches, seed = plan.dataset, plan.batches, plan.train.seed
    train_set, val_set = build_datasets(dataset, seed, (plan.val_resize_size, plan.val_crop_size),
                                        train=plan.mode != "eval",
                                        largest_train_size=plan.largest_train_size)
    # The one check the parent cannot make: it counts the images, which only building tells.
    if train_set is not None and len(train_set) < batches.global_batch:
        raise ConfigError(f"train.batch_size={batches.global_batch} is larger than the training "
                          f"set ({len(train_set)} images)")
    common = _loader_settings(dataset, world.local_world_size, accelerator,
                              torch.Generator().manual_seed(seed + 1000 * world.rank))
    reuse = _reuse_batch_memory(dataset, common, batches.micro, train_set or val_set,
                                world.local_world_size,
                                max(plan.largest_train_size, plan.val_crop_size))
    train_sampler, train_loader = None, None
    if train_set is not None:
        train_sampler = TrainSampler(len(train_set), world.rank, world.world_size, seed,
                                     ra_reps=int(dataset.ra_reps), micro_batch=batches.micro,
                                     accumulate_steps=batches.accumulate_steps,
                                     size_of_epoch=plan.train_size if plan.scheduled_sizes
                                     else None)
        # drop_last keeps every step's shape static (graph-compiling NPUs, torch.compile).
        train_loader = _loader(train_set, reuse, common, batch_size=batches.micro,
                               sampler=train_sampler, drop_last=True)
    val = _loader(val_set, reuse, common, batch_size=batches.val_per_rank,
                  sampler=ExactValSampler(len(val_set), world.rank, world.world_size),
                  drop_last=False)
    return Loaders(train_loader, val, train_sampler, plan.num_classes,
                   class_names=getattr(val_set, "classes", None))


def _loader_settings(dataset: DatasetConfig, local_world_size: int, accelerator: bool,
                     generator: torch.Generator) -> dict[str, Any]:
    """The DataLoader arguments both loaders share: workers, pinning, seeding."""
    workers = (default_workers(dataset.name, local_world_size, accelerator)
               if dataset.workers == "auto" else int(dataset.workers))
    pin_memory = accelerator and bool(dataset.pin_memory)
    common: dict[str, Any] = dict(num_workers=workers, pin_memory=pin_memory,
                                  worker_init_fn=_seed_worker, generator=generator)
    if workers > 0:
        common.update(persistent_workers=bool(dataset.persistent_workers),
                      prefetch_factor=int(dataset.prefetch_factor),
                      multiprocessing_context=worker_start_method())
    return common


def _reuse_batch_memory(dataset: DatasetConfig, common: dict[str, Any], loader_batch: int,
                        data: Dataset, processes_on_node: int, largest_size: int) -> bool:
    """dataset.reuse_batch_memory, turned off where /dev/shm cannot hold the pools.
    `largest_size`: the largest crop a batch holds (training's largest, or validation's)."""
    pooled = (getattr(data, "collate", None) and common.get("persistent_workers")
              and dataset.reuse_batch_memory)
    if not pooled:
        return bool(dataset.reuse_batch_memory)
    # A segment, once made, keeps the largest batch it held (BatchPool._buffer): at the most,
    # the largest crop's.
    size = largest_size
    batch_bytes = loader_batch * (3 * size * size + 8)  # uint8 images and int64 labels
    return pool_fits(batch_bytes, common["num_workers"], common["prefetch_factor"], loaders=2,
                     processes_on_node=processes_on_node)


def _loader(data: Dataset, reuse_batch_memory: bool, common: dict[str, Any],
            **kwargs: Any) -> DataLoader:
    """A DataLoader; a PooledLoader where persistent workers collate the dataset's own batches."""
    collate = getattr(data, "collate", None)
    if not (collate and common.get("persistent_workers") and reuse_batch_memory):
        return DataLoader(data, collate_fn=collate, **common, **kwargs)
    # A worker has at most prefetch_factor batches in flight, and the training process holds
    # one more (the batch it is using): with that many segments a worker never falls back.
    pool = BatchPool(common["num_workers"], slots_per_worker=common["prefetch_factor"] + 1)
    return PooledLoader(data, pool, collate_fn=partial(pool.collate, fallback=collate),
                        **common, **kwargs)
