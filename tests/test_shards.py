"""Packed shards (python -m imgtrain.pack, dataset.format=shards): readable by other tools, the
ImageFolder's batches bit for bit, one positioned read per image, a pack that resumes, and one
line for a damaged shard."""
from __future__ import annotations

import builtins
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (REPO, STATE_BOUND_S, assert_clean_error, make_image_folder, paused,
                      read_results, run_cli, start_cli, wait_for)
from imgtrain import pack
from imgtrain.data import build_loaders, check_dataset
from imgtrain.data.imagefolder import JpegFolder
from imgtrain.data.shard_format import INDEX_FILE
from imgtrain.data.shards import OpenFiles, ShardFolder
from imgtrain.distributed import World
from imgtrain.errors import ConfigError
from imgtrain.resolve import resolve

PER_SHARD = "--samples-per-shard=9"


def _add_other_formats(root: Path) -> None:
    """Two PNGs and two .jpeg files beside the .JPEG ones: 64 training images in all."""
    rng = np.random.default_rng(1)
    for label, name in ((1, "extra_a.png"), (2, "extra_b.png"), (0, "extra_c.jpeg"),
                        (3, "extra_d.jpeg")):
        pixels = rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / f"class_{label}" / name)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 80 px: crops of 64 px or more take the drafted-decode path at image_size 32.
    root = make_image_folder(tmp_path_factory.mktemp("folder"), per_class=15, val_per_class=5,
                             size=80)
    _add_other_formats(root)
    return root


@pytest.fixture(scope="module")
def packed(source: Path, module_dir: Path) -> Path:
    out = module_dir / "packed"
    assert pack.main([str(source), str(out), PER_SHARD, "--workers=2"]) == 0
    return out


def _folder_order(root: Path, split: str) -> list[tuple[str, int]]:
    from torchvision.datasets import ImageFolder
    return ImageFolder(str(root / split)).samples


def test_shards_are_webdataset_tars_in_the_image_folders_order(source: Path,
                                                               packed: Path) -> None:
    import webdataset as wds
    expected = _folder_order(source, "train")
    shards = sorted(packed.glob("train-*.tar"))
    assert len(shards) == 8  # 64 images, 9 a shard
    members = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert len(members) == 2 * len(expected)
    for i, (path, label) in enumerate(expected):
        (image_name, data), (label_name, digits) = members[2 * i:2 * i + 2]
        assert image_name == f"{i:08d}{Path(path).suffix.lower()}"  # .jpeg, .png kept
        assert data == Path(path).read_bytes()  # the file's exact bytes
        assert (label_name, digits) == (f"{i:08d}.cls", str(label).encode())
    read_back = [(sample["__key__"], sample.get("jpeg", sample.get("png")), int(sample["cls"]))
                 for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False)]
    assert read_back == [(f"{i:08d}", Path(path).read_bytes(), label)
                         for i, (path, label) in enumerate(expected)]


def _plan(compose: Any, root: Path, *overrides: str) -> Any:
    overrides = ("device=cpu", "amp=O0", "model=resnet18", "dataset=imagenet",
                 f"dataset.root={root}", "dataset.image_size=32", "train.batch_size=8",
                 "train.seed=7", "dataset.prefetch_factor=2", *overrides)
    return resolve(compose(*overrides), list(overrides))


