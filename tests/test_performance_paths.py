"""The fast paths give the same answers as the slow ones: uint8 decode + device normalisation
against torchvision's reference transforms, channels_last and torch.compile against eager fp32,
and mode=bench_data's results."""
from __future__ import annotations

import io
import itertools
import multiprocessing
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import REPO, TINY, read_results, run_cli
from imgtrain.data import build_loaders
from imgtrain.data import transforms as imgtrain_transforms
from imgtrain.data.batch_pool import HELD
from imgtrain.data.imagefolder import JpegFolder, jpeg_size
from imgtrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalizer
from imgtrain.distributed import World
from imgtrain.resolve import resolve

# torchvision 0.29 deprecates its decoders (still libjpeg-turbo); imagefolder.py silences it in runs.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
REFERENCE_NORMALIZE = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
# One grey level after normalisation (std ~0.225): what "equal up to rounding" allows.
ONE_LEVEL = 1 / (255 * min(IMAGENET_STD))


def _photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A smooth, photo-like JPEG: gradients and gentle noise, as decoders and resizers meet them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / 17), 128 + 90 * np.cos(y / 11),
                     128 + 60 * np.sin((x + y) / 23)], axis=-1)
    pixels = (base + rng.normal(0, 4, base.shape)).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "val"):
        _photo(root / split / "a" / "0.JPEG", 120, 90, seed=1)
        _photo(root / split / "b" / "0.JPEG", 90, 120, seed=2)
    return root


def _device_normalised(image: torch.Tensor) -> torch.Tensor:
    return Normalizer(torch.device("cpu"), channels_last=False)(image.unsqueeze(0))[0]


def _reference(pil_image: Image.Image) -> torch.Tensor:
    return REFERENCE_NORMALIZE(TF.to_tensor(pil_image))


def test_device_normalisation_equals_to_tensor_then_normalize() -> None:
    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = REFERENCE_NORMALIZE(image.float() / 255)
    for channels_last in (False, True):
        got = Normalizer(torch.device("cpu"), channels_last)(image)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_training_crop_matches_random_resized_crop_and_flip(photo_folder: Path, seed: int) -> None:
    """Same crop box and flip as RandomResizedCrop + RandomHorizontalFlip, on PIL, then normalised.

    48 px from 120x90 images: no crop is twice the output, so the decoder runs at full scale.
    """
    dataset = JpegFolder(str(photo_folder), "train", 48, train=True)
    for index, (path, _) in enumerate(dataset.samples):
        ours = _device_normalised(dataset[(index, seed)][0])
        with Image.open(path) as image:
            (left, top, w, h), flip = imgtrain_transforms.train_crop_params(*image.size, seed)
            expected = TF.resized_crop(image.convert("RGB"), top, left, h, w, [48, 48])
        if flip:
            expected = TF.hflip(expected)
        difference = (ours - _reference(expected)).abs()
        assert difference.max() <= 1.01 * ONE_LEVEL, (path, difference.max() / ONE_LEVEL)


