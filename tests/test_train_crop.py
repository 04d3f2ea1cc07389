"""dataset.hflip, scale and ratio (timm's --hflip, --scale, --ratio) on ImageFolder, CIFAR-10 and
synthetic data; the start summary's augment line; the small-images warning."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_image_folder
from imgtrain.data import build_datasets, describe_augmentation
from imgtrain.data import transforms as T
from imgtrain.data.survey import small_data_warning
from imgtrain.errors import ConfigError
from imgtrain.resolve import resolve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's decoders
KINDS = ("imagenet", "cifar10", "synthetic")


@pytest.fixture
def roots(image_folder: Path, cifar_root: Path) -> dict[str, Path]:
    return {"imagenet": image_folder, "cifar10": cifar_root, "synthetic": image_folder}


def _plan(compose: Any, name: str, root: Path, *overrides: str) -> Any:
    return resolve(compose("device=cpu", "amp=O0", "model=resnet18", f"dataset={name}",
                           f"dataset.root={root}", "dataset.image_size=32",
                           "dataset.num_classes=4" if name == "synthetic" else "dataset.workers=0",
                           *overrides), [])


def _train_images(plan: Any, seeds: range) -> list[torch.Tensor]:
    train = build_datasets(plan.dataset, plan.train.seed,
                           (plan.val_resize_size, plan.val_crop_size))[0]
    return [train[(index % len(train), seed)][0] for index, seed in enumerate(seeds)]


def test_cifar_defaults_are_the_padded_crop_and_flip_it_always_had(compose: Any,
                                                                   cifar_root: Path) -> None:
    """dataset=cifar10's YAML (scale null, hflip 0.5) draws what CIFAR-10 always drew: the top
    and left offsets of a crop of the 4 px zero-padded image, then a coin for the flip."""
    plan = _plan(compose, "cifar10", cifar_root)
    train = build_datasets(plan.dataset, 1, (plan.val_resize_size, plan.val_crop_size))[0]
    for index, seed in zip(range(20), range(100, 120)):
        rng = random.Random(seed)
        padded = torch.nn.functional.pad(train.images[index], (4, 4, 4, 4))
        top, left = rng.randint(0, 8), rng.randint(0, 8)
        expected = padded[:, top:top + 32, left:left + 32]
        expected = expected.flip(-1) if rng.random() < 0.5 else expected
        assert torch.equal(train[(index, seed)][0], expected)


@pytest.mark.parametrize("name", KINDS)
def test_hflip_is_the_flip_probability(name: str, compose: Any, roots: dict) -> None:
    """The same seeds draw the same crops: hflip=1 gives hflip=0's images mirrored."""
    never = _train_images(_plan(compose, name, roots[name], "dataset.hflip=0"), range(24))
    always = _train_images(_plan(compose, name, roots[name], "dataset.hflip=1"), range(24))
    assert all(torch.equal(a, n.flip(-1)) for a, n in zip(always, never))
    assert not all(torch.equal(n, n.flip(-1)) for n in never)


def test_scale_and_ratio_bound_the_crop_boxes() -> None:
    crop = T.TrainCrop(scale=(0.35, 1.0), ratio=(0.9, 1.1))
    boxes = [T.train_crop_params(200, 100, seed, crop)[0] for seed in range(500)]
    areas = [w * h / (200 * 100) for _, _, w, h in boxes]
    ratios = [w / h for _, _, w, h in boxes]
    assert min(areas) > 0.33 and max(areas) <= 1.0  # rounding to whole pixels aside
    assert 0.88 < min(ratios) and max(ratios) < 1.12
    default = [T.train_crop_params(200, 100, seed)[0] for seed in range(500)]
    assert min(w * h for _, _, w, h in default) < 0.2 * 200 * 100  # ImageNet's 0.08 reaches lower


