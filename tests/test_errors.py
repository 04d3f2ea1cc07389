"""Bad input: one `error:` line on stderr, a non-zero exit, no traceback, nothing overwritten."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import TINY, assert_clean_error, make_image_folder, run_cli

FOLDER_RUN = [*TINY, "dataset=imagenet", "dataset.image_size=32", "train.batch_size=8",
              "train.epochs=1"]


def test_missing_dataset_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    proc = run_cli(*FOLDER_RUN, f"dataset.root={missing}", f"hydra.run.dir={tmp_path / 'run'}")
    # It says what to do next: point dataset.root at the data, or try the quickstart.
    assert_clean_error(proc, str(missing), "does not exist", "dataset.root=",
                       "experiment=quickstart")


def test_empty_dataset_root(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_cli(*FOLDER_RUN, f"dataset.root={tmp_path / 'empty'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, "empty")


@pytest.mark.parametrize("missing_split", ["train", "val"])
def test_root_without_a_split(tmp_path: Path, missing_split: str) -> None:
    root = make_image_folder(tmp_path / "data", num_classes=2, per_class=2, val_per_class=1)
    shutil.rmtree(root / missing_split)
    proc = run_cli(*FOLDER_RUN, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, f"no {missing_split}/")


def test_class_folders_differ_between_train_and_val(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", num_classes=3, per_class=2, val_per_class=1)
    (root / "val" / "class_2").rename(root / "val" / "class_x")
    proc = run_cli(*FOLDER_RUN, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, "class folders differ", "class_x")


def test_unknown_arch_lists_the_valid_ones(tmp_path: Path) -> None:
    proc = run_cli(*TINY, "dataset=synthetic", "model.arch=resnet9000",
                   f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, "resnet9000", "resnet18", "resnet152")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpu_without_cuda(tmp_path: Path) -> None:
    proc = run_cli("experiment=quickstart", "device=gpu", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, "device=gpu", "CUDA")


@pytest.mark.parametrize("batch", ["0", "-4"])
def test_batch_size_below_one(tmp_path: Path, batch: str) -> None:
    proc = run_cli("experiment=quickstart", f"train.batch_size={batch}", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, "train.batch_size")


def _corrupt_one_image(root: Path) -> Path:
    victim = sorted((root / "train" / "class_1").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    return victim


def test_corrupt_image_is_named_or_skipped_on_request(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", num_classes=2, per_class=8, val_per_class=2)
    victim = _corrupt_one_image(root)
    proc = run_cli(*FOLDER_RUN, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, str(victim), "dataset.skip_bad_images=true")

    proc = run_cli(*FOLDER_RUN, f"dataset.root={root}", "dataset.skip_bad_images=true",
                   f"hydra.run.dir={tmp_path / 'skip'}")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: skipped bad image file {victim}: " in proc.stdout


@pytest.fixture(scope="module")
def trained_run(module_dir: Path) -> tuple[Path, Path]:
    """A small finished run: its data root and its run directory."""
    base = module_dir
    root = make_image_folder(base / "data", num_classes=2, per_class=8, val_per_class=2)
    run_dir = base / "run"
    proc = run_cli(*FOLDER_RUN, f"dataset.root={root}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return root, run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file and folder of a run: records, events, log, checkpoints, results."""
    return {str(p.relative_to(run_dir)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(run_dir.rglob("*"))}


def test_bad_weights_files_are_named_and_leave_no_folder(trained_run: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    root, _ = trained_run
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    other_classes = tmp_path / "ten.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), other_classes)
    cases = [(tmp_path / "absent.pt", "not found"), (not_a_checkpoint, "not a PyTorch checkpoint"),
             (other_classes, "10 classes")]
    for weights, fragment in cases:
        run_dir = tmp_path / "eval" / weights.stem
        proc = run_cli(*FOLDER_RUN, f"dataset.root={root}", "mode=eval", f"model.weights={weights}",
                       f"hydra.run.dir={run_dir}")
        assert_clean_error(proc, str(weights), fragment)
        assert not run_dir.exists()  # a start-up failure leaves no run folder behind


@pytest.mark.parametrize("command", [
    ["mode=eval", "model.weights={run}/checkpoints/last.pt"],   # eval into a training run
    ["model=resnet34"],                                          # a resume into another arch
    ["train.batch_size=abc"],                                    # a bad type
    ["+train.unknown=1"],                                        # a key imgtrain does not know
])
def test_a_failed_command_in_a_finished_run_changes_none_of_its_files(
        trained_run: tuple[Path, Path], command: list[str]) -> None:
    root, run_dir = trained_run
    before = _snapshot(run_dir)
    proc = run_cli(*FOLDER_RUN, f"dataset.root={root}", *(c.format(run=run_dir) for c in command),
                   f"hydra.run.dir={run_dir}")
    assert_clean_error(proc)
    assert _snapshot(run_dir) == before


def test_a_failed_start_leaves_no_timestamped_folder(tmp_path: Path) -> None:
    proc = run_cli(*FOLDER_RUN, f"dataset.root={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert_clean_error(proc, "does not exist")
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not list(outputs.rglob("*")), list(outputs.rglob("*"))


def test_download_without_a_network_is_one_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets
    from imgtrain.data.cifar import find_root
    from imgtrain.errors import ConfigError

    def offline(*args: object, **kwargs: object) -> None:
        """What torchvision's download does on a machine without a network."""
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(ConfigError, match="could not fetch CIFAR-10") as caught:
        find_root(str(tmp_path / "cifar"), download=True)
    assert "\n" not in str(caught.value) and "name resolution" in str(caught.value)


def test_a_wrong_type_is_one_line_naming_the_key(tmp_path: Path) -> None:
    for override, key in (("train.batch_size=abc", "train.batch_size"),
                          ("model.compile=maybe", "model.compile")):
        proc = run_cli("experiment=quickstart", override, f"hydra.run.dir={tmp_path / 'run'}")
        assert_clean_error(proc, key, "abc" if "abc" in override else "maybe")


def test_unknown_key_or_group_option_fails(tmp_path: Path) -> None:
    proc = run_cli("experiment=quickstart", "train.epoch=3", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, "unknown config key train.epoch (did you mean train.epochs?)")
    for override in ("optim.lrr=0.1", "+optim.lrr=0.1"):  # Hydra's refusal, and imgtrain's
        proc = run_cli("experiment=quickstart", override, f"hydra.run.dir={tmp_path}")
        assert_clean_error(proc, "unknown config key optim.lrr (did you mean optim.lr?)")
    from imgtrain.config import unknown_key_line
    assert "did you mean" not in unknown_key_line("optim.zzz")  # nothing close: no guess
    proc = run_cli("experiment=quickstart", "model=resnet7", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, "resnet7", "resnet18")


def test_an_override_hydra_cannot_read_is_named_with_the_fix(tmp_path: Path) -> None:
    weights = "runs/10-00-00_lr=0.1/checkpoints/best.pt"  # another tool's folder, with an =
    proc = run_cli("experiment=quickstart", "mode=eval", f"model.weights={weights}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, f"cannot read the override model.weights={weights}",
                       "mismatched input '='", "needs quotes", '"model.weights=\'...\'"')
    quoted = run_cli("experiment=quickstart", "mode=eval", f"model.weights='{weights}'",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(quoted, weights, "not found")  # read now: it names the missing file
    assert not (tmp_path / "run").exists()


def test_a_file_that_is_not_an_image_is_named_without_python_internals(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", num_classes=2, per_class=8, val_per_class=2)
    victim = sorted((root / "train" / "class_1").iterdir())[0]
    victim.write_bytes(b"not an image at all " * 20)
    proc = run_cli(*FOLDER_RUN, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, str(victim), "not an image format PIL can read")
    assert "BytesIO" not in proc.stdout + proc.stderr  # was: <_io.BytesIO object at 0x...>


def test_start_warnings_print_as_every_other_line(tmp_path: Path) -> None:
    """Said before the ranks start, without Hydra's `[date][HYDRA]` prefix: a warm-up as long as
    the run, and more processes than CPU cores (here one more than this machine has: they start,
    each finds model.weights missing, and the run ends)."""
    import os

    processes = len(os.sched_getaffinity(0)) + 1
    if processes > 17:
        pytest.skip(f"would start {processes} processes on this {processes - 1}-core machine")
    proc = run_cli(*TINY, "dataset=synthetic", f"dataset.train_size={2 * processes}",
                   "dataset.val_size=8", "dataset.image_size=32",
                   f"train.batch_size={2 * processes}", "train.epochs=1", "sched.warmup_epochs=1", "world=8p",
                   f"world.nproc_per_node={processes}", "world.start_method=fork",
                   f"model.weights={tmp_path / 'absent.pt'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(proc, "absent.pt")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("warning: sched.warmup_epochs=1.0 is not shorter than train.epochs=1")
    assert lines[1].startswith(f"warning: {processes} processes on {processes - 1} CPU cores are "
                               "oversubscribed")
    assert f"world.nproc_per_node={processes - 1} would" in lines[1]
    assert lines[2] == f"starting {processes} processes (fork); the start summary follows once " \
                       "all have joined"
    assert "HYDRA" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()
