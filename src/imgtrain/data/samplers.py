"""Samplers: a resumable, per-epoch-seeded training sampler and an exact validation sampler."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DistributedSampler, Sampler

from imgtrain.data.transforms import sample_seed


class TrainSampler(DistributedSampler):
    """DistributedSampler whose items carry their augmentation seed, and which can skip ahead.

    Yields (index, seed) pairs: the seed depends only on (train seed, epoch, index), so the same
    sample gets the same crop whichever worker or rank decodes it. `skip(n)` drops this rank's
    first n samples of the epoch without touching them, for mid-epoch resume.

    ra_reps > 1 is repeated augmentation (torchvision's RASampler, references/classification):
    each image of the epoch's shuffle appears ra_reps times in a row, the ranks take interleaved
    slices of that list, and each still gets len(dataset) // world_size samples, so an epoch
    keeps its length and sees about len / ra_reps distinct images.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int,
                 ra_reps: int = 1) -> None:
        super().__init__(range(dataset_len), num_replicas=world_size, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.dataset_len, self.ra_reps = dataset_len, ra_reps
        self.samples_to_skip = 0

    def skip(self, samples: int) -> None:
        self.samples_to_skip = samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.ra_reps == 1:
            indices = list(super().__iter__())[self.samples_to_skip:]
            return iter([(index, sample_seed(self.seed, self.epoch, index)) for index in indices])
        return iter(self._repeated()[self.samples_to_skip:])

    def _repeated(self) -> list[tuple[int, int]]:
        """This rank's (index, seed) pairs under repeated augmentation."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_len, generator=generator).tolist()
        # RASampler pads the repeated list to a multiple of the world size, but with ra_reps >= 2
        # the first len // world_size of each rank's slice never reach the padding.
        repeated = [(index, repeat) for index in order for repeat in range(self.ra_reps)]
        mine = repeated[self.rank::self.num_replicas][:self.num_samples]
        # Each repeat its own seed, or the copies would be the same crop; repeat 0 keeps the
        # seed it has without repeated augmentation.
        return [(index, sample_seed(self.seed, self.epoch, index + self.dataset_len * repeat))
                for index, repeat in mine]

    def __len__(self) -> int:
        return self.num_samples - self.samples_to_skip


class ExactValSampler(Sampler[int]):
    """Every validation sample on exactly one rank: no padding duplicates, no drops."""

    def __init__(self, dataset_len: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
