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
stamps a segment with the generation when it fills it; each new pass over the loader raises the
generation, which frees the segments of batches that the DataLoader dropped, unseen, when the
previous pass was cut short (a finalizer never hears of those).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, get_worker_info

Batch = tuple[torch.Tensor, torch.Tensor]
HELD = 2**62  # a stamp above every generation: in the training process's hands


class BatchPool:
    """Per-worker shared-memory batch buffers, and the flags that say which ones are in use."""

    def __init__(self, workers: int, slots_per_worker: int) -> None:
        self.slots_per_worker = slots_per_worker
        self.state = torch.zeros(1 + workers * slots_per_worker, dtype=torch.int64).share_memory_()
        self.state[0] = 1
        self._buffers: dict[int, Batch] = {}  # slot -> (NHWC images, labels); filled in workers

    def __getstate__(self) -> dict[str, Any]:  # workers started by spawn get no buffers
        return {**self.__dict__, "_buffers": {}}

    def new_pass(self) -> None:
        self.state[0] += 1

    def collate(self, batch: list[tuple[torch.Tensor, int]],
                fallback: Callable[[list], Batch]) -> tuple[torch.Tensor, torch.Tensor, int | None]:
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
        """Views of the segment's buffers sized for this batch (the last one may be smaller)."""
        height, width = batch[0][0].shape[1:]
        channels = batch[0][0].shape[0]
        images, labels = self._buffers.get(index, (None, None))
        if images is None or images.shape[0] < len(batch) or images.shape[1:] != (height, width, channels):
            images = torch.empty(len(batch), height, width, channels, dtype=torch.uint8).share_memory_()
            labels = torch.empty(len(batch), dtype=torch.int64).share_memory_()
            self._buffers[index] = images, labels
        return images[:len(batch)], labels[:len(batch)]


class PooledLoader(DataLoader):
    """A DataLoader over a BatchPool: yields (images, labels) and tells the pool who holds what."""

    def __init__(self, dataset: Any, pool: BatchPool, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.pool = pool

    def __iter__(self) -> Iterator[Batch]:
        # Before the DataLoader restarts its workers: batches of a pass cut short are dropped by
        # its reset, never yielded, so their segments may be reused from here on.
        self.pool.new_pass()
        for images, labels, segment in super().__iter__():
            if segment is not None:
                if images.is_pinned():  # pin_memory copied the batch out of its segment
                    self.pool.release(segment)
                else:
                    self.pool.hold(segment, images)
                    labels = labels.clone()  # 8 bytes an image: simpler to copy than to track
            yield images, labels
            del images, labels  # the batch is the consumer's alone: its segment frees when they let go
