"""dataset=cifar10: the cifar-10-batches-py pickle layout, without checksum checks."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from imgtrain.data import transforms as T
from imgtrain.data.augment import SampleAugment
from imgtrain.data.samplers import item_parts
from imgtrain.errors import ConfigError

FOLDER = "cifar-10-batches-py"
PADDING = 4  # dataset.scale=null: the padded random crop of every CIFAR ResNet recipe
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


# What the CIFAR-10 pickles need, and nothing that can run code: numpy's array reconstruction
# (numpy.core for the official Python 2 files, numpy._core for files re-packed with numpy 2), and
# _codecs.encode, which Python 3 uses for bytes in protocol-2 pickles. Dicts, lists, strings and
# numbers are pickle opcodes, not classes.
_ALLOWED_GLOBALS = {
    *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
    *((f"numpy.{core}.multiarray", "scalar") for core in ("core", "_core")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Loads only plain data and numpy arrays: a crafted file cannot name a function to call."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which CIFAR-10 files "
                                         "never do")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        data = _CifarUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    if not isinstance(data, dict):
        raise pickle.UnpicklingError(f"it holds a {type(data).__name__}, not a dict of batches")
    return data


def _download(base: Path) -> None:
    from torchvision.datasets import CIFAR10
    try:
        CIFAR10(str(base), train=True, download=True)
    except OSError as exc:  # URLError and socket errors are OSErrors
        raise ConfigError(f"dataset.download=true could not fetch CIFAR-10 into {base} "
                          f"({type(exc).__name__}: {getattr(exc, 'reason', exc)}); without a "
                          "network, copy cifar-10-batches-py there and drop dataset.download")\
            from None


def find_root(root: str, download: bool) -> Path:
    """root itself or root/cifar-10-batches-py, downloading there first if asked."""
    base = Path(root).expanduser()
    for candidate in (base, base / FOLDER):
        if (candidate / TEST_FILES[0]).is_file():
            return candidate
    if download:
        _download(base)
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
            batch = _unpickle(path)
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch.get("labels", batch.get("fine_labels", [])))
        except pickle.UnpicklingError as exc:
            raise ConfigError(f"refusing CIFAR-10 batch file {path}: {exc}") from None
        except Exception as exc:
            raise ConfigError(f"corrupt CIFAR-10 batch file: {path} ({type(exc).__name__})") from None
    if not images:
        raise ConfigError(f"no CIFAR-10 batch files ({', '.join(names)}) in {folder}")
    return np.concatenate(images), labels


def label_names(folder: Path) -> list[str]:
    """batches.meta's label names (CIFAR-10's own ten when a subset copy lacks the file)."""
    path = folder / "batches.meta"
    if not path.is_file():
        return list(LABEL_NAMES)
    try:
        return [str(name) for name in _unpickle(path)["label_names"]]
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"refusing CIFAR-10 file {path}: {exc}") from None
    except (OSError, KeyError, EOFError, TypeError, ValueError):
        return list(LABEL_NAMES)


class Cifar10(torch.utils.data.Dataset):
    """CIFAR-10 as uint8 CHW tensors; training crops and flips as `crop` says (the defaults of
    dataset=cifar10: a 4-pixel padded random crop and a flip)."""

    num_classes = 10
    image_size = 32

    def __init__(self, root: str, train: bool, download: bool = False,
                 augment: SampleAugment | None = None,
                 crop: T.TrainCrop = T.TrainCrop(scale=None, pad=PADDING)) -> None:
        folder = find_root(root, download)
        data, labels = _load_batches(folder, TRAIN_FILES if train else TEST_FILES)
        self.images, self.labels = torch.from_numpy(data), labels
        self.train, self.augment, self.crop = train, augment, crop
        self.classes = label_names(folder)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple) -> tuple[torch.Tensor, int]:
        """`item`: an index, or TrainSampler's (index, seed, size): a training crop's seed, and
        the size it is resized to (dataset.res_schedule's; None: CIFAR's own 32 px)."""
        index, seed, size = item_parts(item)
        image = self.images[index]
        if self.train:
            crop_size = image.shape[-1]  # CIFAR's 32 px, whatever dataset.image_size says
            box, flip = T.train_crop_params(crop_size, crop_size, 0 if seed is None else seed,
                                            self.crop)
            image = T.crop_in_memory(image, box, flip, crop_size)
            if size is not None and size != crop_size:  # dataset.res_schedule's
                image = T.resize_uint8(image, size, size)
            if self.augment is not None:
                image = self.augment(image, seed)
        return image.contiguous(), self.labels[index]
