"""Issue #16's data side: auto_augment and random_erase seeded per sample, validation's resize and
crop sizes, and repeated augmentation in the training sampler."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms.v2 import functional as F

from conftest import TINY, assert_clean_error, run_cli
from imgtrain import weights
from imgtrain.config import DatasetConfig
from imgtrain.data import build_datasets, build_loaders
from imgtrain.data.augment import SampleAugment, build_augment
from imgtrain.data.imagefolder import decode, read_bytes
from imgtrain.data.samplers import TrainSampler
from imgtrain.data.transforms import IMAGENET_MEAN, sample_seed, val_sizes
from imgtrain.distributed import World
from imgtrain.errors import ConfigError
from imgtrain.models import build_model
from imgtrain.plan import RunPlan
from imgtrain.resolve import resolve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's decoders
KINDS = ("imagenet", "cifar10", "synthetic")


def _data_cfg(name: str, root: Path | None = None, **keys: Any) -> DatasetConfig:
    return DatasetConfig(**{"name": name, "root": str(root), "image_size": 32, "num_classes": 4,
                            "train_size": 64, "val_size": 16, "noise": 1.0, **keys})


def _datasets(dataset: DatasetConfig, seed: int) -> tuple[Any, Any]:
    """The training and validation sets, at the validation sizes a plan derives."""
    return build_datasets(dataset, seed, val_sizes(dataset))


def _plan(compose: Any, *overrides: str) -> RunPlan:
    return resolve(compose("device=cpu", "amp=O0", "model=resnet18", *overrides), [])


@pytest.fixture
def roots(image_folder: Path, cifar_root: Path) -> dict[str, Path | None]:
    return {"imagenet": image_folder, "cifar10": cifar_root, "synthetic": None}


def _train_set(name: str, roots: dict[str, Path | None], **keys: Any) -> Any:
    return _datasets(_data_cfg(name, roots[name], **keys), seed=3)[0]


# ---- auto_augment and random_erase ----------------------------------------------------------
@pytest.mark.parametrize("name", KINDS)
def test_a_sample_seed_alone_decides_its_augmentation(name: str, roots: dict) -> None:
    first = _train_set(name, roots, auto_augment="ta_wide", random_erase=0.5)
    second = _train_set(name, roots, auto_augment="ta_wide", random_erase=0.5)
    torch.manual_seed(1)
    for item in [(i, 100 + i) for i in range(6)]:  # other samples drawn first, in one instance
        first[item]
    wanted = [(5, sample_seed(3, 0, 5)), (2, 77)]
    torch.manual_seed(2)
    state = torch.get_rng_state()
    images = [first[item][0] for item in wanted]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left untouched
    for item, image in zip(wanted, images):
        assert torch.equal(second[item][0], image)
    reseeded = [first[(5, seed)][0] for seed in range(200, 206)]
    assert sum(not torch.equal(image, images[0]) for image in reseeded) >= 5


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "augmix"])
def test_each_policy_runs_after_the_crop_and_changes_images(policy: str, roots: dict) -> None:
    plain = _train_set("imagenet", roots)
    augmented = _train_set("imagenet", roots, auto_augment=policy)
    augment = SampleAugment(policy, 0.0)
    changed = 0
    for seed in range(8):
        base, image = plain[(seed, seed)][0], augmented[(seed, seed)][0]
        assert image.shape == base.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert torch.equal(image, augment(base, seed))  # the same crop and flip, then the policy
        changed += not torch.equal(image, base)
    assert changed >= 6  # each policy leaves a few images as they are (identity, magnitude 0)
    outcomes = {augment(base, seed).numpy().tobytes() for seed in range(8)}
    assert len(outcomes) >= 6  # the sample's seed, not a fixed stream, picks the operations


@pytest.mark.parametrize("name", KINDS)
def test_random_erase_paints_one_box_the_mean_colour(name: str, roots: dict) -> None:
    plain, erased = _train_set(name, roots), _train_set(name, roots, random_erase=1.0)
    # torchvision erases normalised images to 0, i.e. to the mean: (124, 116, 104) in uint8.
    mean = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8).view(3, 1)
    for seed in range(4):
        base, image = plain[(seed, seed)][0], erased[(seed, seed)][0]
        rows, cols = (image != base).any(0).nonzero(as_tuple=True)
        assert len(rows) > 0
        top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
        box = image[:, top:bottom, left:right].reshape(3, -1)
        assert torch.equal(box, mean.expand_as(box))  # the whole box, nothing outside it
        outside = image.clone()
        outside[:, top:bottom, left:right] = base[:, top:bottom, left:right]
        assert torch.equal(outside, base)


@pytest.mark.parametrize("name", KINDS)
def test_defaults_take_the_fast_path_with_the_same_images(name: str, roots: dict) -> None:
    assert build_augment(_data_cfg(name, auto_augment=None, random_erase=0.0)) is None
    train_set, val_set = _datasets(_data_cfg(name, roots[name], auto_augment=None,
                                             random_erase=0.0), seed=3)
    assert train_set.augment is None
    reference = _train_set(name, roots)  # the keys left at the schema's defaults
    for item in [(0, 11), (7, 12)]:
        assert torch.equal(train_set[item][0], reference[item][0])
    assert getattr(val_set, "augment", None) is None  # validation never augments


def test_workers_make_the_same_augmented_batches(compose: Any, cifar_root: Path) -> None:
    def first_batch(workers: int) -> torch.Tensor:
        plan = _plan(compose, "dataset=cifar10", f"dataset.root={cifar_root}",
                     "dataset.auto_augment=ra", "dataset.random_erase=0.5",
                     f"dataset.workers={workers}", "dataset.persistent_workers=false",
                     "dataset.prefetch_factor=2", "train.batch_size=16", "train.seed=5")
        loaders = build_loaders(plan, World(), accelerator=False)
        return next(iter(loaders.train))[0]

    assert torch.equal(first_batch(0), first_batch(2))


# ---- validation's sizes -------------------------------------------------------------------
def test_validation_resizes_then_centre_crops_the_given_sizes(image_folder: Path) -> None:
    cfg = _data_cfg("imagenet", image_folder, image_size=16, val_resize_size=36, val_crop_size=28)
    val_set = _datasets(cfg, seed=0)[1]
    path = val_set.samples[0][0]
    pixels = decode(read_bytes(path), None)
    expected = F.center_crop(F.resize(pixels, 36, antialias=True), [28, 28])
    image = val_set[0][0]
    assert image.shape == (3, 28, 28)
    assert (image.int() - expected.int()).abs().max() <= 1  # torchvision's resize, to rounding
    default = _datasets(_data_cfg("imagenet", image_folder, image_size=16), seed=0)[1]
    assert default[0][0].shape == (3, 16, 16)  # image_size, resized to 18 first (16 / 0.875)


def _checkpoint(path: Path, dataset: dict[str, Any]) -> Path:
    torch.save({"format_version": 1, "identity": {}, "config": {"dataset": dataset},
                "model": {"fc.weight": torch.zeros(4, 8), "fc.bias": torch.zeros(4)}}, path)
    return path


def test_predict_and_eval_take_the_checkpoints_validation_sizes(compose: Any, image_folder: Path,
                                                               tmp_path: Path) -> None:
    trained = {"name": "imagenet", "image_size": 176, "val_resize_size": 232, "val_crop_size": 224}
    new = _checkpoint(tmp_path / "new.pt", trained)
    old = _checkpoint(tmp_path / "old.pt", {"name": "imagenet", "image_size": 176})

    def sizes(path: Path, mode: str = "predict", *given: str) -> tuple:
        """The config's sizes after resolve (dataset=imagenet, image_size 224 unless
        `given`), then the plan's validation (resize, crop) derived from them."""
        overrides = [f"mode={mode}", "device=cpu", f"model.weights={path}", "dataset=imagenet",
                     f"dataset.root={image_folder}", *given]
        plan = resolve(compose(*overrides), overrides)
        return (*(getattr(plan.dataset, k) for k in ("image_size", "val_resize_size",
                                                     "val_crop_size")),
                plan.val_resize_size, plan.val_crop_size)

    assert sizes(new) == sizes(new, "eval") == (176, 232, 224, 232, 224)
    # Older runs: today's rule, image_size / 0.875.
    assert sizes(old) == sizes(old, "eval") == (176, None, None, 201, 176)
    assert sizes(new, "predict", "dataset.image_size=64") == (64, None, None, 73, 64)


