"""mode=bench_data: how fast the training loader alone delivers batches, with no model.

It iterates `loaders.train` exactly as training would (same sampler, workers, prefetching and
pinning) but does nothing with the batches, so the number is the input pipeline's ceiling:
if it is below the model's images/sec, training is input-bound.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from imgtrain.data import Loaders
from imgtrain.distributed import World
from imgtrain.logger import RunLogger
from imgtrain.results import identity


def _batches(loaders: Loaders) -> Iterator[torch.Tensor]:
    """Training batches forever, epoch after epoch, as the trainer draws them."""
    epoch = 0
    while True:
        loaders.train_sampler.set_epoch(epoch)
        for images, _target in loaders.train:
            yield images
        epoch += 1


def time_loader(loaders: Loaders, warmup_batches: int, timed_batches: int) -> tuple[int, float]:
    """(images, seconds) over `timed_batches` batches drawn after `warmup_batches` untimed ones.

    The warm-up starts the workers and fills the prefetch queue and the page cache, so the timed
    window measures steady-state throughput, not process start-up.
    """
    batches = _batches(loaders)
    for _ in range(warmup_batches):
        next(batches)
    images, start = 0, time.perf_counter()
    for _ in range(timed_batches):
        images += next(batches).shape[0]
    return images, time.perf_counter() - start


def bench_loader(cfg: dict[str, Any], loaders: Loaders, world: World,
                 logger: RunLogger) -> dict[str, Any]:
    """Time the training loader for train.steps_per_epoch batches; write results.json."""
    train_cfg = cfg["train"]
    timed_batches = train_cfg["steps_per_epoch"] or len(loaders.train)
    warmup_batches = max(1, train_cfg["fps_warmup_steps"])
    logger.info("bench_data: %d warm-up and %d timed batches of %d images, %d workers per rank",
                warmup_batches, timed_batches, loaders.train.batch_size,
                loaders.train.num_workers)
    images, seconds = time_loader(loaders, warmup_batches, timed_batches)
    # Ranks run identical loaders on their own cores; rank 0's rate times the world size avoids a
    # collective here (nccl would need device tensors for it).
    images_per_sec = images * world.world_size / max(seconds, 1e-9)
    results = {**identity(cfg, world.world_size), "status": "completed",
               "loader_images_per_sec": images_per_sec, "loader_images": images,
               "loader_seconds": seconds, "loader_batches": timed_batches,
               "loader_workers": loaders.train.num_workers,
               "per_rank_batch_size": loaders.per_rank_batch,
               "image_size": cfg["dataset"]["image_size"]}
    logger.info("bench_data: %.1f images/s (%d images in %.2f s on rank 0)", images_per_sec,
                images, seconds)
    logger.results(results)
    return results
