"""Samplers: a resumable, per-epoch-seeded training sampler and an exact validation sampler."""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler, Sampler

from imgtrain.data.transforms import sample_seed


def item_parts(item: int | tuple) -> tuple[int, int | None, int | None]:
    """(index, seed, size) of a dataset item: TrainSampler's (index, seed, size), an (index,
    seed) pair, or a bare index (validation's); a part not given is None (the dataset's own)."""
    if not isinstance(item, tuple):
        return item, None, None
    index, seed, *size = item
    return index, seed, size[0] if size else None


class TrainSampler(DistributedSampler):
    """DistributedSampler whose items carry their augmentation seed and size, and which can resume.

    Yields (index, seed) pairs: the seed depends only on (train seed, epoch, index), so the same
    sample gets the same crop whichever worker or rank decodes it. Under dataset.res_schedule
    the items are (index, seed, size), the size the epoch's training crop (`size_of_epoch`, the
    plan's train_size), so loader workers, persistent ones included, keep no state of their own. `resume_at(step)` drops
    this rank's samples of the epoch's first steps without touching them, for mid-epoch resume.

    ra_reps > 1 is repeated augmentation (torchvision's RASampler, references/classification):
    the epoch takes the first ~len / ra_reps images of its shuffle, each ra_reps times with its own
    seed, and keeps its length. torchvision deals that list to the ranks one item each, so on
    `ra_reps` or more GPUs each copy goes to another GPU; with fewer ranks, or with gradient
    accumulation, that dealing would put copies side by side in one micro-batch (MixUp/CutMix
    pair neighbours, and BatchNorm would see fewer distinct images). Here the copies are dealt
    over the step's micro-batches (ranks x accumulation micro-steps) and, where a step has fewer
    micro-batches than ra_reps, over the micro-batches of the next steps: one copy of an image
    per micro-batch, always. Each global step's images do not depend on the world size as long
    as every step holds ra_reps micro-batches or more (then they are torchvision's), and a resume
    with another layout keeps what earlier runs did (see `resume_at`).
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int,
                 ra_reps: int = 1, micro_batch: int = 1, accumulate_steps: int = 1,
                 size_of_epoch: Callable[[int], int] | None = None) -> None:
        """`size_of_epoch`: the training crop of a 0-based epoch; None (no dataset.res_schedule):
        items are (index, seed) pairs, and the dataset crops to its own size."""
        super().__init__(range(dataset_len), num_replicas=world_size, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.dataset_len, self.ra_reps = dataset_len, ra_reps
        self.size_of_epoch = size_of_epoch
        self.micro_batch, self.accumulate_steps = micro_batch, accumulate_steps
        self.micro_batches_per_step = world_size * accumulate_steps
        self.global_batch = micro_batch * self.micro_batches_per_step
        self.steps = self.num_samples // (micro_batch * accumulate_steps)  # full steps an epoch
        self.first_step = 0
        self.earlier_layouts: list[tuple[int, int]] = []

    def resume_at(self, step: int, earlier_layouts: Sequence[Sequence[int]] = ()) -> None:
        """Start the epoch at optimizer step `step`.

        `earlier_layouts` says how the runs that trained this epoch's first steps laid them out:
        (first step, micro-batches per step) each. Only repeated augmentation needs it, where the
        steps of a run with fewer micro-batches than ra_reps hold other images than this run's
        would; empty: the earlier steps were laid out as this run lays them out.
        """
        self.first_step = step
        self.earlier_layouts = [(int(first), int(count)) for first, count in earlier_layouts
                                if first < step]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        if self.ra_reps == 1:
            skip = self.first_step * self.micro_batch * self.accumulate_steps
            indices = list(super().__iter__())[skip:]
            items = [(index, sample_seed(self.seed, self.epoch, index)) for index in indices]
        else:
            items = self._repeated()
        if self.size_of_epoch is None:
            return iter(items)
        size = self.size_of_epoch(self.epoch)
        return iter([(index, seed, size) for index, seed in items])

    def __len__(self) -> int:
        if self.ra_reps == 1:
            return self.num_samples - self.first_step * self.micro_batch * self.accumulate_steps
        return (self.steps - self.first_step) * self.micro_batch * self.accumulate_steps

    def _layouts(self) -> list[tuple[int, int]]:
        """(first step, micro-batches per step) of each run's part of the epoch, this run's last."""
        this = self.micro_batches_per_step
        layouts: list[tuple[int, int]] = []
        # Steps that no layout was recorded for (an older checkpoint's) were laid out as here.
        for first, count in [(0, this), *self.earlier_layouts, (self.first_step, this)]:
            if layouts and layouts[-1][0] == first:
                layouts.pop()
            # A run resumed with the layout it stopped with goes on with it, as if never stopped.
            if not layouts or layouts[-1][1] != count:
                layouts.append((first, count))
        return layouts

    def _repeated(self) -> list[tuple[int, int]]:
        """This rank's (index, seed) pairs under repeated augmentation, from `first_step` on."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_len, generator=generator)
        queue = CopyQueue()
        layouts = self._layouts()
        ends = [first for first, _ in layouts[1:]] + [self.steps]
        for (first, count), end in zip(layouts, ends):
            # Each run laid out the rest of the epoch; what it did not train goes back.
            steps = deal(queue, self.steps - first, count, self.global_batch // count,
                         self.ra_reps)
            if end < self.steps:
                queue.put_back(torch.cat([batch for step in steps[end - first:]
                                          for batch in step]))
        steps = steps[self.first_step - layouts[-1][0]:]
        mine = [step[micro_step * self.num_replicas + self.rank] for step in steps
                for micro_step in range(self.accumulate_steps)]
        positions = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.long)
        # Position p of torchvision's list (each image ra_reps times in a row) is copy
        # p % ra_reps of image p // ra_reps; a layout never reaches past the list's end, since it
        # runs at most ra_reps - 1 steps' worth beyond one epoch and a global batch <= len.
        indices = order[positions // self.ra_reps].tolist()
        repeats = (positions % self.ra_reps).tolist()
        # Each repeat its own seed, or the copies would be the same crop; repeat 0 keeps the
        # seed it has without repeated augmentation.
        return [(index, sample_seed(self.seed, self.epoch, index + self.dataset_len * repeat))
                for index, repeat in zip(indices, repeats)]


class CopyQueue:
    """The positions of torchvision's repeated list not laid out yet, in order: the untrained
    rest of a group cut short by a resume (`front`), then every position from `next_position`."""

    def __init__(self) -> None:
        self.front = torch.zeros(0, dtype=torch.long)
        self.next_position = 0

    def take(self, count: int) -> torch.Tensor:
        fresh = max(0, count - len(self.front))
        items = torch.cat([self.front[:count],
                           torch.arange(self.next_position, self.next_position + fresh)])
        self.front, self.next_position = self.front[count:], self.next_position + fresh
        return items

    def put_back(self, items: torch.Tensor) -> None:
        self.front = torch.cat([items, self.front]).sort().values


def deal(queue: CopyQueue, steps: int, micro_batches: int, micro_batch: int,
         ra_reps: int) -> list[list[torch.Tensor]]:
    """Lay out an epoch's last `steps` optimizer steps of `micro_batches` micro-batches each.

    Steps go in groups of ceil(ra_reps / micro_batches), enough micro-batches for one copy of an
    image each (the last group also takes the steps left over). A group takes the queue's next
    items, where an image's copies sit together, and deals them round-robin to its micro-batches,
    so those copies land in different ones. An epoch shorter than one group trains part of it;
    the rest goes back to the queue. Returns each step's micro-batches (positions).
    """
    group_steps = math.ceil(ra_reps / micro_batches)
    laid_out: list[list[torch.Tensor]] = []
    while len(laid_out) < steps:
        left = steps - len(laid_out)
        size = left if group_steps <= left < 2 * group_steps else group_steps
        group_micro_batches = size * micro_batches
        items = queue.take(group_micro_batches * micro_batch)
        dealt = list(items.view(micro_batch, group_micro_batches).t())  # row k: items[k::G]
        taken = min(size, left)
        laid_out += [dealt[step * micro_batches:(step + 1) * micro_batches]
                     for step in range(taken)]
        if taken < size:
            queue.put_back(torch.cat(dealt[taken * micro_batches:]))
    return laid_out


class ExactValSampler(Sampler[int]):
    """Every validation sample on exactly one rank: no padding duplicates, no drops."""

    def __init__(self, dataset_len: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
