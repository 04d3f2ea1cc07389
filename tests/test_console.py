"""What a user sees on the console: the live display on a terminal, plain lines elsewhere,
the start and end summaries, `--help`, and the memory check before training."""
from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, SHORT, start_cli
from imgtrain import memory

PLAIN_LINE = re.compile(r"^epoch 1 \[(\d)/4\] loss [\d.]+ acc1 [\d.]+ img/s [\d.]+ lr [\d.]+ "
                        r"data \d+% \| ETA epoch \d+:\d\d:\d\d run \d+:\d\d:\d\d$")
SUMMARY_KEYS = ("model      resnet18", "data       synthetic: 256 train / 128 val images, 10 "
                "classes, 32 px", "device     cpu x 1 process", "precision  amp=O0 (float32), "
                "no loss scaling", "batch      64 global (64 per device)", "lr         0.1 = ",
                "schedule   cosine after 1 warm-up epoch", "length     1 epoch x 4 steps = 4 steps",
                "resume     no: a new run")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(*overrides: str, columns: int, timeout: float = 300) -> str:
    """`python run.py ...` with stdout on a pseudo-terminal of `columns`, as in a shell."""
    leader, follower = pty.openpty()
    env = {"TERM": "xterm-256color", "COLUMNS": str(columns)}
    if "NO_COLOR" in os.environ:
        env["NO_COLOR"] = ""  # empty: unset, for rich (the variable cannot be removed here)
    proc = start_cli(*overrides, env=env, terminal=os.ttyname(follower))
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    os.close(follower)  # held open until here: the run opens the terminal by its path
    assert proc.wait(timeout=30) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_an_80_column_terminal_shows_the_essentials_and_train_log_stays_plain(
        tmp_path: Path) -> None:
    # A run folder as long as a sweep's: its line cannot fit 80 columns whole.
    run_dir = tmp_path / "outputs/2026-12-07/01-02-03_experiment-quickstart+train.epochs-1"
    screen = run_in_terminal(*SHORT, f"hydra.run.dir={run_dir}", columns=80)
    assert "\x1b[" in screen  # rich redraws the display in place
    # What the eye sees, frame by frame: styles and cursor moves out, each redraw on its own line.
    text = ANSI.sub("", screen).replace("\r", "\n")
    for fragment in SUMMARY_KEYS:
        assert fragment in text, text
    summary = text[text.index("imgtrain: train"):text.index("resume     no: a new run")]
    # Every line fits, the run folder's too: broken after a / or _, continued under the value.
    lines = summary.splitlines()
    assert max(map(len, lines)) <= 80, summary
    first = next(i for i, line in enumerate(lines) if line.startswith("  run dir    "))
    folder = [lines[first][13:]] + [line[13:] for line in lines[first + 1:]
                                    if line.startswith(" " * 13)]
    assert len(folder) > 1 and "".join(folder) == str(run_dir), summary
    assert all(part[-1] in "/_+," for part in folder[:-1]), folder  # never inside a word
    done = [line for line in text[text.index("epoch 1 done:"):].splitlines() if line.strip()]
    assert max(len(done[0]), len(done[1])) <= 80 and done[1].startswith("    "), done
    # Epoch, bar, step, loss and the run's ETA, whole; lr, data % and img/s make way for them.
    live = re.findall(r"^epoch 1/1 +[━╺╸]{10,} 2/4 loss [\d.]+ .*\| ETA .*\d:\d\d run *$", text,
                      re.MULTILINE)
    assert live and max(map(len, live)) <= 80, text
    assert not any(word in live[0] for word in ("lr ", "data ", "img/s ")), live
    assert re.search(r"validation [━╺╸ ]+ 2/2 ETA", text), text  # validation's own progress
    assert "epoch 1 done:" in text and "done in " in text
    # The display replaces the plain lines on the terminal...
    assert not re.search(r"^epoch 1 \[2/4\]", text, re.MULTILINE)
    # ...but train.log keeps them whole, with no control character at all.
    log = (run_dir / "train.log").read_text()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", log), repr(log)
    steps = [PLAIN_LINE.match(line[24:]) for line in log.splitlines() if "] loss" in line]
    assert [match.group(1) for match in steps if match] == ["2", "4"], log


