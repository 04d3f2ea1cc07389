"""dataset=synthetic: a learnable in-memory task, deterministic from the seed, needing no files.

Each class has a fixed smooth colour pattern; every sample is its class pattern plus Gaussian noise.
Training draws fresh noise each epoch (the augmentation), validation's noise is fixed.

The noise is a window of a small bank of precomputed noise fields, at an offset drawn from the
sample's seed: every pixel is still Gaussian, but a sample costs a hash instead of a random
number generator, and a batch is gathered and cast in a handful of tensor operations. On the CPU, where the loader
shares cores with the model, that keeps data generation under 1% of a training step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from imgtrain.data.samplers import item_parts
from imgtrain.data.transforms import TrainCrop, crop_in_memory, mix, train_crop_params

if TYPE_CHECKING:
    from imgtrain.data.augment import SampleAugment

NOISE_FIELDS = 8  # with every offset: 8 * image_size^2 distinct noise images


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, size: int, image_size: int, num_classes: int, seed: int, train: bool,
                 noise: float = 0.5, augment: SampleAugment | None = None,
                 crop: TrainCrop = TrainCrop(scale=None, hflip=0.0)) -> None:
        """`image_size`: the size of items that name none, and the largest any item may ask
        for (training under dataset.res_schedule: its largest)."""
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.train, self.noise, self.seed = train, noise, seed
        self.augment = augment if train else None
        # The patterns are made at image_size: by default (synthetic.yaml) no crop and no flip.
        self.crop = None if not train or crop.is_identity else crop
        generator = torch.Generator().manual_seed(seed)
        # Low-resolution random patterns, upsampled: smooth, so they survive the network's strides.
        coarse = torch.rand(num_classes, 3, 4, 4, generator=generator)
        self.coarse = coarse
        self.patterns = self._patterns(image_size)
        # Fields twice the image size: windows at different offsets share few pixels.
        self.fields = torch.randn(NOISE_FIELDS, 3, 2 * image_size, 2 * image_size,
                                  generator=generator) * (noise * 0.25 * 255)

    def __len__(self) -> int:
        return self.size

    def _patterns(self, size: int, labels: list[int] | None = None) -> torch.Tensor:
        """The patterns of `labels` (None: every class) at `size` px: the same coarse patterns
        at every size. Another size than image_size makes only its batch's (1000 classes at
        224 px are 600 MB)."""
        coarse = self.coarse if labels is None else self.coarse[labels]
        return torch.nn.functional.interpolate(
            coarse, size=(size, size), mode="bilinear", align_corners=False) * 255

    def _item(self, item: int | tuple) -> tuple[int, int, int]:
        """(label, noise seed, size): the sampler's per-epoch seed and size in training, a fixed
        seed and image_size otherwise."""
        index, seed, size = item_parts(item)
        seed = self.seed * 7919 + index if seed is None else seed
        return index % self.num_classes, seed, size or self.image_size

    def __getitem__(self, item: int | tuple) -> tuple[torch.Tensor, int]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (DataLoader calls this when it exists), in a few tensor ops.
        A batch's items share one size: an epoch's, from the sampler."""
        labels, seeds, sizes = zip(*(self._item(item) for item in items))
        size = sizes[0]
        patterns = (self.patterns[list(labels)] if size == self.image_size
                    else self._patterns(size, list(labels)))
        pixels = self._noise(seeds, size).add_(patterns).clamp_(0, 255)
        images = pixels.to(torch.uint8).unbind(0)
        if self.crop is not None:  # at the batch's size
            images = [crop_in_memory(image, *train_crop_params(size, size, seed, self.crop), size)
                      for image, seed in zip(images, seeds)]
        if self.augment is not None:  # per sample, each from its own seed
            images = [self.augment(image, seed) for image, seed in zip(images, seeds)]
        return list(zip(images, labels))

    def _noise(self, seeds: tuple[int, ...], size: int) -> torch.Tensor:
        """Each sample's noise: a `size` px window of a bank field at an offset that depends on
        its seed alone; the windows are views, copied once by the stack."""
        salt = 0 if self.train else 1 << 62  # validation draws from a different stream
        windows = []
        for seed in seeds:
            code = mix(seed ^ salt)
            top, left = (code >> 3) % size, (code >> 23) % size
            windows.append(self.fields[code % NOISE_FIELDS, :, top:top + size, left:left + size])
        return torch.stack(windows)
