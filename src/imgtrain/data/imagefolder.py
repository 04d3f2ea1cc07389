"""dataset=imagenet: an ImageFolder tree decoded straight to uint8.

Workers do only uint8 work: decode, crop, resize, flip (then dataset.auto_augment and
random_erase where set, data/augment.py). A JPEG's size comes from its frame header,
the crop is drawn from that, and libjpeg-turbo (`torchvision.io.decode_jpeg`) decodes the file
straight into an RGB tensor; when the crop is at least twice the output size, PIL's `draft()` lets
libjpeg downscale by 2, 4 or 8 inside the decoder instead. Resizing is torch's antialiased bilinear
on uint8 (a vectorised kernel, about 3x faster than PIL's and within one grey level of it). Batches
keep the decoder's HWC layout (channels_last); float conversion and normalisation happen on the
device.
"""
from __future__ import annotations

import io
import logging
import os
import re
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision without its image extension: PIL decodes everything
    decode_jpeg = None
from torchvision.datasets.folder import find_classes

from imgtrain.data import transforms as T
from imgtrain.data.augment import SampleAugment
from imgtrain.data.index import SampleIndex, list_split, load as load_index
from imgtrain.data.index_cache import prepare as prepare_index
from imgtrain.data.samplers import item_parts
from imgtrain.errors import ConfigError

log = logging.getLogger("imgtrain")
# torchvision 0.29 deprecates its decoders in favour of TorchCodec, once per call site and worker;
# they remain libjpeg-turbo, and `decode` falls back to PIL the day they are gone.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                        "TorchVision are deprecated", category=DeprecationWarning)


def _reason(exc: Exception) -> str:
    """Why an image did not load, without PIL's `<_io.BytesIO object at 0x...>` for the file
    (the path is already in the message)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL can read"
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", str(exc))


def check_layout(root: str, splits: tuple[str, ...] = ("train", "val"),
                 index_cache: Path | None = None,
                 builds_index: bool = True) -> tuple[list[str], dict[str, str]]:
    """The class names under root/<split>, after checking that the splits (train/ and val/;
    mode=eval reads val/ alone) agree, and each split's sample index (data/index.py) where
    `index_cache` is given: {split: the build's folder}, listed only if no cached one matches
    the tree (by the job's one builder, `builds_index`; the other processes wait for it)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"dataset.root does not exist: {base}; give your ImageNet-style folder "
                          "(train/<class>/*, val/<class>/*) with dataset.root=/path/to/it, or "
                          "try imgtrain without data: python run.py experiment=quickstart")
    classes, builds = {}, {}
    for split in splits:
        folder = base / split
        if not folder.is_dir():  # only now list the root: a cached run never does
            if not any(base.iterdir()):
                raise ConfigError(f"dataset.root is empty: {base}")
            raise ConfigError(f"dataset.root {base} has no {split}/ folder (expected "
                              f"{split}/<class>/<image> as in ImageNet's layout)")
        if index_cache is not None:
            builds[split] = prepare_index(str(folder), index_cache, builds_index)
            classes[split] = list(load_index(builds[split]).classes)
            continue
        try:
            classes[split] = find_classes(str(folder))[0]
        except FileNotFoundError:
            raise ConfigError(f"{folder} has no class folders") from None
    if len(classes) == 2 and classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))[:3]
        only_val = sorted(set(classes["val"]) - set(classes["train"]))[:3]
        raise ConfigError(f"class folders differ between {base}/train and {base}/val "
                          f"(only in train: {only_train}, only in val: {only_val})")
    return classes[splits[0]], builds


class JpegFolder(torch.utils.data.Dataset):
    """One split of an ImageFolder tree; items are uint8 CHW tensors of image_size x image_size.

    Its samples are a SampleIndex (data/index.py): arrays that every loader worker shares, never
    a Python object per sample, and a path is decoded from them only when its image is read.
    """

    def __init__(self, root: str, split: str, image_size: int, train: bool,
                 skip_bad_images: bool = False, augment: SampleAugment | None = None,
                 val_resize_size: int | None = None,
                 sample_index: SampleIndex | None = None,
                 crop: T.TrainCrop = T.TrainCrop()) -> None:
        """Validation resizes to val_resize_size (None: image_size/0.875), then centre-crops
        image_size; training crops and flips as `crop` says to image_size, then applies
        `augment` if given.
        `sample_index`: the split's index, mapped from the job's cache (None: list it here)."""
        self.folder = str(Path(root).expanduser() / split)
        self.index = sample_index if sample_index is not None else \
            list_split(self.folder).index
        self.classes, self.image_size, self.train = list(self.index.classes), image_size, train
        self.skip_bad_images, self.augment = skip_bad_images, augment
        self.val_resize_size, self.crop = val_resize_size, crop
        # torchvision's ImageFolder.samples, `(path, class)` pairs, each made as it is read.
        self.samples = Samples(self)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int | tuple) -> tuple[torch.Tensor, int]:
        """`item`: an index, or TrainSampler's (index, seed, size): the crop's seed and size."""
        index, seed, size = item_parts(item)
        seed = 0 if seed is None else seed
        for attempt in range(len(self)):
            sample = (index + attempt) % len(self)
            try:
                image = self._load(self.read(sample), seed, size)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                # Named only here: where() decodes a path (or formats a shard's), per image.
                reason, where = _reason(exc), self.where(sample)
                if not self.skip_bad_images:
                    raise ConfigError(f"corrupt or truncated image file: {where} ({reason}); set "
                                      "dataset.skip_bad_images=true to skip such files") from None
                log.warning("warning: skipped bad image file %s: %s", where, reason)
                continue
            # Outside the try: an augmentation's error is a bug, not a bad file.
            label = self.label(sample)
            return (image if self.augment is None else self.augment(image, seed)), label
        raise ConfigError(f"no readable image in {self.where(0)}'s dataset")

    # The sample's source: a subclass that stores images elsewhere (packed shards) overrides these
    # three and keeps the decoding, so its batches are this class's bit for bit.
    def read(self, index: int) -> bytearray:
        """Sample `index`'s encoded bytes."""
        return read_bytes(self.where(index))

    def label(self, index: int) -> int:
        return self.index.label(index)

    def where(self, index: int) -> str:
        """Where sample `index` is, for an error message: its path."""
        return self.folder + os.sep + self.index.path(index)

    def _load(self, data: bytearray, seed: int, crop_size: int | None = None) -> torch.Tensor:
        """Training: a crop of `crop_size` (None: image_size); validation: its own sizes."""
        size = jpeg_size(data)  # from the header: none of PIL's Image.open (~20 us an image)
        if not self.train:
            return val_image(data, size, self.image_size, self.val_resize_size)
        out = crop_size or self.image_size
        if size is None:  # PNG, BMP, ...: decoded whole to learn their size, never drafted
            pixels = decode(data, size)
            box, flip = T.train_crop_params(pixels.shape[2], pixels.shape[1], seed, self.crop)
            return resized_crop(pixels, box, flip, out)
        box, flip = T.train_crop_params(*size, seed, self.crop)
        if min(box[2:]) >= 2 * out:
            return drafted_crop(data, box, flip, out)
        return resized_crop(decode(data, size), box, flip, out)

    @staticmethod
    def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """default_collate, stacking the images in NHWC memory (a channels_last NCHW batch).

        libjpeg and the resize both produce HWC pixels: stacking them as they are is a plain copy,
        where a contiguous NCHW batch costs a transpose (~35 us an image). The device takes the
        batch to the model's memory format as it normalises it.
        """
        images, labels = default_collate([(image.permute(1, 2, 0), label) for image, label in batch])
        return images.permute(0, 3, 1, 2), labels