def test_crop_boxes_follow_random_resized_crops_distribution() -> None:
    """imgtrain draws each sample's box from its own seed; torchvision's get_params draws from
    torch's generator. Over many draws the boxes' areas, shapes and positions agree."""
    width, height, draws = 120, 90, 4000
    ours = [imgtrain_transforms.train_crop_params(width, height, seed)[0] for seed in range(draws)]
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = [T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
              for _ in range(draws)]
    theirs = [(left, top, w, h) for top, left, h, w in theirs]

    def summary(boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
        boxes = np.array(boxes, dtype=np.float64)
        area = boxes[:, 2] * boxes[:, 3] / (width * height)
        log_ratio = np.log(boxes[:, 2] / boxes[:, 3])
        centre_x = (boxes[:, 0] + boxes[:, 2] / 2) / width
        return np.stack([np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
                         for v in (area, log_ratio, centre_x)])

    # 4000 draws: sampling error of these quantiles is about 0.01-0.02.
    np.testing.assert_allclose(summary(ours), summary(theirs), atol=0.05)


def test_validation_matches_resize_then_centre_crop(photo_folder: Path) -> None:
    dataset = JpegFolder(str(photo_folder), "val", 32, train=False)
    reference = T.Compose([T.Resize(imgtrain_transforms.val_resize(32)), T.CenterCrop(32)])
    for index, (path, _) in enumerate(dataset.samples):
        ours = _device_normalised(dataset[index][0])
        with Image.open(path) as image:
            expected = _reference(reference(image.convert("RGB")))
        difference = (ours - expected).abs()
        assert difference.max() <= 1.01 * ONE_LEVEL, (path, difference.max() / ONE_LEVEL)


def test_large_jpeg_drafts_and_stays_close(tmp_path: Path) -> None:
    """A crop at least twice the output lets libjpeg decode at 1/2..1/8 scale: a close, not exact, image."""
    _photo(tmp_path / "train" / "a" / "0.JPEG", 800, 600)
    dataset = JpegFolder(str(tmp_path), "train", 32, train=True)
    seed = next(s for s in range(100) if min(imgtrain_transforms.train_crop_params(
        800, 600, s)[0][2:]) >= 128)  # a crop >= 4x the output: drafted
    ours = dataset[(0, seed)][0]
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.uint8
    (left, top, w, h), flip = imgtrain_transforms.train_crop_params(800, 600, seed)
    with Image.open(dataset.samples[0][0]) as image:
        expected = TF.resized_crop(image.convert("RGB"), top, left, h, w, [32, 32])
    if flip:
        expected = TF.hflip(expected)
    expected = TF.pil_to_tensor(expected)
    assert (ours.float() - expected.float()).abs().mean() < 3  # grey levels, out of 255


def _jpeg_bytes(width: int, height: int, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def test_jpeg_size_reads_the_frame_header_not_an_embedded_thumbnail() -> None:
    assert jpeg_size(_jpeg_bytes(120, 90)) == (120, 90)
    assert jpeg_size(_jpeg_bytes(64, 48, progressive=True)) == (64, 48)
    # An APP1 segment holding another JPEG (as EXIF thumbnails do) is skipped by its length.
    thumbnail, main = _jpeg_bytes(16, 12), _jpeg_bytes(200, 150)
    payload = b"Exif\0\0" + thumbnail
    with_thumbnail = main[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + main[2:]
    assert jpeg_size(with_thumbnail) == (200, 150)
    assert Image.open(io.BytesIO(with_thumbnail)).size == (200, 150)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    assert jpeg_size(png.getvalue()) is None and jpeg_size(b"\xff\xd8\xff") is None


def test_png_greyscale_and_progressive_files_load_as_rgb(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    for split in ("train", "val"):
        folder = tmp_path / split / "a"
        folder.mkdir(parents=True)
        Image.fromarray(pixels).save(folder / "0.png")
        Image.fromarray(pixels).convert("L").save(folder / "1.jpg", quality=90)
        Image.fromarray(pixels).save(folder / "2.jpg", quality=90, progressive=True)
    for train in (True, False):
        dataset = JpegFolder(str(tmp_path), "train" if train else "val", 32, train=train)
        for index in range(len(dataset)):
            image = dataset[(index, 7)][0]
            assert image.shape == (3, 32, 32) and image.dtype == torch.uint8


def test_jpeg_batches_are_nhwc_and_normalise_like_contiguous_ones(photo_folder: Path) -> None:
    """JpegFolder collates in NHWC memory (no transpose in the workers); the device sees no change."""
    dataset = JpegFolder(str(photo_folder), "train", 48, train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=dataset.collate)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 48, 48) and labels.tolist() == [0, 1]
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, torch.stack([dataset[0][0], dataset[1][0]]))
    for channels_last in (False, True):
        normalize = Normalizer(torch.device("cpu"), channels_last)
        torch.testing.assert_close(normalize(images), normalize(images.contiguous()), atol=0, rtol=0)


def _jpeg_loaders(compose, root: Path, reuse_batch_memory: bool):
    """imagenet loaders as run.py builds them: 2 workers, 2 batches of 8 prefetched by each."""
    plan = resolve(compose("device=cpu", "dataset=imagenet", f"dataset.root={root}",
                           "dataset.image_size=32", "dataset.workers=2",
                           "dataset.prefetch_factor=2",
                           f"dataset.reuse_batch_memory={reuse_batch_memory}",
                           "train.batch_size=8", "train.seed=49"), [])
    return build_loaders(plan, World(), accelerator=False)


def test_reused_batch_memory_yields_the_same_batches_and_never_changes_one_in_use(
        compose, image_folder: Path) -> None:
    """Workers refilling their shared-memory batches change nothing the consumer sees: the same
    batches as fresh memory, over passes cut short, and batches kept across passes stay intact."""
    seen = {}
    for reuse in (False, True):
        loaders = _jpeg_loaders(compose, image_folder, reuse)
        batches, kept = [], []
        for epoch, steps in enumerate((12, 5, 12)):  # 96 images: 12 batches; pass 2 is cut short
            loaders.train_sampler.set_epoch(epoch)
            for images, labels in itertools.islice(loaders.train, steps):
                batches.append((images.clone(), labels.clone()))
                if len(batches) % 3 == 0:  # a consumer keeping some batches (a third) for later
                    kept.append((images, labels, len(batches) - 1))
        for images, labels, index in kept:
            assert torch.equal(images, batches[index][0]) and torch.equal(labels, batches[index][1])
        seen[reuse] = batches
    assert len(seen[True]) == len(seen[False]) == 29
    for (images, labels), (fresh_images, fresh_labels) in zip(seen[True], seen[False]):
        assert torch.equal(images, fresh_images) and torch.equal(labels, fresh_labels)
        assert images.is_contiguous(memory_format=torch.channels_last)


def _pooled_steps(loaders, epoch: int, steps: int):
    """Take the first `steps` training batches of a pass, each let go before the next is asked
    for; for each, the number of segments marked as held while the consumer had it (1: its own)."""
    state = loaders.train.pool.state
    loaders.train_sampler.set_epoch(epoch)
    batches, pooled = iter(loaders.train), []
    for _ in range(steps):
        images, labels = next(batches)
        pooled.append(int((state == HELD).sum()))
        del images, labels
        assert (state == HELD).sum() == 0  # its segment is free again once we let go
    return pooled


def test_loader_workers_fork_even_in_a_spawned_rank(compose, image_folder: Path) -> None:
    """imgtrain's launcher spawns the ranks, and multiprocessing's default then stays spawn in
    them: each worker would import torch anew (~15 s before a 2-rank run's first batch here)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("this OS has no fork")
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)  # what a spawned rank inherits
    try:
        loaders = _jpeg_loaders(compose, image_folder, reuse_batch_memory=True)
    finally:
        multiprocessing.set_start_method(previous, force=True)
    for loader in (loaders.train, loaders.val):
        assert loader.multiprocessing_context.get_start_method() == "fork"


def test_a_segment_is_refilled_once_the_consumer_lets_go_and_passes_cut_short_leak_none(
        compose, image_folder: Path) -> None:
    """A worker has at most prefetch_factor (2) batches in flight and prefetch_factor + 1
    segments: with each batch let go before the next, every batch is made in a segment, except
    maybe the first prefetch_factor x workers (4) of a pass, made while the DataLoader restarts."""
    loaders = _jpeg_loaders(compose, image_folder, reuse_batch_memory=True)
    # Passes cut short: the batches the workers had prefetched are dropped unseen by the
    # DataLoader, in segments that must not stay marked as in use.
    for epoch in range(3):
        _pooled_steps(loaders, epoch, steps=5)
    assert _pooled_steps(loaders, 3, steps=len(loaders.train))[4:] == [1] * 8


def test_channels_last_gives_the_same_training_step_as_contiguous() -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    target = torch.tensor([0, 1, 2, 3])
    results = []
    for channels_last in (False, True):
        model = torchvision.models.resnet18(num_classes=10)
        model.load_state_dict(reference.state_dict())
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        x = Normalizer(torch.device("cpu"), channels_last)(images)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        results.append((loss.detach(), model.conv1.weight.grad, model.fc.weight.grad))
    (loss0, *grads0), (loss1, *grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads1, grads0):  # other conv kernels sum in another order: relative error
        assert (a - b).abs().max() <= 1e-3 * b.abs().max()


def test_synthetic_noise_depends_on_the_sample_seed_alone() -> None:
    from imgtrain.data.synthetic import Synthetic
    train = Synthetic(100, 16, 4, seed=1, train=True, noise=1.0)
    alone = train[(5, 123)][0]
    in_batch = train.__getitems__([(7, 9), (5, 123), (2, 4)])[1][0]
    assert torch.equal(alone, in_batch) and alone.dtype == torch.uint8
    assert not torch.equal(alone, train[(5, 124)][0])  # another epoch: fresh noise
    val = Synthetic(100, 16, 4, seed=1, train=False, noise=1.0)
    assert torch.equal(val[5][0], val[5][0]) and not torch.equal(val[5][0], val[9][0])


@pytest.mark.slow
def test_compile_and_channels_last_train_end_to_end(tmp_path: Path) -> None:
    """model.compile=true model.channels_last=true through run.py: it trains and logs images/sec.
    Through dynamo and AOTAutograd, as inductor's are, on the aot_eager backend: inductor's C++
    code generation takes ~80 s here with a cold cache (a fresh CI machine), and the GPU check
    (benchmarks/accelerator_check.py) compiles with inductor on the device."""
    inductor_cache = tmp_path / "inductor"
    proc = run_cli(*TINY, "dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=4",
                   "dataset.train_size=32", "dataset.val_size=8", "train.batch_size=8",
                   "train.epochs=1", "model.compile=true", "model.compile_backend=aot_eager",
                   "model.channels_last=true", f"hydra.run.dir={tmp_path / 'run'}", timeout=600,
                   env={"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path / "run")
    assert results["status"] == "completed" and results["images_per_sec"] > 0
    assert not [p for p in inductor_cache.rglob("*") if p.is_file()]  # aot_eager, not inductor


def test_bench_data_writes_loader_images_per_sec(image_folder: Path, tmp_path: Path) -> None:
    proc = run_cli(*TINY, "mode=bench_data", "dataset=imagenet", f"dataset.root={image_folder}",
                   "dataset.image_size=32", "train.batch_size=8", "train.steps_per_epoch=20",
                   "train.fps_warmup_steps=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path)
    assert results["status"] == "completed" and results["mode"] == "bench_data"
    # 20 batches of 8 cross the 96-image epoch boundary: the loader goes on into the next epoch.
    assert results["loader_images"] == 160 and results["loader_images_per_sec"] > 0
    assert not (tmp_path / "checkpoints").exists()  # no model was built or saved


@pytest.mark.slow
@pytest.mark.skipif(not (REPO.parent / "shared" / "reference" / "bare_loop.py").exists(),
                    reason="../shared/reference/ (the benchmark references) is not beside this clone")
def test_benchmark_script_smoke(tmp_path: Path) -> None:
    import subprocess
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), "--quick",
                           "--rounds", "1", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| step: resnet18" in proc.stdout and "| loader: 1 worker" in proc.stdout
