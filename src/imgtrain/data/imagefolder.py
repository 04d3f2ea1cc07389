"""dataset=imagenet: an ImageFolder tree decoded straight to uint8.

Workers do only uint8 work: decode, crop, resize, flip. A JPEG is decoded by libjpeg-turbo
(`torchvision.io.decode_jpeg`) straight into an RGB tensor; when the random crop is at least twice
the output size, PIL's `draft()` lets libjpeg downscale by 2, 4 or 8 inside the decoder instead.
Resizing is torch's antialiased bilinear on uint8 (a vectorised kernel, about 3x faster than PIL's
and within one grey level of it). Float conversion and normalisation happen on the device.
"""
from __future__ import annotations

import io
import logging
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision without its image extension: PIL decodes everything
    decode_jpeg = None
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from imgtrain.data import transforms as T
from imgtrain.errors import ConfigError

log = logging.getLogger("imgtrain")
# torchvision 0.29 deprecates its decoders in favour of TorchCodec, once per call site and worker;
# they remain libjpeg-turbo, and `decode` falls back to PIL the day they are gone.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                        "TorchVision are deprecated", category=DeprecationWarning)


def check_layout(root: str) -> list[str]:
    """The class names under root/train, after checking that train/ and val/ agree."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"dataset.root does not exist: {base}")
    if not any(base.iterdir()):
        raise ConfigError(f"dataset.root is empty: {base}")
    classes = {}
    for split in ("train", "val"):
        folder = base / split
        if not folder.is_dir():
            raise ConfigError(f"dataset.root {base} has no {split}/ folder (expected "
                              f"{split}/<class>/<image> as in ImageNet's layout)")
        try:
            classes[split] = find_classes(str(folder))[0]
        except FileNotFoundError:
            raise ConfigError(f"{folder} has no class folders") from None
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))[:3]
        only_val = sorted(set(classes["val"]) - set(classes["train"]))[:3]
        raise ConfigError(f"class folders differ between {base}/train and {base}/val "
                          f"(only in train: {only_train}, only in val: {only_val})")
    return classes["train"]


class JpegFolder(torch.utils.data.Dataset):
    """One split of an ImageFolder tree; items are uint8 CHW tensors of image_size x image_size."""

    def __init__(self, root: str, split: str, image_size: int, train: bool,
                 skip_bad_images: bool = False) -> None:
        folder = Path(root).expanduser() / split
        classes, class_to_idx = find_classes(str(folder))
        try:
            self.samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as exc:
            raise ConfigError(f"{folder}: {exc}") from None
        self.classes, self.image_size, self.train = classes, image_size, train
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                return self._load(path, seed), label
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                if not self.skip_bad_images:
                    raise ConfigError(f"corrupt or truncated image file: {path} ({exc}); set "
                                      "dataset.skip_bad_images=true to skip such files") from None
                log.warning("skipping bad image file %s (%s)", path, exc)
        raise ConfigError(f"no readable image in {self.samples[0][0]}'s dataset")

    def _load(self, path: str, seed: int) -> torch.Tensor:
        data = read_bytes(path)
        with Image.open(io.BytesIO(data)) as image:  # parses the header only
            if not self.train:
                return centre_crop(resize_uint8(decode(data, image), *T.resize_size(
                    *image.size, T.val_resize(self.image_size))), self.image_size)
            crop = self._random_resized_crop(data, image, random.Random(seed))
        return crop.flip(-1) if random.Random(seed + 1).random() < 0.5 else crop

    def _random_resized_crop(self, data: bytearray, image: Image.Image,
                             rng: random.Random) -> torch.Tensor:
        width, height = image.size
        left, top, w, h = T.random_resized_crop_box(width, height, rng)
        size = self.image_size
        if image.format != "JPEG" or min(w, h) < 2 * size:
            pixels = decode(data, image)[:, top:top + h, left:left + w]
            return resize_uint8(pixels, size, size)
        # The crop has pixels to spare: libjpeg decodes at 1/2, 1/4 or 1/8 scale, and PIL's
        # resize takes the crop box in the smaller image's fractional coordinates.
        image.draft("RGB", (max(1, width * size // w), max(1, height * size // h)))
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=box)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def read_bytes(path: str) -> bytearray:
    """The file's bytes in a writable buffer, so torch can wrap them without a copy or a warning."""
    with open(path, "rb") as f:
        data = bytearray(f.seek(0, io.SEEK_END))
        f.seek(0)
        f.readinto(data)
    return data


def decode(data: bytearray, image: Image.Image) -> torch.Tensor:
    """RGB uint8 CHW (a view of HWC memory): libjpeg-turbo directly, PIL for other formats."""
    if image.format == "JPEG" and decode_jpeg is not None:
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # unusual or damaged JPEG: PIL decodes it or raises OSError, which callers handle
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def resize_uint8(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """torchvision's Resize on a uint8 CHW tensor: antialiased bilinear, kept in uint8."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uint8 interpolate is supported; older torch warns anyway
        # A compact NHWC copy of the crop first: libjpeg's output is HWC, and the uint8 antialias
        # kernel runs about twice as fast on a dense channels-last block as on a strided view.
        compact = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.interpolate(compact, size=(height, width), mode="bilinear",
                                               antialias=True)[0]


def centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop(size) for an image at least `size` on each side."""
    height, width = image.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image[:, top:top + size, left:left + size]
