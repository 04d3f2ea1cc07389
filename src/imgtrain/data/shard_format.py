"""The layout of a packed dataset (`python -m imgtrain.pack`), shared by its writer and reader.

<out>/
  train-000000.tar ...   WebDataset-layout tar shards: `<key>.<ext>` (an image file's exact bytes,
  val-000000.tar ...     its extension lower-cased) then `<key>.cls` (the label, ASCII digits)
  train-index.npy        one record per sample, in torchvision's ImageFolder order (make_dataset):
  val-index.npy          shard number, byte offset and length of the image's data, label
  index.json             the class names, and each split's shards with their sizes and sample
                         counts; written last, so its presence means the pack is complete

Sample i of a split is sample i of the ImageFolder it was packed from, so imgtrain's samplers
draw the same images, with the same augmentation seeds, from either store.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgtrain.errors import ConfigError

INDEX_FILE = "index.json"
FORMAT = "imgtrain-shards"
VERSION = 1
# Plain integers, no objects: a 1.28M-sample split is 23 MB that every loader worker shares.
INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("length", "<u8"), ("label", "<u4")])
BLOCK = tarfile.BLOCKSIZE  # 512: tar headers and member data both fill whole blocks
END_OF_ARCHIVE = 2 * BLOCK


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(split: str) -> str:
    return f"{split}-index.npy"


def sample_key(index: int) -> str:
    """A member's key: the sample's number, so keys never hold a dot (WebDataset splits a
    member's name into key and field at the first dot) and two files never share one."""
    return f"{index:08d}"


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def member_header(name: str, size: int) -> bytes:
    """A POSIX ustar header with fixed owner, mode and time: packing the same tree twice writes
    the same bytes, which is what lets an interrupted pack keep the shards it finished."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    assert len(header) == BLOCK, name  # keys are short: no long-name extension blocks
    return header


def label_bytes(label: int) -> bytes:
    return str(label).encode("ascii")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    bytes: int
    samples: int


@dataclass(frozen=True)
class Manifest:
    """index.json: what a complete pack holds."""

    classes: list[str]
    splits: dict[str, list[ShardInfo]]

    def write(self, path: Path) -> None:
        data = {"format": FORMAT, "version": VERSION, "classes": self.classes,
                "splits": {split: [vars(shard) for shard in shards]
                           for split, shards in self.splits.items()}}
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=1) + "\n")
        temporary.replace(path)

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = root / INDEX_FILE
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError(f"not an {FORMAT} version {VERSION} index")
            return cls(list(data["classes"]),
                       {split: [ShardInfo(str(s["name"]), int(s["bytes"]), int(s["samples"]))
                                for s in shards] for split, shards in data["splits"].items()})
        except FileNotFoundError:
            if (root / "train").is_dir() or (root / "val").is_dir():
                raise ConfigError(f"{root} is an ImageFolder tree, not packed shards: pack it "
                                  f"once with python -m imgtrain.pack {root} <out> and give "
                                  "dataset.root=<out>, or drop dataset.format=shards") from None
            raise ConfigError(f"{root} holds no packed dataset ({INDEX_FILE} is missing); pack "
                              "an ImageFolder with python -m imgtrain.pack <folder> "
                              f"{root}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path} is not a readable index of packed shards ({exc}); "
                              "pack the dataset again with python -m imgtrain.pack") from None
