"""dataset=imagenet|cifar10|synthetic: datasets, samplers and loaders that yield uint8 batches."""
from __future__ import annotations

import math
import multiprocessing
import os
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imgtrain.data import transforms as T
from imgtrain.data.augment import build_augment, check_augment
from imgtrain.data.batch_pool import BatchPool, PooledLoader, pool_bytes, pool_fits
from imgtrain.data.cifar import PADDING as CIFAR_PADDING, Cifar10, find_root
from imgtrain.data.imagefolder import JpegFolder, check_layout
from imgtrain.data.index import load as load_index
from imgtrain.data.index_cache import cache_folder as index_cache_folder
from imgtrain.data.samplers import ExactValSampler, TrainSampler
from imgtrain.data.shard_format import INDEX_FILE
from imgtrain.data.shards import ShardFolder, check_shards
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
    ImageFolder tree, ImageNet or not), `shards <root>` (one packed by imgtrain.pack),
    `cifar10 <root>`, or `synthetic`."""
    label = dataset.name
    if dataset.name == "imagenet":
        label = "shards" if dataset.format == "shards" else "imagefolder"
    if not with_root or dataset.name == "synthetic" or not dataset.root:
        return label
    return f"{label} {dataset.root}"


def describe_augmentation(dataset: DatasetConfig) -> str:
    """The training images' augmentation in one line (the start summary's): crop, flip, and
    what dataset.auto_augment, random_erase, mixup/cutmix and ra_reps add."""
    crop = T.train_crop(dataset, pad=CIFAR_PADDING if dataset.name == "cifar10" else 0)
    size = dataset.image_size if dataset.name != "cifar10" else Cifar10.image_size
    if crop.scale is not None:
        parts = [f"random-resized crop {size} px (scale {crop.scale[0]:g}-{crop.scale[1]:g}, "
                 f"ratio {crop.ratio[0]:.3g}-{crop.ratio[1]:.3g})"]
    else:
        parts = [f"random {size} px crop, {crop.pad} px padding" if crop.pad else "no crop"]
    parts.append(f"flip p {crop.hflip:g}" if crop.hflip else "no flip")
    if dataset.auto_augment:
        parts.append(f"auto augment {dataset.auto_augment}")
    parts += [f"{name} {value:g}" for name, value in (
        ("random erase", dataset.random_erase), ("mixup", dataset.mixup_alpha),
        ("cutmix", dataset.cutmix_alpha)) if value]
    if dataset.ra_reps > 1:
        parts.append(f"repeated augmentation x{dataset.ra_reps}")
    return ", ".join(parts)


def check_dataset(dataset: DatasetConfig, splits: tuple[str, ...] = SPLITS,
                  builds_index: bool = True) -> tuple[int, dict[str, str]]:
    """Validate the dataset's files without reading images; return the number of classes and,
    for an ImageFolder with dataset.index_cache set, each split's sample index ({split: its
    build's folder}, data/index.py), listed by the job's one builder (`builds_index`).
    `splits`: the ones the mode reads (mode=eval: val alone). Run once, in the parent
    (checks.data_for_mode): the workers build what it passed."""
    name, sample_index = dataset.name, {}
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if dataset.format == "shards" and name != "imagenet":
        raise ConfigError(f"dataset.format=shards applies to dataset=imagenet only, not {name}")
    check_augmentation(dataset)  # first: listing a large tree for the index may take minutes
    if name == "imagenet" and dataset.format == "shards":
        inferred = len(check_shards(dataset.root, splits, dataset.skip_bad_images))
    elif name == "imagenet":
        _not_packed(dataset.root)
        cache = None if dataset.index_cache is None else index_cache_folder(dataset.index_cache)
        classes, sample_index = check_layout(dataset.root, splits, cache, builds_index)
        inferred = len(classes)
    elif name == "cifar10":
        find_root(dataset.root, dataset.download)
        inferred = Cifar10.num_classes
    else:
        inferred = dataset.num_classes
        if min(dataset.train_size, dataset.val_size, inferred) < 1:
            raise ConfigError("dataset.train_size, val_size and num_classes must be at least 1")
    wanted = dataset.num_classes
    if name == "imagenet" and wanted not in (None, inferred):
        raise ConfigError(f"dataset.num_classes={wanted} but {dataset.root}/{splits[0]} has "
                          f"{inferred} class folders")
    return inferred, sample_index


def _not_packed(root: str | None) -> None:
    """A packed folder given as an ImageFolder would fail on its missing train/: say what it is."""
    if root and (Path(root).expanduser() / INDEX_FILE).is_file():
        raise ConfigError(f"dataset.root {root} holds packed shards ({INDEX_FILE}): add "
                          "dataset.format=shards to read them")


def check_augmentation(dataset: DatasetConfig) -> None:
    """The crop and flip, augmentation, repeated-augmentation and validation-size keys."""
    check_augment(dataset)
    if int(dataset.ra_reps) < 1:
        raise ConfigError(f"dataset.ra_reps={dataset.ra_reps} must be at least 1 (1: off)")
    T.check_train_crop(dataset, fixed_size=dataset.name in IN_MEMORY)
    given = [key for key in T.VAL_SIZE_KEYS if getattr(dataset, key) is not None]
    if given and dataset.name != "imagenet":
        raise ConfigError(f"dataset.{given[0]} applies to dataset=imagenet only: "
                          f"{dataset.name} validates its images at their own size")
    T.val_sizes(dataset)


def build_datasets(dataset: DatasetConfig, seed: int, val_sizes: tuple[int, int],
                   train: bool = True, sample_index: dict[str, str] | None = None,
                   largest_train_size: int | None = None) -> tuple[Dataset | None, Dataset]:
    """The training (None unless `train`) and validation sets; `val_sizes`: validation's
    (resize, crop), the plan's val_resize_size and val_crop_size; `sample_index`: the plan's
    {split: index build folder}, mapped here (a split without one is listed here). Training
    items name their crop size (TrainSampler); `largest_train_size` (None: image_size) is the
    largest they may."""
    name, size = dataset.name, dataset.image_size
    augment = build_augment(dataset)  # training only: validation never augments
    if name == "imagenet":
        skip = dataset.skip_bad_images
        val_resize, val_crop = val_sizes
        if dataset.format == "shards":
            return (ShardFolder(dataset.root, "train", size, True, skip, augment,
                                        crop=T.train_crop(dataset)) if train
                    else None, ShardFolder(dataset.root, "val", val_crop, False, skip,
                                           val_resize_size=val_resize))
        mapped = {split: load_index(files) for split, files in (sample_index or {}).items()}
        return (JpegFolder(dataset.root, "train", size, True, skip, augment,
                           sample_index=mapped.get("train"), crop=T.train_crop(dataset)) if train
                else None, JpegFolder(dataset.root, "val", val_crop, False, skip,
                                      val_resize_size=val_resize, sample_index=mapped.get("val")))
    if name == "cifar10":
        return (Cifar10(dataset.root, True, dataset.download, augment,
                        T.train_crop(dataset, pad=CIFAR_PADDING)) if train else None,
                Cifar10(dataset.root, False))
    common = dict(image_size=size, num_classes=dataset.num_classes, seed=seed,
                  noise=dataset.noise)
    # Training's noise bank is sized for its largest crop; validation's stays image_size's.
    train_common = {**common, "image_size": largest_train_size or size}
    return (Synthetic(dataset.train_size, train=True, augment=augment,
                      crop=T.train_crop(dataset), **train_common) if train
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
                                        sample_index=plan.sample_index,
                                        largest_train_size=plan.largest_train_size)
    # The one check the parent cannot make: it counts the images, which only building tells.
    if train_set is not None and len(train_set) < batches.global_batch:
        raise ConfigError(f"train.batch_size={batches.global_batch} is larger than the training "
                          f"set ({len(train_set)} images)")
    common = _loader_settings(dataset, world.local_world_size, accelerator,
                              torch.Generator().manual_seed(seed + 1000 * world.rank))
    train_sampler = None
    if train_set is not None:
        train_sampler = TrainSampler(len(train_set), world.rank, world.world_size, seed,
                                     ra_reps=int(dataset.ra_reps), micro_batch=batches.micro,
                                     accumulate_steps=batches.accumulate_steps,
                                     size_of_epoch=plan.train_size if plan.scheduled_sizes
                                     else None)
    val_sampler = ExactValSampler(len(val_set), world.rank, world.world_size)
    reuse = _reuse_batch_memory(plan, common, train_set or val_set, train_sampler, val_sampler,
                                world.local_world_size)
    train_loader = None
    if train_set is not None:
        # drop_last keeps every step's shape static (graph-compiling NPUs, torch.compile).
        train_loader = _loader(train_set, reuse, common, batch_size=batches.micro,
                               sampler=train_sampler, drop_last=True)
    val = _loader(val_set, reuse, common, batch_size=batches.val_per_rank, sampler=val_sampler,
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


def _reuse_batch_memory(plan: RunPlan, common: dict[str, Any], data: Dataset,
                        train_sampler: TrainSampler | None, val_sampler: ExactValSampler,
                        processes_on_node: int) -> bool:
    """dataset.reuse_batch_memory, turned off where /dev/shm cannot hold the pools."""
    dataset = plan.dataset
    pooled = (getattr(data, "collate", None) and common.get("persistent_workers")
              and dataset.reuse_batch_memory)
    if not pooled:
        return bool(dataset.reuse_batch_memory)
    needed = shm_per_process(plan, common["num_workers"], train_sampler, val_sampler)
    return pool_fits(needed, processes_on_node)


def shm_per_process(plan: RunPlan, workers: int, train_sampler: TrainSampler | None,
                    val_sampler: ExactValSampler) -> int:
    """The /dev/shm one process's batch pools hold: the training pool's batches of the training
    crop, and validation's of its own crop and batch (each loader prefetch_factor + 1 segments
    per worker, fewer where a pass deals a worker fewer batches). mode=eval has no training pool."""
    slots, batches = int(plan.dataset.prefetch_factor) + 1, plan.batches
    val_batches = math.ceil(len(val_sampler) / batches.val_per_rank)
    needed = pool_bytes(batches.val_per_rank, plan.val_crop_size, workers, slots, val_batches)
    if train_sampler is not None:  # drop_last: only whole micro-batches
        needed += pool_bytes(batches.micro, plan.largest_train_size, workers, slots,
                             len(train_sampler) // batches.micro)
    return needed


def shm_per_node(plan: RunPlan, train_images: int, val_images: int, workers: int) -> int:
    """What a node's processes' batch pools hold in /dev/shm (the largest rank's share of the
    validation set for each): the figure README.md gives for the recipe."""
    world = plan.cfg.world
    train = TrainSampler(train_images, 0, plan.world_size, plan.train.seed,
                         ra_reps=int(plan.dataset.ra_reps), micro_batch=plan.batches.micro,
                         accumulate_steps=plan.batches.accumulate_steps)
    val = ExactValSampler(val_images, 0, plan.world_size)
    return int(world.nproc_per_node) * shm_per_process(plan, workers, train, val)


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
