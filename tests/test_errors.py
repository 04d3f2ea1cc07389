"""Bad input: one `error:` line on stderr, a non-zero exit, no traceback, nothing overwritten.

Most mistakes are checked in this process, at the layer of run.py's path that meets them: Hydra's
refusal of the command line (worded as cli.run_main words it), resolve's ConfigError, or the
Outcome of app.run (which run.py prints and exits with) for what only a worker finds. The tests
marked e2e run `python run.py` as a user types it, each a new interpreter (tests/conftest.py):
an override and a group option that Hydra refuses, a config error (a missing weights file) that
leaves no run folder, a worker's refusal and Hydra's in a finished run that leave it as it was,
and the lines printed before the ranks start.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from conftest import TINY, assert_clean_error, make_image_folder, run_cli
from imgtrain import app, records
from imgtrain.cli import config_error_line
from imgtrain.errors import ConfigError, one_line
from imgtrain.logger import close_logging
from imgtrain.resolve import resolve

FOLDER_RUN = [*TINY, "dataset=imagenet", "dataset.image_size=32", "train.batch_size=8",
              "train.epochs=1"]


def refused(compose, *overrides: str, match: str) -> str:
    """resolve's ConfigError for this command, as the one line run.py prints after
    `error: ` (app.run shows `one_line` of it)."""
    with pytest.raises(ConfigError, match=match) as caught:
        resolve(compose(*overrides), list(overrides))
    line = one_line(str(caught.value))
    assert re.search(match, line), line
    return line


def hydra_refusal(compose, *overrides: str) -> str:
    """The line run.py prints after `error: ` for a command line Hydra refuses to compose
    (cli.run_main words Hydra's and OmegaConf's errors with config_error_line)."""
    with pytest.raises((HydraException, OmegaConfBaseException)) as caught:
        compose(*overrides)
    return config_error_line(caught.value)


def run_app(compose, run_dir: Path, *overrides: str) -> app.Outcome:
    """`python run.py *overrides hydra.run.dir=run_dir`, in this process, from where Hydra hands
    over: Hydra has composed the config and chosen the run's record folder (hydra.output_subdir
    calls records.record_subdir, which notes whether the run folder is new), and run.py calls
    app.run with Hydra's task overrides. imgtrain's logger is left as it was found (app.run sets
    it up for the console and stops its propagation): caplog in a later test here reads it."""
    log = logging.getLogger("imgtrain")
    propagate, level = log.propagate, log.level
    records.record_subdir(str(run_dir))
    try:
        return app.run(compose(*overrides), str(run_dir), list(overrides), multirun=False)
    finally:
        close_logging()
        log.propagate = propagate
        log.setLevel(level)


def assert_failed(outcome: app.Outcome, *fragments: str) -> str:
    """What run.py makes of the outcome: exit code 1 and one `error:` line (outcome.error, one
    line) naming the fragments, no traceback, and no other `error:` line on stderr."""
    assert outcome.exit_code == 1, outcome
    assert outcome.error is not None and "\n" not in outcome.error, outcome
    assert not outcome.traceback, outcome.traceback
    assert not any(line.startswith("error: ") or "Traceback" in line
                   for line in outcome.stderr), outcome.stderr
    for fragment in fragments:
        assert fragment in outcome.error, outcome.error
    return outcome.error


def test_missing_dataset_root(compose, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    line = refused(compose, *FOLDER_RUN, f"dataset.root={missing}", match="does not exist")
    # It says what to do next: point dataset.root at the data, or try the quickstart.
    for fragment in (str(missing), "does not exist", "dataset.root=", "experiment=quickstart"):
        assert fragment in line, line


def test_empty_dataset_root(compose, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    refused(compose, *FOLDER_RUN, f"dataset.root={tmp_path / 'empty'}", match="empty")


@pytest.mark.parametrize("missing_split", ["train", "val"])
def test_root_without_a_split(compose, tmp_path: Path, missing_split: str) -> None:
    root = make_image_folder(tmp_path / "data", num_classes=2, per_class=2, val_per_class=1)
    shutil.rmtree(root / missing_split)
    refused(compose, *FOLDER_RUN, f"dataset.root={root}", match=f"no {missing_split}/")


def test_class_folders_differ_between_train_and_val(compose, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", num_classes=3, per_class=2, val_per_class=1)
    (root / "val" / "class_2").rename(root / "val" / "class_x")
    line = refused(compose, *FOLDER_RUN, f"dataset.root={root}", match="class folders differ")
    assert "class_x" in line, line


def test_unknown_arch_lists_the_valid_ones(compose) -> None:
    line = refused(compose, *TINY, "dataset=synthetic", "model.arch=resnet9000",
                   match="resnet9000")
    assert "resnet18" in line and "resnet152" in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpu_without_cuda(compose) -> None:
    line = refused(compose, "experiment=quickstart", "device=gpu", match="device=gpu")
    assert "CUDA" in line, line


@pytest.mark.parametrize("batch", ["0", "-4"])
def test_batch_size_below_one(compose, batch: str) -> None:
    refused(compose, "experiment=quickstart", f"train.batch_size={batch}",
            match="train.batch_size")


def _corrupt_one_image(root: Path) -> Path:
    victim = sorted((root / "train" / "class_1").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    return victim


def test_corrupt_image_is_named_or_skipped_on_request(compose, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """An error only a worker finds, reading the data, is one line too."""
    root = make_image_folder(tmp_path / "data", num_classes=2, per_class=8, val_per_class=2)
    victim = _corrupt_one_image(root)
    outcome = run_app(compose, tmp_path / "run", *FOLDER_RUN, f"dataset.root={root}")
    assert_failed(outcome, str(victim), "dataset.skip_bad_images=true")

    capsys.readouterr()
    outcome = run_app(compose, tmp_path / "skip", *FOLDER_RUN, f"dataset.root={root}",
                      "dataset.skip_bad_images=true")
    assert outcome.exit_code == 0 and outcome.error is None, outcome
    assert f"warning: skipped bad image file {victim}: " in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained_run(module_dir: Path) -> tuple[Path, Path]:
    """A small finished run, made by `python run.py` (its .hydra/ record included): its data root
    and its run directory."""
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


def test_bad_weights_files_are_named_and_leave_no_folder(compose, trained_run: tuple[Path, Path],
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
        outcome = run_app(compose, run_dir, *FOLDER_RUN, f"dataset.root={root}", "mode=eval",
                          f"model.weights={weights}")
        assert_failed(outcome, str(weights), fragment)
        assert not run_dir.exists()  # a start-up failure leaves no run folder behind


@pytest.mark.parametrize("command", [
    ["mode=eval", "model.weights={run}/checkpoints/last.pt"],   # eval into a training run
    ["model=resnet34"],                                          # a resume into another arch
    ["+train.unknown=1"],                                        # a key imgtrain does not know
])
def test_a_failed_command_in_a_finished_run_changes_none_of_its_files(
        compose, trained_run: tuple[Path, Path], command: list[str]) -> None:
    root, run_dir = trained_run
    before = _snapshot(run_dir)
    outcome = run_app(compose, run_dir, *FOLDER_RUN, f"dataset.root={root}",
                      *(c.format(run=run_dir) for c in command))
    assert_failed(outcome)
    assert _snapshot(run_dir) == before


@pytest.mark.e2e
def test_failed_commands_in_a_finished_run_leave_it_as_it_was(
        trained_run: tuple[Path, Path]) -> None:
    """As a user runs them: Hydra's record of each command (.hydra-2/) goes again with it, a
    worker's refusal (a resume into another arch) and Hydra's (a bad type) alike."""
    root, run_dir = trained_run
    before = _snapshot(run_dir)
    for command in (["model=resnet34"], ["train.batch_size=abc"]):
        proc = run_cli(*FOLDER_RUN, f"dataset.root={root}", *command, f"hydra.run.dir={run_dir}")
        assert proc.returncode == 1, proc.stderr
        assert_clean_error(proc)
        assert _snapshot(run_dir) == before


def test_download_without_a_network_is_one_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets
    from imgtrain.data.cifar import find_root

    def offline(*args: object, **kwargs: object) -> None:
        """What torchvision's download does on a machine without a network."""
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(ConfigError, match="could not fetch CIFAR-10") as caught:
        find_root(str(tmp_path / "cifar"), download=True)
    assert "\n" not in str(caught.value) and "name resolution" in str(caught.value)