def _live_rows(width: int, epochs: int, steps: int, val_steps: int, monkeypatch) -> list[str]:
    """The live display's rows as rich draws them on a terminal of `width` columns, at the first
    print point of a long run (4-digit steps, 3 s a step: an ETA of days), with validation's row
    under it."""
    from rich.console import Console
    view, clock = _progress_for(monkeypatch, ema=False, accumulate_steps=1)
    view.epochs, view.steps_per_epoch, view.val_steps = epochs, steps, val_steps
    view.eta.epochs, view.eta.steps_per_epoch, view.eta.val_steps = epochs, steps, val_steps
    view.console = Console(file=io.StringIO(), width=width, force_terminal=True)
    with view:
        view.start_epoch(0, 0)
        values = {"train/loss": 2.2497, "train/acc1": 34.84,
                  "throughput/images_per_sec": 1232.7, "train/lr": 0.05250}
        view.train_update(0, 1230, values, seconds=1230 * 3.0, data_time=0.01)
        view.start_val()
        clock.now += 30.0
        view.val_update(390)  # half-way: redrawn every other batch
        lines = view.console.render_lines(view._live.get_renderable(), pad=False)
    return ["".join(segment.text for segment in line).rstrip() for line in lines]


def test_every_width_from_60_columns_keeps_epoch_step_bar_loss_and_run_eta(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for width in range(60, 161):
        train, val = _live_rows(width, 90, 5005, 782, monkeypatch)
        assert len(train) <= width and len(val) <= width, (width, train, val)
        match = re.match(r"epoch 1/90 +([━╺╸]+) 1230/5005 loss 2\.2497 (.*)\| ETA (.*) run$", train)
        assert match, (width, train)
        assert len(match.group(1)) >= 5 and match.group(3).endswith("16d 9:54:00"), (width, train)
        assert re.match(r"validation +[━╺╸]+ 390/782 +ETA 0:00:30$", val), (width, val)
        shown = match.group(2)
        if width >= 80:
            assert "acc1 34.84" in shown, (width, train)
        # Given up in this order: lr first, then data %, then img/s.
        order = ["img/s 1232.7" in shown, "data " in shown, "lr 0.05250" in shown]
        assert order == sorted(order, reverse=True), (width, train)
    wide, _ = _live_rows(160, 90, 5005, 782, monkeypatch)
    assert re.search(r" [━╺╸]{30} 1230/5005 loss 2\.2497 acc1 34\.84 img/s 1232\.7 lr 0\.05250 "
                     r"data 0% \| ETA 3:08:45 epoch, 16d 9:54:00 run$", wide), wide


def test_without_a_terminal_each_print_point_is_a_plain_line_with_the_run_eta(
        plain_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp_path, proc = plain_run
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert [m.group(1) for m in map(PLAIN_LINE.match, lines) if m] == ["2", "4"], proc.stdout
    for fragment in (*SUMMARY_KEYS, f"run dir    {tmp_path}"):
        assert any(fragment in line for line in lines), (fragment, proc.stdout)
    end = lines[lines.index(next(line for line in lines if line.startswith("done in "))):]
    assert re.match(r"done in \d+:\d\d:\d\d: best acc1 [\d.]+ \(epoch 1\), final acc1 [\d.]+ "
                    r"acc5 [\d.]+$", end[0]), end
    assert re.match(r"  speed      [\d.]+ img/s$", end[1]), end
    assert end[2:] == [f"  results    {tmp_path / 'results.json'}",
                       f"  best       {tmp_path / 'checkpoints' / 'best.pt'}"]
    assert (tmp_path / "train.log").read_text().count("] loss") == 2


def test_help_lists_groups_keys_and_commands() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for group_line in ("amp: O0, O1, O2", "dataset: cifar10, imagenet, synthetic",
                       "device: auto, cpu, gpu, npu",
                       "experiment: cifar10_resnet18, quickstart, resnet152_lowres, resnet152_v2, "
                       "small_images",
                       "model: resnet101, resnet152, resnet18, resnet34, resnet50",
                       "sched: cosine, step", "world: 1p, 8p"):
        assert group_line in text, text
    for key in ("dataset.root", "train.batch_size", "train.epochs", "optim.lr", "amp.level",
                "train.memory_check", "model.weights"):
        assert re.search(rf"^\s+{re.escape(key)}\s+\S", text, re.MULTILINE), key
    for command in ("python run.py experiment=quickstart",
                    "python run.py -m experiment=quickstart optim.lr=0.002,0.1",
                    "tensorboard --logdir outputs", "python -m imgtrain.report"):
        assert command in text
    assert "powered by Hydra" not in text  # Hydra's generic help is replaced, not appended


# ---- the memory check -------------------------------------------------------------------------
def test_the_estimate_grows_with_the_batch_and_model() -> None:
    small = memory.estimate("resnet18", 10, 32, "O0", half=False)
    bigger = memory.estimate("resnet18", 10, 64, "O0", half=False)
    assert 0 < small.per_image < bigger.per_image
    assert bigger.total(64) - bigger.total(32) == pytest.approx(32 * bigger.per_image)
    assert memory.estimate("resnet18", 10, 64, "O2", half=True).total(64) < bigger.total(64)
    # ResNet-152 at 224 px, batch 256, fp32: the run the kernel killed at 24 GB resident.
    recipe = memory.estimate("resnet152", 1000, 224, "O0", half=False)
    assert recipe.total(256) > 24 * memory.GIB


def test_the_suggested_batch_fits_and_its_double_does_not() -> None:
    est = memory.estimate("resnet18", 1000, 64, "O0", half=False)
    available = est.total(100) * (1 + memory.MARGIN)
    fits = memory.fitting_batch(est, available)
    assert fits == 64
    with_margin = 1 + memory.MARGIN
    assert est.total(fits) * with_margin <= available < est.total(2 * fits) * with_margin
    assert memory.fitting_batch(est, est.fixed / 2) == 0


def _run_in_process(compose, tmp_path: Path, *overrides: str):
    """app.run as run.py calls it, in this process (1 process: the worker runs here too); its
    Outcome, which run.py turns into stderr lines and an exit code."""
    from imgtrain.app import run
    cfg = compose(*SHORT, "train.steps_per_epoch=1", *overrides)
    OmegaConf.set_struct(cfg, False)
    return run(cfg, str(tmp_path), list(overrides), multirun=False)


def test_a_run_that_cannot_fit_stops_with_one_line_before_training(
        compose, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    est = memory.estimate("resnet18", 10, 32, "O0", half=False)
    # The host has room for 16 of the 64 images of a step, with the margin, as far as it knows.
    room = est.total(16) * (1 + memory.MARGIN) + 1
    monkeypatch.setattr(memory, "_host_available", lambda: room)
    outcome = _run_in_process(compose, tmp_path / "run")
    assert outcome.exit_code == 1
    # run.py prints the outcome's stderr lines, then `error: ` and its error: that one line only.
    assert outcome.stderr == () and not outcome.traceback, outcome
    assert capsys.readouterr().err.strip() == ""
    err = f"error: {outcome.error}"
    assert len(err.splitlines()) == 1 and err.startswith("error: training needs about "), err
    needed = est.total(64) * (1 + memory.MARGIN)
    assert f"{needed / memory.GIB:.1f} GiB per process (the estimate and a 10% margin" in err
    assert f"but {room / memory.GIB:.1f} GiB is of host memory available" in err
    assert "train.batch_size=16 fits" in err and "train.memory_check=false" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # it stopped before training

    # Turned off, the same run trains.
    assert _run_in_process(compose, tmp_path / "unchecked",
                           "train.memory_check=false").exit_code == 0
    assert (tmp_path / "unchecked" / "checkpoints" / "last.pt").is_file()


def _check(compose, monkeypatch: pytest.MonkeyPatch, device: object, available: float,
           *overrides: str) -> None:
    """check_memory for the config `overrides` make, with `available` bytes on `device`."""
    from imgtrain.distributed import World
    from imgtrain.resolve import resolve
    plan = resolve(compose(*SHORT, *overrides), [])  # resnet18, 10 classes, amp=O0
    monkeypatch.setattr(memory, "available_bytes", lambda *_: (available, "free on the device"))
    memory.check_memory(plan, device, World())


def test_the_check_counts_the_ema_the_runtime_and_a_margin(
        compose, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the issue found missing: the EMA's fp32 copy, an accelerator's context, a margin."""
    from imgtrain.device import DeviceInfo
    from imgtrain.errors import ConfigError
    cpu, gpu = DeviceInfo("cpu"), DeviceInfo("gpu", 0)  # a GPU only as a name: nothing runs on it
    plain = memory.estimate("resnet18", 10, 32, "O0", half=False)
    params = 11_181_642  # resnet18 with 10 classes
    # The EMA's copy: 4 bytes a parameter more (its build's second copy comes before any step).
    with_ema = memory.estimate("resnet18", 10, 32, "O0", half=False, ema=True)
    assert with_ema.total(64) - plain.total(64) >= 4 * params
    room = plain.total(64) * (1 + memory.MARGIN)
    _check(compose, monkeypatch, cpu, room)  # fits, with its margin
    with pytest.raises(ConfigError, match="training needs about"):
        _check(compose, monkeypatch, cpu, room, "ema.decay=0.9")
    # The margin: the estimate alone is not enough room.
    with pytest.raises(ConfigError, match="10% margin"):
        _check(compose, monkeypatch, cpu, plain.total(64) * 1.05)
    # A GPU's context and kernels lie outside the allocator, and in the estimate.
    on_gpu = memory.estimate("resnet18", 10, 32, "O0", half=False, device_name="gpu")
    assert on_gpu.runtime == memory.RUNTIME_BYTES["gpu"] >= 0.5 * memory.GIB
    allocator_peak = on_gpu.total(64) - on_gpu.runtime
    with pytest.raises(ConfigError, match="GiB is free on the device"):
        _check(compose, monkeypatch, gpu,
               (allocator_peak + 0.25 * memory.GIB) * (1 + memory.MARGIN))


@pytest.mark.slow
def test_the_estimate_is_not_below_a_real_runs_peak(tmp_path: Path) -> None:
    """benchmarks/memory_check.py --quick: a short run of run.py (resnet18, 32 px, batch 8, EMA)
    in a process of its own, its peak RSS over the RSS at the check, against the estimate."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory_check.py"), "--quick",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| resnet18 | 32 |"))
    estimate, measured, ratio = (float(cell) for cell in row.split("|")[6:9])
    assert measured > 50 and ratio == pytest.approx(estimate / measured, abs=0.01)
    assert 1.0 <= ratio <= 1.5, proc.stdout  # never below; the full benchmark's target is 1.25


class _FakeAcceleratorMemory:
    """Stands for torch.cuda / torch.npu's allocator counters (no accelerator on this machine)."""

    def __init__(self) -> None:
        self.peak, self.resets = 3 << 30, 0

    def max_memory_allocated(self, device: object) -> int:
        return self.peak

    def memory_reserved(self, device: object) -> int:
        return 5 << 30

    def reset_peak_memory_stats(self, device: object) -> None:
        self.resets += 1


def test_memory_scalars_read_the_device_module_or_the_host_rss() -> None:
    from imgtrain.device import DeviceInfo

    fake = _FakeAcceleratorMemory()

    class FakeGpu(DeviceInfo):
        def module(self) -> object:
            return fake

    scalars = memory.memory_scalars(FakeGpu("gpu", 0))
    assert scalars == {"memory/max_allocated_gib": 3.0, "memory/reserved_gib": 5.0}
    assert fake.resets == 1  # each print window reports its own peak
    host = memory.memory_scalars(DeviceInfo("cpu"))
    assert set(host) == {"memory/host_rss_gib"} and 0.01 < host["memory/host_rss_gib"] < 512


# ---- the run's ETA ----------------------------------------------------------------------------
class _Clock:
    """time.perf_counter for the progress module: the test says how much time passes."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _ValLoader(list):
    """Stands for the validation DataLoader: its length and batch size."""

    def __init__(self, batches: int, batch_size: int) -> None:
        super().__init__([None] * batches)
        self.batch_size = batch_size


def _progress_for(monkeypatch: pytest.MonkeyPatch, ema: bool, accumulate_steps: int,
                  val_batch: int | None = None):
    """Rank 0's Progress as the trainer builds it: 2 epochs of 10 steps of 64 images per rank,
    6 validation batches of one micro-batch (or `val_batch`: eval.batch_size's)."""
    from types import SimpleNamespace

    from imgtrain import eta, progress
    from imgtrain.device import DeviceInfo
    clock = _Clock()
    monkeypatch.setattr(eta.time, "perf_counter", clock)
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    monkeypatch.setattr(progress, "live_console", lambda: None)
    plan = SimpleNamespace(train=SimpleNamespace(epochs=2, print_freq=2),
                           batches=SimpleNamespace(per_rank=64, accumulate_steps=accumulate_steps))
    trainer = SimpleNamespace(
        world=SimpleNamespace(is_main=True), plan=plan, steps_per_epoch=10,
        device=DeviceInfo("cpu"), ema=object() if ema else None,
        loaders=SimpleNamespace(val=_ValLoader(6, val_batch or 64 // accumulate_steps)))
    return progress.Progress.for_trainer(trainer), clock


def _eta_seconds(view, epoch: int) -> float:
    """The run's ETA at the epoch's first print point (step 2, 1 s a step), as logged."""
    values = {"train/loss": 1.0, "train/acc1": 50.0, "throughput/images_per_sec": 10.0,
              "train/lr": 0.1}
    view.start_epoch(epoch, 0)
    return view.train_update(epoch, 2, values, seconds=2.0, data_time=0.0)["time/eta_hours"] * 3600


@pytest.mark.parametrize("ema", [False, True])
def test_the_eta_guesses_validation_from_one_batch_not_a_whole_step(
        monkeypatch: pytest.MonkeyPatch, ema: bool) -> None:
    # A step is 4 micro-batches of 1 s in all; a validation batch is one micro-batch, forward only:
    # 0.25 s / 3. Left: 8 steps, this epoch's validation, 10 steps, the last validation.
    view, _ = _progress_for(monkeypatch, ema=ema, accumulate_steps=4)
    models = 2 if ema else 1  # the EMA's forward on each batch too
    validation = models * 6 * 0.25 / 3
    assert _eta_seconds(view, 0) == pytest.approx(8 + validation + 10 + validation)
    # With eval.batch_size=128 on one device, a validation batch holds two steps' images.
    view, _ = _progress_for(monkeypatch, ema=False, accumulate_steps=4, val_batch=128)
    assert _eta_seconds(view, 0) == pytest.approx(8 + 6 * 2 / 3 + 10 + 6 * 2 / 3)


def test_the_eta_counts_the_validation_pass_the_ema_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    view, clock = _progress_for(monkeypatch, ema=True, accumulate_steps=1)
    _eta_seconds(view, 0)
    view.start_val()  # the epoch ends: one pass, the model and the EMA on each batch, 6 s
    clock.now += 6.0
    view.end_val()
    # In the last epoch, at step 2: 8 steps of 1 s and the validation pass as measured.
    assert _eta_seconds(view, 1) == pytest.approx(8 + 6.0)


def _summary_parts(compose, image_folder: Path):
    """world=8p's plan (long lr rule, recipe) and the parts of a trainer its summary reads."""
    from types import SimpleNamespace

    import torch

    from imgtrain.resolve import resolve
    plan = resolve(compose("world=8p", "device=cpu", f"dataset.root={image_folder}",
                           "sched.warmup_epochs=1", "train.label_smoothing=0.1",
                           "ema.decay=0.9999"), [])
    assert plan.lr_rule == ("optim.lr_base 0.1 x global batch 2048 / 256 (the seed's linear "
                            "rule; set optim.lr to override)")
    images = SimpleNamespace(dataset=[0] * 1281167)
    trainer = SimpleNamespace(
        loaders=SimpleNamespace(train=images, val=SimpleNamespace(dataset=[0] * 50000)),
        state=None, steps_per_epoch=625, model=torch.nn.Linear(2, 2),
        ema=SimpleNamespace(every_steps=32, decay=0.99),
        device=SimpleNamespace(device_string="npu", backend="hccl"),
        precision=SimpleNamespace(dtype=torch.float16, scaler=object(), static_scale=1024.0,
                                  level="O2"))
    return plan, trainer


def test_the_start_summary_fits_80_columns_and_says_whose_print_point_numbers_they_are(
        compose, image_folder: Path) -> None:
    """world=8p's summary (long lr rule, recipe and paths) as rank 0 prints it, built from the
    real plan with the trainer's parts stood in by what the summary reads."""
    from types import SimpleNamespace

    import torch

    from imgtrain.summary import start_lines
    plan, trainer = _summary_parts(compose, image_folder)
    lines = start_lines(plan, trainer, Path("outputs/2026-12-03/10-00-00_world-8p"), None)
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    assert "  batch      2048 global (256 per device)\n" in text
    assert "  schedule   cosine after 1 warm-up epoch\n" in text
    assert "  length     140 epochs x 625 steps = 87,500 steps\n" in text
    assert "  console    print-point loss and acc1: rank 0's; epoch lines: all 8 processes'" \
        in lines


# ---- lines wrapped on a terminal -------------------------------------------------------------
LONG_RUN_DIR = Path("/tmp/pytest-of-root/pytest-12/popen-gw1/test_a_long_run_folder0/outputs/"
                    "2026-12-07/01-02-03_experiment-quickstart+optim.lr-0.002+train.epochs-3+"
                    "dataset.image_size-32")


def _assert_wrapped(line: str, pieces: list[str], width: int, indent: int) -> None:
    """Every piece fits `width`; continuations start at `indent`; the pieces are `line` broken
    only at spaces or after a path boundary (/ + _ ,), never inside a word."""
    assert all(len(piece) <= width for piece in pieces), (width, pieces)
    position = 0
    for number, piece in enumerate(pieces):
        body = piece if number == 0 else piece[indent:]
        assert number == 0 or (piece[:indent].isspace() and body[:1] not in ("", " ")), pieces
        assert line.startswith(body, position), (line[position:], body)
        position += len(body)
        if number < len(pieces) - 1 and line[position] == " ":
            position += len(line[position:]) - len(line[position:].lstrip(" "))
        elif number < len(pieces) - 1:
            assert body[-1] in "/+_,", f"broken inside a word: {body!r} | {pieces[number + 1]!r}"
    assert position == len(line)


@pytest.mark.parametrize("width", [60, 80, 120])
def test_summary_epoch_and_stop_lines_wrap_at_word_and_path_boundaries(
        compose, image_folder: Path, width: int) -> None:
    """What rank 0's console prints on a terminal of `width` columns, with a long run folder."""
    from imgtrain.summary import end_lines, epoch_done_line, start_lines
    from imgtrain.wrap import wrap

    plan, trainer = _summary_parts(compose, image_folder)
    results = {"best_acc1": 76.5, "final_acc1": 76.25, "final_acc5": 93.125,
               "images_per_sec": 4464.2, "history": [{"epoch": 140, "acc1": 76.5}]}
    train = {"loss": 1.2345, "acc1": 71.25, "images_per_sec": 4464.2, "image_size": 224}
    val = {"loss": 0.9876, "acc1": 76.25, "acc5": 93.125, "samples": 50000, "ema_acc1": 77.5,
           "ema_acc5": 93.5}
    summary = [*start_lines(plan, trainer, LONG_RUN_DIR, None),
               *end_lines(results, 3600.0, LONG_RUN_DIR)]
    others = [epoch_done_line(139, train, val),
              f"preempted by SIGUSR1 at epoch 140 step 17; checkpoint saved; to resume, run the "
              f"same command again (or python run.py hydra.run.dir={LONG_RUN_DIR}) (exit code 143)"]
    for line in summary:
        indent = 13 if line.startswith("  ") else 4
        _assert_wrapped(line, wrap(line, width), width, indent)
    for line in others:
        _assert_wrapped(line, wrap(line, width), width, 4)
    run_dir = next(line for line in summary if line.startswith("  run dir"))
    assert len(wrap(run_dir, width)) > 1 and len(wrap(others[1], width)) > 1
