"""dataset.reuse_batch_memory: DataLoader workers that fill the same shared-memory batches again.

A plain DataLoader worker puts every batch in a new shared-memory segment, whose pages the kernel
must find and zero as the worker writes them: ~7 ms for a batch of 64 images at 224 px on a 2-core
VM, about a tenth of the worker's time. Here each worker owns a few segments and refills them.

A segment is refilled only once nothing in the training process can see its last batch: the
loader marks a batch it yields as held, and a finalizer on the batch's storage frees the segment
when the last tensor, view or array over it is gone (on accelerators pin_memory has copied the
batch already, so it is freed as it is yielded). A worker that finds none of its segments free
falls back to a new one: it never waits and never overwrites.
The shared state is one int64 tensor, [generation, stamp of every worker's segments...]. A worker
stamps a segment with the generation when it fills it, and a segment is free when its stamp is
below the generation. A new pass over the loader sets the generation to 0 (no segment is free:
workers fall back) while the DataLoader finishes and drops the previous pass's batches, then
raises it above every stamp: that frees the segments of batches dropped unseen when a pass was
cut short, which no finalizer hears of, and only those.
"""
from __future__ import annotations

import logging
import shutil
import weakref
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, get_worker_info

Batch = tuple[torch.Tensor, torch.Tensor]
HELD = 2**62  # a stamp above every generation: in the training process's hands
SHM = "/dev/shm"
log = logging.getLogger("imgtrain")


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, where DataLoader workers put their batches (None: no such mount)."""
    try:
        return shutil.disk_usage(SHM).free
    except OSError:
        return None


def pool_bytes(batch_size: int, crop: int, workers: int, slots_per_worker: int,
               batches_per_pass: int) -> int:
    """The most /dev/shm one loader's pool holds: each worker's segments, one for each batch the
    DataLoader deals it in a pass (batch i goes to worker i % workers) up to slots_per_worker,
    each a batch of uint8 crops and int64 labels. A segment is made when first claimed, so a
    worker dealt fewer batches than it has slots (a short validation set) makes fewer."""
    segments = sum(min(slots_per_worker, len(range(worker, batches_per_pass, workers)))
                   for worker in range(workers))
    return segments * batch_size * (3 * crop * crop + 8)


def pool_fits(per_process_bytes: int, processes_on_node: int) -> bool:
    """Whether every process's pools (`per_process_bytes` each) fit in the free /dev/shm.

    The pools stay mapped for the run: at the recipe's size about 2.5 GB per process, 20 GB for
    8 (README.md, "/dev/shm"). Docker's default /dev/shm is 64 MB and many clusters give 8 GB,
    where workers die with SIGBUS. Logs one warning line when they do not fit.
    """
    free = shm_free_bytes()
    if free is None:
        return True
    needed = per_process_bytes * processes_on_node
    if needed <= free:
        return True
    log.warning("warning: dataset.reuse_batch_memory needs ~%.1f GB of %s for %d process(es) and "
                "%.1f GB is free; using plain batches instead (give the container more %s, e.g. "
                "docker --shm-size, or lower dataset.workers or prefetch_factor)", needed / 1e9, SHM,
                processes_on_node, free / 1e9, SHM)
    return False


class BatchPool:
    """Per-worker shared-memory batch buffers, and the flags that say which ones are in use."""

    def __init__(self, workers: int, slots_per_worker: int) -> None:
        self.slots_per_worker = slots_per_worker
        self.state = torch.zeros(1 + workers * slots_per_worker, dtype=torch.int64).share_memory_()
        self.state[0] = 1
        self._buffers: dict[int, Batch] = {}  # slot -> (flat uint8 pixels, labels); in workers

    def __getstate__(self) -> dict[str, Any]:  # workers started by spawn get no buffers
        return {**self.__dict__, "_buffers": {}}

    def pause(self) -> int:
        """Stop workers claiming segments; returns the generation in force until now."""
        generation = int(self.state[0])
        self.state[0] = 0
        return generation

    def resume(self, generation: int) -> None:
        self.state[0] = generation

    def collate(self, batch: list[tuple[torch.Tensor, int]], fallback: Callable[[list], Batch]
                ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """(images NCHW in NHWC memory, labels, segment): the batch written into a free segment.

        segment is the segment's index in `state`, or None where `fallback` made the batch
        (outside a worker, or none of the worker's segments free).
        """
        worker = get_worker_info()
        claimed = self._claim(worker.id) if worker is not None else None
        if claimed is None:
            return (*fallback(batch), None)
        images, labels = self._buffer(claimed, batch)
        torch.stack([image.permute(1, 2, 0) for image, _ in batch], out=images)
        labels.copy_(torch.as_tensor([label for _, label in batch]))
        return images.permute(0, 3, 1, 2), labels, claimed

    def hold(self, index: int, images: torch.Tensor) -> None:
        """The consumer has the batch in segment `index`: free it once `images`' memory is unused."""
        self.state[index] = HELD
        weakref.finalize(images.untyped_storage(), self.release, index).atexit = False

    def release(self, index: int) -> None:
        self.state[index] = 0

    def _claim(self, worker_id: int) -> int | None:
        generation = int(self.state[0])
        first = 1 + worker_id * self.slots_per_worker
        stamps = self.state[first:first + self.slots_per_worker].tolist()
        for offset, stamp in enumerate(stamps):
            if stamp < generation:
                self.state[first + offset] = generation
                return first + offset
        return None

    def _buffer(self, index: int, batch: list[tuple[torch.Tensor, int]]) -> Batch:
        """Views of the segment's buffers shaped for this batch.

        A segment is flat bytes, made for the largest batch it has held: a smaller one (the
        last batch of a split, or an epoch's smaller crop under dataset.res_schedule) fills its
        first bytes, and only a larger one makes a new segment. A ramp up to larger crops then
        replaces each segment once per size, and a changing size never leaves a segment behind
        that could not hold the next batch.
        """
        channels, height, width = batch[0][0].shape
        size = len(batch)
        needed = size * height * width * channels
        pixels, labels = self._buffers.get(index, (None, None))
        if pixels is None or pixels.numel() < needed or labels.numel() < size:
            held = (0, 0) if pixels is None else (pixels.numel(), labels.numel())
            pixels = torch.empty(max(needed, held[0]), dtype=torch.uint8).share_memory_()
            labels = torch.empty(max(size, held[1]), dtype=torch.int64).share_memory_()
            self._buffers[index] = pixels, labels
        return pixels[:needed].view(size, height, width, channels), labels[:size]


class PooledLoader(DataLoader):
    """A DataLoader over a BatchPool: yields (images, labels) and tells the pool who holds what."""

    def __init__(self, dataset: Any, pool: BatchPool, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.pool = pool

    def __iter__(self) -> Iterator[Batch]:
        # With persistent workers the DataLoader's reset waits until every worker has finished the
        # previous pass's batches, and drops those nobody took. Claims made in that time would be
        # stamped with the old generation: none are allowed until it is over.
        generation = self.pool.pause()
        try:
            batches = super().__iter__()
        except BaseException:
            # Workers must not wait for a resume that never comes; their claims are for
            # a pass that did not start, so the old generation stays.
            self.pool.resume(generation)
            raise
        self.pool.resume(generation + 1)
        # map, not a generator: nothing here keeps a yielded batch (and its segment) alive.
        return map(self._hand_over, batches)

    def _hand_over(self, batch: tuple[torch.Tensor, torch.Tensor, int | None]) -> Batch:
        images, labels, segment = batch
        if segment is not None:
            if images.is_pinned():  # pin_memory copied the batch out of its segment
                self.pool.release(segment)
            else:
                self.pool.hold(segment, images)
                labels = labels.clone()  # 8 bytes an image: simpler to copy than to track
        return images, labels