def test_predict_and_export_use_the_validation_crop(compose: Any, image_folder: Path,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from imgtrain import export, predict
    from imgtrain.device import DeviceInfo
    seen: dict[str, Any] = {}

    def val_image(data: bytearray, header: Any, crop: int, resize: int | None = None) -> Any:
        seen["predict"] = (resize, crop)
        return torch.zeros(3, crop, crop, dtype=torch.uint8)

    monkeypatch.setattr(predict, "val_image", val_image)
    monkeypatch.setattr(export, "to_onnx", lambda *args: seen.setdefault("export", args[2]))
    monkeypatch.setattr(export, "check_onnxruntime", lambda *args: None)
    path = tmp_path / "resnet18.pth"
    torch.save(build_model("resnet18", 4).state_dict(), path)
    file = weights.read(str(path))

    def plan(mode: str) -> RunPlan:
        return _plan(compose, f"mode={mode}", f"model.weights={path}", "dataset=imagenet",
                     "dataset.val_resize_size=36", "dataset.val_crop_size=28", "predict.topk=1",
                     f"predict.inputs=['{image_folder}']", "export.format=onnx",
                     "export.opset=18", "export.exporter=auto", "export.batch=dynamic")

    predict.predict(plan("predict"), tmp_path, DeviceInfo("cpu"), file)
    export.export(plan("export"), file)
    assert seen == {"predict": (36, 28), "export": 28}


@pytest.mark.parametrize("overrides, fragments", [
    (["dataset.val_crop_size=40", "dataset.val_resize_size=36"], ["val_crop_size=40", "36"]),
    (["dataset.val_resize_size=20"], ["image_size=32", "val_resize_size=20"]),
    (["dataset.val_crop_size=0"], ["val_crop_size=0", "positive"]),
    (["dataset.random_erase=1.5"], ["random_erase=1.5", "[0, 1]"]),
    (["dataset.random_erase=-0.1"], ["random_erase=-0.1"]),
    (["dataset.ra_reps=0"], ["ra_reps=0", "at least 1"]),
    (["dataset.auto_augment=autoaugment"], ["'autoaugment'", "ta_wide, ra, augmix"]),
], ids=["crop>resize", "image_size>resize", "crop=0", "erase>1", "erase<0", "ra_reps=0",
        "policy"])
def test_bad_values_are_config_errors(compose: Any, image_folder: Path, overrides: list,
                                      fragments: list) -> None:
    with pytest.raises(ConfigError) as error:
        resolve(compose("dataset=imagenet", f"dataset.root={image_folder}",
                        "dataset.image_size=32", *overrides), [])
    assert all(fragment in str(error.value) for fragment in fragments), error.value


@pytest.mark.parametrize("group", ["cifar10", "synthetic"])
def test_validation_sizes_apply_to_imagenet_only(compose: Any, cifar_root: Path,
                                                 group: str) -> None:
    with pytest.raises(ConfigError, match="val_crop_size applies to dataset=imagenet"):
        resolve(compose(f"dataset={group}", f"dataset.root={cifar_root}",
                        "dataset.num_classes=10", "dataset.val_crop_size=28"), [])


def test_an_unknown_policy_is_one_error_line(tmp_path: Path) -> None:
    proc = run_cli("experiment=quickstart", *TINY, "dataset.auto_augment=foo",
                   f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert_clean_error(proc, "dataset.auto_augment", "'foo'", "ta_wide", "ra", "augmix")


# ---- repeated augmentation --------------------------------------------------------------------
def _rasampler(dataset_len: int, rank: int, world_size: int, seed: int, reps: int) -> list[int]:
    """torchvision's references/classification/sampler.py RASampler, per-rank length len // world."""
    g = torch.Generator()
    g.manual_seed(seed)
    indices = [i for i in torch.randperm(dataset_len, generator=g).tolist() for _ in range(reps)]
    total = -(-dataset_len * reps // world_size) * world_size
    indices += indices[:total - len(indices)]
    return indices[rank:total:world_size][:dataset_len // world_size]


def _pairs(dataset_len: int, rank: int, reps: int, world: int = 2, micro_batch: int = 1,
           accumulate: int = 1, step: int = 0, earlier: tuple = (), epoch: int = 2) -> list:
    sampler = TrainSampler(dataset_len, rank, world, seed=7, ra_reps=reps,
                           micro_batch=micro_batch, accumulate_steps=accumulate)
    sampler.set_epoch(epoch)
    sampler.resume_at(step, earlier)
    pairs = list(sampler)
    assert len(pairs) == len(sampler)
    return pairs


def _micro_batches(dataset_len: int, reps: int, world: int, global_batch: int, accumulate: int,
                   step: int = 0, earlier: tuple = (), steps: int | None = None) -> list[list]:
    """Each optimizer step's micro-batches (every rank's, each micro-step's) as the loaders of
    `world` processes with train.accumulate_steps=`accumulate` give them, from `step` on."""
    micro_batch = global_batch // world // accumulate
    per_rank = [_pairs(dataset_len, rank, reps, world, micro_batch, accumulate, step, earlier)
                for rank in range(world)]
    count = len(per_rank[0]) // (micro_batch * accumulate) if steps is None else steps
    return [[pairs[start:start + micro_batch] for pairs in per_rank
             for start in range(i * micro_batch * accumulate, (i + 1) * micro_batch * accumulate,
                                micro_batch)]
            for i in range(count)]


def _no_micro_batch_holds_two_copies(steps: list[list]) -> None:
    for step, batches in enumerate(steps):
        for batch in batches:
            indices = [index for index, _ in batch]
            assert len(set(indices)) == len(indices), f"step {step}: two copies in {indices}"


def _each_image_reps_times(steps: list[list], reps: int, images: int) -> None:
    pairs = [pair for batches in steps for batch in batches for pair in batch]
    assert len(set(pairs)) == len(pairs)  # no copy twice: each its own seed, its own crop
    counts = Counter(index for index, _ in pairs)
    assert len(counts) == images and set(counts.values()) == {reps}


def test_repeated_augmentation_on_ra_reps_ranks_is_torchvisions_sampler() -> None:
    """With a micro-batch per rank and at least ra_reps ranks, each rank's samples are
    RASampler's: each copy on another rank, as in torchvision's 8-GPU recipe."""
    ranks = [_pairs(31, rank, reps=3, world=4, micro_batch=2) for rank in range(4)]
    for rank, pairs in enumerate(ranks):
        assert [i for i, _ in pairs] == _rasampler(31, rank, 4, seed=7 + 2, reps=3)[:len(pairs)]
    union = [pair for step in zip(*ranks) for pair in step]  # the repeated list, in its order
    for index, seed in union:
        assert seed in {sample_seed(7, 2, index + 31 * repeat) for repeat in range(3)}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("accumulate", [1, 8])
def test_repeated_augmentation_puts_one_copy_of_an_image_in_a_micro_batch(
        world: int, accumulate: int) -> None:
    """ra_reps=4 on fewer than 4 ranks: an image's copies go to other micro-batches (other
    ranks, other micro-steps, other steps), and each image still comes 4 times an epoch."""
    steps = _micro_batches(512, reps=4, world=world, global_batch=64, accumulate=accumulate)
    assert len(steps) == 512 // 64
    _no_micro_batch_holds_two_copies(steps)
    _each_image_reps_times(steps, reps=4, images=512 // 4)
    if world * accumulate >= 4:  # enough micro-batches: the copies share their step
        for batches in steps:
            counts = Counter(index for batch in batches for index, _ in batch)
            assert set(counts.values()) == {4}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("resumed_world", [1, 2, 4])
@pytest.mark.parametrize("step", [1, 4])
def test_repeated_augmentation_resumes_exactly_on_any_process_count(
        world: int, resumed_world: int, step: int) -> None:
    """A run stopped after `step` steps and resumed on `resumed_world` processes trains the
    epoch's images ra_reps times each, one copy per micro-batch; on the same processes the
    resumed steps are the uninterrupted run's."""
    straight = _micro_batches(512, 4, world, 64, accumulate=1)
    resumed = _micro_batches(512, 4, resumed_world, 64, accumulate=1, step=step,
                             earlier=[(0, world)])
    assert len(resumed) == len(straight) - step
    if resumed_world == world:
        assert resumed == straight[step:]
        # A checkpoint that recorded no layout (older imgtrain): the steps were this run's.
        assert _micro_batches(512, 4, world, 64, accumulate=1, step=step) == straight[step:]
    if min(world, resumed_world) >= 4:  # torchvision's images in each step, on both
        assert [sorted(p for b in batches for p in b) for batches in resumed] == \
            [sorted(p for b in batches for p in b) for batches in straight[step:]]
    _no_micro_batch_holds_two_copies(straight[:step] + resumed)
    _each_image_reps_times(straight[:step] + resumed, reps=4, images=512 // 4)


def test_a_second_resume_keeps_both_earlier_layouts() -> None:
    first = _micro_batches(512, 4, 1, 64, accumulate=1, steps=1)
    second = _micro_batches(512, 4, 2, 64, accumulate=1, step=1, earlier=[(0, 1)], steps=2)
    third = _micro_batches(512, 4, 1, 64, accumulate=1, step=3, earlier=[(0, 1), (1, 2)])
    _no_micro_batch_holds_two_copies(first + second + third)
    _each_image_reps_times(first + second + third, reps=4, images=512 // 4)


def test_without_repeated_augmentation_resume_skips_and_is_distributed_sampler() -> None:
    for rank in (0, 1):
        today = DistributedSampler(range(31), 2, rank, shuffle=True, seed=7, drop_last=True)
        today.set_epoch(2)
        pairs = _pairs(31, rank, reps=1, micro_batch=3)
        assert pairs == [(i, sample_seed(7, 2, i)) for i in today]
        assert _pairs(31, rank, reps=1, micro_batch=3, step=2) == pairs[6:]


def test_repeats_of_one_image_are_different_crops(compose: Any, cifar_root: Path) -> None:
    plan = _plan(compose, "dataset=cifar10", f"dataset.root={cifar_root}", "dataset.ra_reps=2",
                 "dataset.workers=0", "train.batch_size=16", "train.seed=5")
    loaders = build_loaders(plan, World(), accelerator=False)
    assert loaders.train_sampler.ra_reps == 2
    first, second = [batch for batch, _ in zip(loaders.train.batch_sampler, range(2))]
    # One process, one micro-batch a step: a step's images are all different, and their second
    # copies come in the next step.
    assert len({index for index, _ in first}) == len(first) == 16
    (index, seed0), (again, seed1) = first[0], second[0]
    assert index == again and seed0 != seed1
    dataset = loaders.train.dataset
    assert not torch.equal(dataset[(index, seed0)][0], dataset[(index, seed1)][0])
    assert isinstance(loaders.train, DataLoader)
