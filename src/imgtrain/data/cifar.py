"""dataset=cifar10: the cifar-10-batches-py pickle layout, without checksum checks."""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from imgtrain.data import transforms as T
from imgtrain.errors import ConfigError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


def find_root(root: str, download: bool) -> Path:
    """root itself or root/cifar-10-batches-py, downloading there first if asked."""
    base = Path(root).expanduser()
    for candidate in (base, base / FOLDER):
        if (candidate / TEST_FILES[0]).is_file():
            return candidate
    if download:
        from torchvision.datasets import CIFAR10
        CIFAR10(str(base), train=True, download=True)
        return base / FOLDER
    if not base.exists():
        raise ConfigError(f"dataset.root does not exist: {base} (add dataset.download=true to fetch "
                          "CIFAR-10)")
    raise ConfigError(f"no CIFAR-10 batches ({FOLDER}/test_batch) in dataset.root {base}; add "
                      "dataset.download=true to fetch them")


def _load_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, list[int]]:
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            continue  # a subset copy may hold fewer training batches
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch.get("labels", batch.get("fine_labels", [])))
        except Exception as exc:
            raise ConfigError(f"corrupt CIFAR-10 batch file: {path} ({type(exc).__name__})") from None
    if not images:
        raise ConfigError(f"no CIFAR-10 batch files ({', '.join(names)}) in {folder}")
    return np.concatenate(images), labels


def label_names(folder: Path) -> list[str]:
    """batches.meta's label names (CIFAR-10's own ten when a subset copy lacks the file)."""
    try:
        with open(folder / "batches.meta", "rb") as f:
            names = pickle.load(f, encoding="latin1")["label_names"]
        return [str(name) for name in names]
    except (OSError, KeyError, pickle.UnpicklingError, EOFError, TypeError):
        return list(LABEL_NAMES)


class Cifar10(torch.utils.data.Dataset):
    """CIFAR-10 as uint8 CHW tensors; training adds a 4-pixel padded random crop and a flip."""

    num_classes = 10

    def __init__(self, root: str, train: bool, download: bool = False) -> None:
        folder = find_root(root, download)
        data, labels = _load_batches(folder, TRAIN_FILES if train else TEST_FILES)
        self.images, self.labels = torch.from_numpy(data), labels
        self.train = train
        self.classes = label_names(folder)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        image = self.images[index]
        if self.train:
            rng = random.Random(seed)
            image = T.random_flip(T.pad_crop(image, 32, 4, rng), rng)
        return image.contiguous(), self.labels[index]