class Samples(Sequence):
    """A dataset's `(path, class)` pairs, read through its `where` and `label`: a list's
    interface without a list's per-sample objects."""

    def __init__(self, dataset: JpegFolder) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> tuple[str, int]:  # type: ignore[override]
        if not -len(self) <= item < len(self):
            raise IndexError(f"sample {item} of {len(self)}")
        item %= len(self)
        return self.dataset.where(item), self.dataset.label(item)


def read_bytes(path: str) -> bytearray:
    """The file's bytes in a writable buffer, so torch can wrap them without a copy or a warning."""
    with open(path, "rb", buffering=0) as f:  # unbuffered: one read() straight into `data`
        data = bytearray(os.fstat(f.fileno()).st_size)
        if f.readinto(data) != len(data):
            raise OSError("the file changed size while it was read")
    return data


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic coded):
# their segment holds the frame's height and width. Markers without a length segment: TEM, RSTn.
_START_OF_FRAME = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                             0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header; None for other formats or an unreadable header."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 9 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
        elif marker in _STANDALONE:
            pos += 2
        elif marker in _START_OF_FRAME:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return (width, height) if width and height else None  # height 0: set by a later DNL
        else:
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def decode(data: bytearray, jpeg_header_size: tuple[int, int] | None) -> torch.Tensor:
    """RGB uint8 CHW (a view of HWC memory): libjpeg-turbo for JPEGs, PIL for other formats."""
    pixels = None
    if jpeg_header_size and decode_jpeg is not None:
        try:
            pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # unusual or damaged JPEG: PIL decodes it or raises OSError, which callers handle
    if pixels is None:
        with Image.open(io.BytesIO(data)) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    decoded_size = (pixels.shape[2], pixels.shape[1])
    if jpeg_header_size and decoded_size != jpeg_header_size:
        raise ValueError(f"the JPEG header says {jpeg_header_size[0]}x{jpeg_header_size[1]} "
                         f"but the image decodes to {decoded_size[0]}x{decoded_size[1]}")
    return pixels


def val_image(data: bytearray, jpeg_header_size: tuple[int, int] | None, crop_size: int,
              resize_size: int | None = None) -> torch.Tensor:
    """Validation's preprocessing (also predict's): resize the short side to resize_size
    (None: crop_size/0.875), centre-crop crop_size."""
    pixels = decode(data, jpeg_header_size)
    short_side = resize_size or T.val_resize(crop_size)
    return centre_crop(T.resize_uint8(pixels, *T.resize_size(
        pixels.shape[2], pixels.shape[1], short_side)), crop_size)


def resized_crop(pixels: torch.Tensor, box: tuple[int, int, int, int], flip: bool,
                 size: int) -> torch.Tensor:
    """RandomResizedCrop + RandomHorizontalFlip's work on decoded uint8 pixels."""
    left, top, w, h = box
    return T.resize_uint8(pixels[:, top:top + h, left:left + w], size, size, flip)


def drafted_crop(data: bytearray, box: tuple[int, int, int, int], flip: bool,
                 size: int) -> torch.Tensor:
    """resized_crop for a crop at least twice the output: libjpeg decodes at 1/2, 1/4 or 1/8 scale."""
    left, top, w, h = box
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        image.draft("RGB", (max(1, width * size // w), max(1, height * size // h)))
        # PIL's resize takes the crop box in the smaller image's fractional coordinates.
        sx, sy = image.size[0] / width, image.size[1] / height
        box_scaled = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR,
                                              box=box_scaled)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop(size) for an image at least `size` on each side."""
    height, width = image.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image[:, top:top + size, left:left + size]
