"""Samplers: a resumable, per-epoch-seeded training sampler and an exact validation sampler."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import DistributedSampler, Sampler

from imgtrain.data.transforms import sample_seed


class TrainSampler(DistributedSampler):
    """DistributedSampler whose items carry their augmentation seed, and which can skip ahead.

    Yields (index, seed) pairs: the seed depends only on (train seed, epoch, index), so the same
    sample gets the same crop whichever worker or rank decodes it. `skip(n)` drops this rank's
    first n samples of the epoch without touching them, for mid-epoch resume.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int) -> None:
        super().__init__(range(dataset_len), num_replicas=world_size, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.samples_to_skip = 0

    def skip(self, samples: int) -> None:
        self.samples_to_skip = samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.samples_to_skip:]
        return iter([(index, sample_seed(self.seed, self.epoch, index)) for index in indices])

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
