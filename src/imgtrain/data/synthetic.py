"""dataset=synthetic: a learnable in-memory task, deterministic from the seed, needing no files.

Each class has a fixed smooth colour pattern; every sample is its class pattern plus Gaussian noise.
Training draws fresh noise each epoch (the augmentation), validation's noise is fixed.
"""
from __future__ import annotations

import torch


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, size: int, image_size: int, num_classes: int, seed: int, train: bool,
                 noise: float = 0.5) -> None:
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.train, self.noise, self.seed = train, noise, seed
        generator = torch.Generator().manual_seed(seed)
        # Low-resolution random patterns, upsampled: smooth, so they survive the network's strides.
        coarse = torch.rand(num_classes, 3, 4, 4, generator=generator)
        self.patterns = torch.nn.functional.interpolate(
            coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, self.seed * 7919 + item)
        label = index % self.num_classes
        generator = torch.Generator().manual_seed(seed + (0 if self.train else 1 << 40))
        noise = torch.randn(3, self.image_size, self.image_size, generator=generator)
        pixels = (self.patterns[label] + self.noise * 0.25 * noise) * 255
        return pixels.clamp_(0, 255).to(torch.uint8), label