def _batches(compose: Any, root: Path, world_size: int, rank: int, steps: slice,
             *overrides: str, resume: tuple[int, list] | None = None,
             val: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    world = ("world=8p", "world.nproc_per_node=2") if world_size == 2 else ()
    plan = _plan(compose, root, *world, *overrides)
    loaders = build_loaders(plan, World(rank, rank, world_size, world_size), accelerator=False)
    if val:
        return [(x.clone(), y.clone()) for x, y in loaders.val]
    loaders.train_sampler.set_epoch(1)
    if resume:
        loaders.train_sampler.resume_at(*resume)
    batches = []
    for step, (images, labels) in enumerate(loaders.train):
        if step >= steps.stop:
            break
        batches.append((images.clone(), labels.clone()))
    return batches[steps]


def _assert_same(folder: list, shards: list) -> None:
    assert len(folder) == len(shards) > 0
    for (images_a, labels_a), (images_b, labels_b) in zip(folder, shards):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


@pytest.mark.parametrize("ra_reps", [1, 2])
def test_the_same_seed_gives_the_image_folders_batches_bit_for_bit(
        compose: Any, source: Path, packed: Path, ra_reps: int) -> None:
    """Two ranks for 3 steps, then one process resuming the epoch at step 3 (repeated
    augmentation's layout of the first steps carried over), and validation on two ranks.
    The folder loads in the training process; the shards in 2 forked workers (batch pool)."""
    folder = ("dataset.workers=0", f"dataset.ra_reps={ra_reps}")
    shards = ("dataset.format=shards", "dataset.workers=2", f"dataset.ra_reps={ra_reps}")
    for rank in (0, 1):
        _assert_same(_batches(compose, source, 2, rank, slice(0, 3), *folder),
                     _batches(compose, packed, 2, rank, slice(0, 3), *shards))
        _assert_same(_batches(compose, source, 2, rank, slice(0, 3), *folder, val=True),
                     _batches(compose, packed, 2, rank, slice(0, 3), *shards, val=True))
    resume = (3, [[0, 2]])  # steps 0-2 were laid out over 2 micro-batches a step
    _assert_same(_batches(compose, source, 1, 0, slice(0, 8), *folder, resume=resume),
                 _batches(compose, packed, 1, 0, slice(0, 8), *shards, resume=resume))


def test_a_shard_image_is_one_positioned_read_on_a_kept_open_file(
        source: Path, packed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = ShardFolder(str(packed), "train", 32, True)
    folder = JpegFolder(str(source), "train", 32, True)
    calls = {"open": 0, "os.open": 0, "preadv": 0}

    def counted(name: str, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(builtins, "open", counted("open", builtins.open))
    monkeypatch.setattr(os, "open", counted("os.open", os.open))
    monkeypatch.setattr(os, "preadv", counted("preadv", os.preadv))
    order = np.random.default_rng(0).permutation(64).tolist() * 2  # 128 reads, every shard
    for index in order:
        shards[(index, index)]
    assert calls == {"open": 0, "os.open": 8, "preadv": 128}  # one open per shard, ever
    for index in order:
        folder[(index, index)]
    assert calls["open"] == 128  # the folder: one open per image (the counter counts)


def test_open_files_stay_within_their_budget_and_a_forked_process_opens_its_own(
        packed: Path) -> None:
    paths = [str(path) for path in sorted(packed.glob("train-*.tar"))]
    files = OpenFiles(capacity=3)
    parent_fds = [files.fd(path) for path in paths]
    assert len(files) == 3 and files.fd(paths[-1]) == parent_fds[-1]  # kept open, reused
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a loader worker, forked with the parent's cache
        fd = files.fd(paths[-1])
        os.write(write, f"{fd} {os.lseek(fd, 0, os.SEEK_CUR)} {len(files)}".encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    fd, _, count = map(int, os.read(read, 100).split())
    os.close(read)
    assert count == 1  # the inherited descriptors were closed, one opened anew
    assert os.fstat(parent_fds[-1]).st_ino == os.stat(paths[-1]).st_ino  # the parent's still open
    files.close()


def test_an_interrupted_pack_keeps_its_finished_shards_and_ends_as_a_fresh_one(
        source: Path, packed: Path, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    # Ctrl-C while the fourth shard is being written: its .tmp is partial.
    (hook / "sitecustomize.py").write_text(
        "import os, signal, time\n"
        "from imgtrain.data import shard_writer\n"
        "original = shard_writer.write_shard\n"
        "def interrupting(task):\n"
        "    if task.name == 'train-000003.tar':\n"
        "        open(task.path + '.tmp', 'wb').write(b'partial')\n"
        "        os.kill(os.getppid(), signal.SIGINT)\n"
        "        time.sleep(600)\n"
        "    return original(task)\n"
        "shard_writer.write_shard = interrupting\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "imgtrain.pack", str(source), str(out), PER_SHARD,
                           "--workers=1"], capture_output=True, text=True, timeout=STATE_BOUND_S,
                          env={**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{REPO / 'src'}"})
    assert proc.returncode == 130 and "interrupted" in proc.stderr, proc.stderr
    finished = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns)
                for path in out.glob("*.tar")}
    assert sorted(finished) == [f"train-00000{i}.tar" for i in range(3)]
    assert (out / "train-000003.tar.tmp").exists() and not (out / INDEX_FILE).exists()

    assert pack.main([str(source), str(out), PER_SHARD, "--workers=2"]) == 0
    for name, identity in finished.items():  # kept, not written again
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == identity
    written = sorted(path.name for path in out.iterdir())
    assert written == sorted(path.name for path in packed.iterdir())  # no .tmp left
    for name in written:
        assert (out / name).read_bytes() == (packed / name).read_bytes(), name


def test_a_pack_into_another_packs_folder_is_refused(source: Path, packed: Path) -> None:
    with pytest.raises(ConfigError, match="holds a pack of another tree"):
        pack.pack(source, packed, 4096 * 4, None, 1, pack.PackProgress(0.0))


def _damaged_copy(packed: Path, tmp_path: Path) -> tuple[Path, Any]:
    copy = tmp_path / "damaged"
    shutil.copytree(packed, copy)
    return copy, np.load(copy / "train-index.npy")


def test_a_corrupt_image_in_a_shard_names_the_shard_and_offset_or_is_skipped(
        packed: Path, tmp_path: Path) -> None:
    copy, index = _damaged_copy(packed, tmp_path)
    record = index[20]
    shard = copy / f"train-{int(record['shard']):06d}.tar"
    with open(shard, "r+b") as f:  # the JPEG's bytes overwritten in place: same size
        f.seek(int(record["offset"]))
        f.write(b"\x00" * int(record["length"]))
    with pytest.raises(ConfigError) as error:
        ShardFolder(str(copy), "train", 32, True)[(20, 1)]
    assert str(error.value).startswith(f"corrupt or truncated image file: {shard} at byte "
                                       f"{int(record['offset'])} (sample 20 of train)")
    assert "\n" not in str(error.value)
    skipping = ShardFolder(str(copy), "train", 32, True, skip_bad_images=True)
    intact = ShardFolder(str(packed), "train", 32, True)
    assert torch.equal(skipping[(20, 1)][0], intact[(21, 1)][0])  # the next image instead


def test_a_truncated_shard_is_refused_before_the_run_or_skipped(packed: Path,
                                                                tmp_path: Path) -> None:
    copy, index = _damaged_copy(packed, tmp_path)
    last = index[index["shard"] == 2][-1]
    cut = int(last["offset"]) + 100
    os.truncate(copy / "train-000002.tar", cut)
    proc = run_cli("device=cpu", "dataset=imagenet", f"dataset.root={copy}",
                   "dataset.format=shards", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, f"shard {copy / 'train-000002.tar'} is truncated at byte {cut}",
                       f"from byte {int(last['offset'])} on are lost", "skip_bad_images")
    assert not (tmp_path / "run").exists()
    from imgtrain.config import DatasetConfig
    lenient = DatasetConfig(name="imagenet", root=str(copy), format="shards",
                            skip_bad_images=True)
    assert check_dataset(lenient)[0] == 4
    position = int(np.flatnonzero(index["offset"] == last["offset"])[0])
    skipping = ShardFolder(str(copy), "train", 32, True, skip_bad_images=True)
    assert skipping[(position, 1)][1] == int(index[position + 1]["label"])  # the next one


@pytest.mark.parametrize("given, fragment", [
    ("folder", "is an ImageFolder tree, not packed shards: pack it once with python -m "
               "imgtrain.pack"),
    ("missing", "does not exist"),
])
def test_shards_settings_pointing_elsewhere_are_one_line(source: Path, tmp_path: Path,
                                                         given: str, fragment: str) -> None:
    root = source if given == "folder" else tmp_path / "nothing"
    proc = run_cli("device=cpu", "dataset=imagenet", f"dataset.root={root}",
                   "dataset.format=shards", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, fragment)


def test_a_packed_folder_read_as_a_folder_says_to_set_the_format(packed: Path,
                                                                 tmp_path: Path) -> None:
    proc = run_cli("device=cpu", "dataset=imagenet", f"dataset.root={packed}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, "holds packed shards", "dataset.format=shards")


@pytest.mark.parametrize("argv, fragment", [
    (["src"], "the following arguments are required: out"),
    (["src", "out", "--shard-size=12"], "takes a size of 4k or more"),
    (["src", "out", "--samples-per-shard=0"], "takes a number of 1 or more"),
    (["src", "out", "--shard-size=1G", "--samples-per-shard=4"], "not allowed with"),
])
def test_bad_pack_arguments_are_one_line(argv: list[str], fragment: str,
                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        pack.main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and fragment in error, error


_TRACE = """
import hashlib, os
if os.environ.get("IMGTRAIN_TEST_TRACE"):
    # Test-only: every training image the shards give, by rank: index, seed, a digest of it.
    from imgtrain.data import shards

    original = shards.ShardFolder.__getitem__

    def traced(self, item):
        image, label = original(self, item)
        if self.train:
            rank = os.environ.get("RANK", "0")
            digest = hashlib.sha1(image.numpy().tobytes()).hexdigest()
            with open(os.path.join(os.environ["IMGTRAIN_TEST_TRACE"], f"rank{rank}"), "a") as f:
                f.write(f"{item[0]} {item[1]} {digest}\\n")
        return image, label

    shards.ShardFolder.__getitem__ = traced
"""


@pytest.mark.slow
def test_two_ranks_on_shards_stopped_mid_epoch_resume_on_one_with_the_folders_images(
        source: Path, packed: Path, tmp_path: Path) -> None:
    """A real run: 2 forked gloo ranks on the shards, stopped inside epoch 2, resumed on one
    process. Each epoch reads every image once, and each image the shards gave is the one the
    ImageFolder gives for the same (index, seed), bit for bit."""
    hook, first, second = tmp_path / "hook", tmp_path / "first", tmp_path / "second"
    for folder in (hook, first, second):
        folder.mkdir()
    (hook / "sitecustomize.py").write_text(_TRACE)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "IMGTRAIN_TEST_TRACE": str(first)}
    run_dir = tmp_path / "run"
    common = ["device=cpu", "amp=O0", "model=resnet18", "dataset=imagenet",
              f"dataset.root={packed}", "dataset.format=shards", "dataset.image_size=32",
              "dataset.workers=0", "train.batch_size=8", "train.epochs=2", "train.print_freq=2",
              "sched.warmup_epochs=0", f"hydra.run.dir={run_dir}"]
    proc = start_cli("world=8p", "world.nproc_per_node=2", "world.start_method=fork", *common,
                     env=env)
    wait_for(proc, lambda: re.search(r"epoch 2 \[2/8\]", (run_dir / "train.log").read_text()),
             "no epoch 2 [2/8] in train.log")
    with paused(proc):
        printed = re.findall(r"epoch 2 \[(\d)/8\]", (run_dir / "train.log").read_text())[-1]
        assert int(printed) <= 4, f"the run was at epoch 2 step {printed} already"
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=STATE_BOUND_S)
    assert proc.returncode == 143, stderr[-3000:]
    again = run_cli("world=1p", *common, env={**env, "IMGTRAIN_TEST_TRACE": str(second)})
    assert again.returncode == 0, again.stderr[-3000:]
    results = read_results(run_dir)
    assert results["epochs_completed"] == 2 and results["val_samples"] == 20

    def trace(path: Path) -> list[tuple[int, int, str]]:
        return [(int(i), int(s), d) for i, s, d in map(str.split, path.read_text().splitlines())]

    per_rank = [trace(first / f"rank{r}") for r in (0, 1)]
    resumed = trace(second / "rank0")
    epoch1 = per_rank[0][:32] + per_rank[1][:32]
    epoch2 = per_rank[0][32:] + per_rank[1][32:] + resumed
    assert 0 < len(per_rank[0]) - 32 < 32  # stopped inside epoch 2
    assert sorted(i for i, _, _ in epoch1) == sorted(i for i, _, _ in epoch2) == list(range(64))
    folder = JpegFolder(str(source), "train", 32, True)
    for index, seed, digest in epoch1 + epoch2:
        image = folder[(index, seed)][0]
        assert hashlib.sha1(image.numpy().tobytes()).hexdigest() == digest, index