@pytest.mark.parametrize("name", ["cifar10", "synthetic"])
def test_in_memory_datasets_take_a_random_resized_crop_when_scale_is_set(
        name: str, compose: Any, roots: dict) -> None:
    """A scale on cifar10 or synthetic: the same crop box as an ImageFolder's, resized back to
    the images' size."""
    plan = _plan(compose, name, roots[name], "dataset.scale=[0.25,0.5]", "dataset.hflip=0")
    plain = _plan(compose, name, roots[name], "dataset.scale=null", "dataset.hflip=0")
    cropped, whole = _train_images(plan, range(8)), _train_images(plain, range(8))
    for seed, (image, original) in enumerate(zip(cropped, whole)):
        if name == "cifar10":  # null is the padded crop there: the original is the stored image
            original = build_datasets(plain.dataset, 1, (36, 32))[0].images[seed]
        box, _ = T.train_crop_params(32, 32, seed, T.TrainCrop(scale=(0.25, 0.5), hflip=0))
        left, top, w, h = box
        assert image.shape == (3, 32, 32) and (w, h) != (32, 32)
        assert torch.equal(image, T.resize_uint8(original[:, top:top + h, left:left + w], 32, 32))


@pytest.mark.parametrize("overrides, fragment", [
    (["dataset.hflip=1.5"], "dataset.hflip=1.5 must be a probability in [0, 1]"),
    (["dataset.scale=[0,1]"], "dataset.scale=[0.0, 1.0] must be [min, max] with 0 < min <= max"),
    (["dataset.scale=[0.5,0.2]"], "dataset.scale=[0.5, 0.2] must be"),
    (["dataset.scale=[0.5,1.5]"], "dataset.scale=[0.5, 1.5] must be"),
    (["dataset.scale=[0.5]"], "dataset.scale=[0.5] must be"),
    (["dataset.ratio=[2,1]"], "dataset.ratio=[2.0, 1.0] must be [min, max]"),
    (["dataset.scale=null"], "dataset.scale=null keeps images at their size"),
])
def test_bad_crop_keys_are_one_line_errors(overrides: list[str], fragment: str, compose: Any,
                                           image_folder: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _plan(compose, "imagenet", image_folder, *overrides)
    assert fragment in str(info.value), info.value


def test_the_augment_line_states_the_whole_augmentation(compose: Any, roots: dict) -> None:
    def line(name: str, *overrides: str) -> str:
        return describe_augmentation(_plan(compose, name, roots[name], *overrides).dataset)

    assert line("imagenet") == "random-resized crop 32 px (scale 0.08-1, ratio 0.75-1.33), flip p 0.5"
    assert line("cifar10") == "random 32 px crop, 4 px padding, flip p 0.5"
    assert line("synthetic") == "no crop, no flip"
    assert line("imagenet", "dataset.scale=[0.35,1]", "dataset.hflip=0", "dataset.auto_augment=ra",
                "dataset.random_erase=0.1", "dataset.mixup_alpha=0.2", "dataset.cutmix_alpha=1",
                "dataset.ra_reps=4") == (
        "random-resized crop 32 px (scale 0.35-1, ratio 0.75-1.33), no flip, auto augment ra, "
        "random erase 0.1, mixup 0.2, cutmix 1, repeated augmentation x4")


def test_small_images_and_tiny_sets_warn_naming_the_preset(compose: Any, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "small", per_class=6, val_per_class=1, size=28)
    dataset = lambda *overrides: _plan(compose, "imagenet", root, *overrides).dataset  # noqa: E731
    line = small_data_warning(dataset("dataset.image_size=224"), "resnet152")
    assert line.startswith("warning: the training images are about 28 px (the median short side "
                           "of 12 sampled), much smaller than dataset.image_size=224; about 6 "
                           "training images a class is tiny for resnet152; "
                           "experiment=small_images is a recipe")
    assert "\n" not in line
    line = small_data_warning(dataset("dataset.image_size=64"), "resnet18")
    assert line.startswith("warning: the training images are about 28 px") and "tiny" not in line
    assert small_data_warning(dataset("dataset.image_size=32"), "resnet18") is None
    # With the job's sample index (the plan's), the same line without listing the tree again.
    plan = _plan(compose, "imagenet", root, "dataset.image_size=224")
    unlisted = pytest.MonkeyPatch.context()
    with unlisted as patch:
        patch.setattr(os, "scandir", lambda *a: pytest.fail("the tree was listed again"))
        patch.setattr(os, "walk", lambda *a: pytest.fail("the tree was listed again"))
        indexed = small_data_warning(plan.dataset, "resnet152", plan.sample_index["train"])
    assert indexed == small_data_warning(plan.dataset, "resnet152")