def test_a_wrong_type_is_one_line_naming_the_key(compose) -> None:
    for override, key in (("train.batch_size=abc", "train.batch_size"),
                          ("model.compile=maybe", "model.compile")):
        line = hydra_refusal(compose, "experiment=quickstart", override)
        assert "\n" not in line and key in line, line
        assert ("abc" if "abc" in override else "maybe") in line, line


def test_unknown_key_fails(compose) -> None:
    line = hydra_refusal(compose, "experiment=quickstart", "train.epoch=3")
    assert "unknown config key train.epoch (did you mean train.epochs?)" in line, line
    # Hydra's refusal, and imgtrain's (resolve: the schema has no such key)
    line = hydra_refusal(compose, "experiment=quickstart", "optim.lrr=0.1")
    assert "unknown config key optim.lrr (did you mean optim.lr?)" in line, line
    line = refused(compose, "experiment=quickstart", "+optim.lrr=0.1", match="optim.lrr")
    assert "unknown config key optim.lrr (did you mean optim.lr?)" in line, line
    from imgtrain.config import unknown_key_line
    assert "did you mean" not in unknown_key_line("optim.zzz")  # nothing close: no guess


@pytest.mark.e2e
def test_a_group_option_that_does_not_exist_lists_the_options(tmp_path: Path) -> None:
    proc = run_cli("experiment=quickstart", "model=resnet7", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr
    assert_clean_error(proc, "resnet7", "resnet18")


@pytest.mark.e2e
def test_an_override_hydra_cannot_read_is_named_with_the_fix(tmp_path: Path) -> None:
    """Hydra's refusal of an argument, then a config error once it is quoted (the weights file is
    missing): one line each, and no timestamped run folder left behind."""
    weights = "runs/10-00-00_lr=0.1/checkpoints/best.pt"  # another tool's folder, with an =
    proc = run_cli("experiment=quickstart", "mode=eval", f"model.weights={weights}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert_clean_error(proc, f"cannot read the override model.weights={weights}",
                       "mismatched input '='", "needs quotes", '"model.weights=\'...\'"')
    quoted = run_cli("experiment=quickstart", "mode=eval", f"model.weights='{weights}'",
                     cwd=tmp_path)
    assert quoted.returncode == 1, quoted.stderr
    assert_clean_error(quoted, weights, "not found")  # read now: it names the missing file
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not list(outputs.rglob("*")), list(outputs.rglob("*"))


def test_a_file_that_is_not_an_image_is_named_without_python_internals(
        compose, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_image_folder(tmp_path / "data", num_classes=2, per_class=8, val_per_class=2)
    victim = sorted((root / "train" / "class_1").iterdir())[0]
    victim.write_bytes(b"not an image at all " * 20)
    outcome = run_app(compose, tmp_path / "run", *FOLDER_RUN, f"dataset.root={root}")
    assert_failed(outcome, str(victim), "not an image format PIL can read")
    printed = capsys.readouterr()
    # was: <_io.BytesIO object at 0x...>
    assert "BytesIO" not in printed.out + printed.err + outcome.error + "\n".join(outcome.stderr)


@pytest.mark.e2e
def test_start_warnings_print_as_every_other_line(tmp_path: Path) -> None:
    """Said before the ranks start, without Hydra's `[date][HYDRA]` prefix: a warm-up as long as
    the run, and more processes than CPU cores (here one more than this machine has: they start,
    each finds its training set smaller than the batch, which only building it tells, and the
    run ends)."""
    import os

    processes = len(os.sched_getaffinity(0)) + 1
    if processes > 17:
        pytest.skip(f"would start {processes} processes on this {processes - 1}-core machine")
    proc = run_cli(*TINY, "dataset=synthetic", f"dataset.train_size={processes}",
                   "dataset.val_size=8", "dataset.image_size=32",
                   f"train.batch_size={2 * processes}", "train.epochs=1", "sched.warmup_epochs=1", "world=8p",
                   f"world.nproc_per_node={processes}", "world.start_method=fork",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1, proc.stderr
    assert_clean_error(proc, "is larger than the training set")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("warning: sched.warmup_epochs=1.0 is not shorter than train.epochs=1")
    assert lines[1].startswith(f"warning: {processes} processes on {processes - 1} CPU cores are "
                               "oversubscribed")
    assert f"world.nproc_per_node={processes - 1} would" in lines[1]
    assert lines[2] == f"starting {processes} processes (fork); the start summary follows once " \
                       "all have joined"
    assert "HYDRA" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()
