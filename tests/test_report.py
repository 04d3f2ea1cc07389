"""`python -m imgtrain.report`: the seed's table from results.json files written here by hand.

The real sweep -> report path is tested in test_sweeps.py; these cover the table's rules.
"""
from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imgtrain.report import main


def write_run(folder: Path, **fields: Any) -> Path:
    """A results.json as run.py writes it, with the seed's 8p row as the defaults."""
    results = {"arch": "resnet152", "dataset": "imagenet", "device": "npu", "world_size": 8,
               "amp": "O2", "torch_version": "1.8.1+ascend", "global_batch_size": 2048, "lr": 0.8,
               "overrides": ["world=8p", f"hydra.sweep.dir={folder.parent}"], "mode": "train",
               "epochs": 140, "epochs_completed": 137, "images_per_sec": 623.8871,
               "best_acc1": 79.10212, "final_acc1": 79.0, "final_acc5": 94.5,
               "status": "completed", **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def report(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def markdown_rows(text: str, run_column: bool = False) -> list[list[str]]:
    """The cells of a Markdown table, without the Run column unless asked for."""
    lines = text.strip().splitlines()
    assert set(lines[1].replace("|", "").split()) <= {"-" * n for n in range(3, 300)}
    assert len({len(line) for line in lines}) == 1  # aligned columns
    rows = [[cell.strip() for cell in line[2:-2].split(" | ")] for line in [lines[0], *lines[2:]]]
    return rows if run_column else [row[1:] for row in rows]


def test_the_seeds_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "run")
    code, out, _ = report(capsys, str(tmp_path))
    assert code == 0
    assert markdown_rows(out) == [["DEVICE", "PyTorch", "Acc@1", "FPS", "Epochs", "AMP_Type"],
                                  ["8p-NPU", "1.8.1", "79.102", "623.887", "137", "O2"]]


def test_only_overrides_that_differ_become_columns(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "0_a", overrides=["world=8p", "optim.lr=0.4", "+train.x=1", "amp=O1",
                                           f"hydra.sweep.dir={tmp_path}"], amp="O1")
    write_run(tmp_path / "1_b", overrides=["world=8p", "optim.lr=0.8", "amp=O2",
                                           f"hydra.sweep.dir={tmp_path}/other"])
    _, out, _ = report(capsys, str(tmp_path))
    header, first, second = markdown_rows(out)
    # world is shared; amp is already AMP_Type; hydra.* only says where files went.
    assert header[6:] == ["optim.lr", "train.x"]
    assert first[5:] == ["O1", "0.4", "1"] and second[5:] == ["O2", "0.8", ""]


def test_failed_and_unfinished_runs_are_marked(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "0_ok")
    write_run(tmp_path / "1_bad", status="failed", error="training diverged | nan",
              epochs_completed=0, best_acc1=0.0, images_per_sec=0.0)
    write_run(tmp_path / "2_killed", status="running", epochs_completed=3)
    write_run(tmp_path / "3_stopped", status="preempted")
    _, out, _ = report(capsys, str(tmp_path))
    header, ok, bad, killed, stopped = markdown_rows(out)
    assert header[-1] == "Status" and ok[-1] == "completed"
    assert bad[-1] == "failed: training diverged \\| nan"  # a | in the text would split the cell
    assert bad[2:4] == ["", ""]  # no Acc@1 or FPS for a run that never evaluated
    assert killed[-1] == "unfinished (running)" and killed[4] == "3"
    assert stopped[-1] == "unfinished (preempted)"


def test_csv_has_the_same_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "0_a", overrides=["optim.lr=0.4"])
    write_run(tmp_path / "1_b", overrides=["optim.lr=0.8"], status="failed", error="boom, bang")
    _, markdown, _ = report(capsys, str(tmp_path))
    _, comma_separated, _ = report(capsys, str(tmp_path), "--format", "csv")
    assert list(csv.reader(io.StringIO(comma_separated))) == markdown_rows(markdown, True)


def test_sort_by_any_column_numbers_as_numbers(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    for job, (acc, lr) in enumerate([(9.5, "0.4"), (10.25, "0.1"), (79.1, "0.2")]):
        write_run(tmp_path / f"{job}_run", best_acc1=acc, overrides=[f"optim.lr={lr}"])
    write_run(tmp_path / "3_failed", status="failed", error="x", epochs_completed=0, overrides=[])

    def column(*args: str, index: int) -> list[str]:
        _, out, _ = report(capsys, str(tmp_path), "--format", "csv", *args)
        return [row[index] for row in list(csv.reader(io.StringIO(out)))[1:]]

    assert column("--sort", "acc@1", index=3) == ["9.500", "10.250", "79.100", ""]
    assert column("--sort", "Acc@1", "--descending", index=3) == ["79.100", "10.250", "9.500", ""]
    assert column("--sort", "optim.lr", index=7) == ["0.1", "0.2", "0.4", ""]
    assert column("--sort", "Status", index=8)[-1].startswith("failed")


def test_an_unknown_sort_column_names_the_columns(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--sort", "speed"])
    assert exit_info.value.code == 2
    assert "no column 'speed'; columns: Run, DEVICE, PyTorch, Acc@1, FPS" in capsys.readouterr().err


def test_jobs_in_natural_order_and_bad_files_skipped(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    for job in (10, 2, 1):
        write_run(tmp_path / f"{job}_job", overrides=[f"train.seed={job}"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    code, out, err = report(capsys, str(tmp_path / "10_job"), str(tmp_path))
    assert code == 0
    assert [row[6] for row in markdown_rows(out)[1:]] == ["1", "2", "10"]  # each run once
    assert "skipping" in err and "broken" in err


def test_command_line_defaults_to_outputs_and_fails_cleanly_when_empty(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "imgtrain.report"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == "error: no results.json under outputs\n"
    write_run(tmp_path / "outputs" / "2026-01-01" / "12-00-00")
    proc = subprocess.run([sys.executable, "-m", "imgtrain.report"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = markdown_rows(proc.stdout, run_column=True)[1:]
    assert row == ["2026-01-01/12-00-00", "8p-NPU", "1.8.1", "79.102", "623.887", "137", "O2"]


def test_run_column_names_each_run_relative_to_the_path_searched(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for time in ("10-00-00", "11-00-00"):  # two identical quickstart rows, told apart by folder
        write_run(tmp_path / "2026-01-01" / f"{time}_experiment=quickstart",
                  overrides=["experiment=quickstart"])
    _, out, _ = report(capsys, str(tmp_path))
    assert [row[0] for row in markdown_rows(out, run_column=True)] == [
        "Run", "2026-01-01/10-00-00_experiment=quickstart",
        "2026-01-01/11-00-00_experiment=quickstart"]
    _, out, _ = report(capsys, str(tmp_path / "2026-01-01" / "10-00-00_experiment=quickstart"))
    assert markdown_rows(out, run_column=True)[1][0] == "10-00-00_experiment=quickstart"


def test_start_up_failures_are_hidden_unless_all(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "0_ok")
    # What run.py records when a run fails before any worker trains: no epochs_completed at all.
    start_up = {"arch": "resnet152", "dataset": "imagenet", "device": "cpu", "world_size": 1,
                "amp": "O2", "torch_version": "2.5.0", "overrides": [], "mode": "train",
                "status": "failed", "error": "dataset.root does not exist: data/imagenet"}
    (tmp_path / "1_typo").mkdir()
    (tmp_path / "1_typo" / "results.json").write_text(json.dumps(start_up))
    write_run(tmp_path / "2_diverged", status="failed", error="training diverged",
              epochs_completed=0)  # it trained, then failed: shown
    code, out, err = report(capsys, str(tmp_path))
    assert code == 0
    assert [row[0] for row in markdown_rows(out, True)[1:]] == ["0_ok", "2_diverged"]
    assert "1 run that failed before training left out (--all lists them)" in err
    _, out, _ = report(capsys, str(tmp_path), "--all")
    rows = markdown_rows(out, True)
    assert [row[0] for row in rows[1:]] == ["0_ok", "1_typo", "2_diverged"]
    assert rows[2][-1] == "failed: dataset.root does not exist: data/imagenet"


def test_eval_runs_are_marked_as_such(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "0_train")
    write_run(tmp_path / "1_eval", mode="eval", epochs_completed=0, best_acc1=78.5,
              images_per_sec=0.0)
    _, out, _ = report(capsys, str(tmp_path))
    header, trained, evaluated = markdown_rows(out)
    assert header[2:5] == ["Acc@1", "FPS", "Epochs"]
    assert trained[2:5] == ["79.102", "623.887", "137"]
    assert evaluated[2:5] == ["78.500", "", "eval"]


def test_the_table_fits_the_width_with_shared_columns_above_and_long_values_shortened(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    long_root = "/data/" + "very-long-folder-name/" * 6 + "imagenet"
    for job, lr in enumerate(("0.1", "0.2")):
        write_run(tmp_path / f"{job}_optim.lr={lr},dataset.root=long,model.weights=also-long",
                  overrides=[f"optim.lr={lr}", f"dataset.root={long_root}{job}",
                             "train.epochs=90", f"model.weights=/checkpoints/run-{job}/best.pt"],
                  status="failed", error="a very long error message " * 8)
    _, wide, _ = report(capsys, str(tmp_path))
    assert max(map(len, wide.splitlines())) > 250  # what a pipe gets: every value whole
    assert long_root + "0" in wide
    code, out, _ = report(capsys, str(tmp_path), "--width", "100")
    assert code == 0
    lines = out.strip().splitlines()
    assert max(map(len, lines)) <= 100, "\n".join(lines)
    # The columns the same in both runs are said once above the table (long values shortened).
    table = lines.index(next(line for line in lines if line.startswith("| Run")))
    above = " ".join(line.strip() for line in lines[:table])
    assert above.startswith("every run: DEVICE 8p-NPU, PyTorch 1.8.1, Acc@1 79.102, FPS 623.887, "
                            "Epochs 137, AMP_Type O2, Status failed: a very long error"), above
    assert above.endswith("…")
    header, first, second = markdown_rows("\n".join(lines[table:]), run_column=True)
    assert header == ["Run", "root", "weights", "lr"]  # keys by their last part
    # A path keeps its end, which tells the runs apart; a run its start and end.
    assert first[1].startswith("…") and first[1].endswith("imagenet0")
    assert second[1].endswith("imagenet1")
    assert first[0].startswith("0_lr=0.1,") and first[0].endswith("also-long") and "…" in first[0]
    assert first[2:] == ["/checkpoints/run-0/best.pt", "0.1"]


def _varied_runs(outputs: Path) -> list[str]:
    """14 runs as a user's outputs/ holds them after a few days: single runs named
    <date>/<time>_<overrides>, a sweep's jobs, other devices, precisions and statuses, and
    overrides of many keys. Returns each run's distinguishing part."""
    singles = [("2026-12-01", "09-12-44", ["experiment=quickstart"]),
               ("2026-12-01", "10-03-10", ["experiment=quickstart", "train.epochs=10"]),
               ("2026-12-01", "11-40-02", ["experiment=quickstart", "amp=O1", "device=gpu"]),
               ("2026-12-02", "08-00-00", ["model=resnet50", "dataset.root=/data/imagenet",
                                           "world=8p", "device=npu"]),
               ("2026-12-02", "13-14-15", ["model=resnet50", "dataset.root=/data/flowers",
                                           "model.weights=/ckpt/resnet50/best.pt",
                                           "model.freeze=backbone"]),
               ("2026-12-02", "17-30-00", ["experiment=resnet152_v2", "ema.decay=0.99998"]),
               ("2026-12-03", "07-45-00", ["experiment=quickstart", "train.label_smoothing=0.1",
                                           "dataset.image_size=64"]),
               ("2026-12-03", "09-00-00", ["experiment=quickstart", "sched=step",
                                           "train.batch_size=128"])]
    folders = []
    for number, (day, time, overrides) in enumerate(singles):
        name = "+".join(o.replace("=", "-").replace("/", "_") for o in overrides)
        folders.append((outputs / day / f"{time}_{name}", overrides, number))
    for job, lr in enumerate(("0.05", "0.1", "0.2", "0.4", "0.8", "1.6")):
        overrides = ["experiment=quickstart", "train.epochs=3", f"optim.lr={lr}"]
        folders.append((outputs / "multirun" / "2026-12-03" / "10-00-00"
                        / f"{job}_experiment-quickstart+train.epochs-3+optim.lr-{lr}", overrides,
                        len(folders)))
    for folder, overrides, number in folders:
        device = next((o.split("=")[1] for o in overrides if o.startswith("device=")), "cpu")
        status = {3: "preempted", 5: "running"}.get(number, "completed")
        fields = dict(overrides=overrides, device=device, world_size=8 if "world=8p" in overrides
                      else 1, amp="O1" if "amp=O1" in overrides else "O0",
                      torch_version="2.5.1+cpu", best_acc1=10.0 + number * 5.123,
                      images_per_sec=100.0 + number, epochs_completed=3, status=status)
        if number == 9:
            fields.update(status="failed", error="training diverged at epoch 2: loss is nan "
                                                 "(lower optim.lr, or amp.loss_scale=dynamic)")
        write_run(folder, **fields)
    return [str(folder.relative_to(outputs)) for folder, _, _ in folders]


@pytest.mark.parametrize("width", [80, 60])
def test_fourteen_varied_runs_fit_the_width_and_stay_told_apart(
        tmp_path: Path, capsys: pytest.CaptureFixture, width: int) -> None:
    folders = _varied_runs(tmp_path / "outputs")
    _, wide, _ = report(capsys, str(tmp_path / "outputs"))
    assert max(map(len, wide.splitlines())) > 200  # the whole table, as a pipe gets it
    code, out, _ = report(capsys, str(tmp_path / "outputs"), "--width", str(width))
    assert code == 0
    lines = out.rstrip("\n").splitlines()
    assert max(map(len, lines)) <= width, "\n".join(lines)
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("| Run")):]
    assert not [line for line in lines[:-len(table)] if line.startswith("|")]
    rows = markdown_rows("\n".join(table), run_column=True)
    names = [row[0] for row in rows[1:]]
    assert len(names) == 14 and len(set(names)) == 14, names
    # Short names, not the date in front: what is left of each is taken from its own folder's
    # name (rows in the folders' order), abbreviated: `experiment-quickstart` -> `quickstart`,
    # `optim.lr-0.2` -> `lr-0.2`, overrides every run has left out.
    assert not [name for name in names if name.startswith("2026-")], names
    for name, folder in zip(names, folders):
        job, rest = re.match(r"(\d+_)?(.*)$", name).groups()
        assert Path(folder).name.startswith(job or ""), (name, folder)
        assert all(part in folder for part in re.split(r"[…+]", rest)), (name, folder)
    assert names[:3] == ["quickstart", "quickstart+epochs-10", "quickstart+O1+gpu"], names
    assert [name.endswith(f"lr-{lr}") for name, lr in zip(names[8:], (
        "0.05", "0.1", "0.2", "0.4", "0.8", "1.6"))] == [True] * 6, names
    # What every run shares is said once, above the table, instead of a column.
    assert "PyTorch 2.5.1" in out and "PyTorch" not in rows[0], out
    assert "Acc@1" in rows[0] and "Status" in rows[0]
    acc = [row[rows[0].index("Acc@1")] for row in rows[1:]]
    assert acc[0] == "10.000" and acc[-1] == f"{10 + 13 * 5.123:.3f}"


def test_the_whole_table_when_it_fits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for job, lr in enumerate(("0.1", "0.2")):
        write_run(tmp_path / f"{job}_optim.lr={lr}", overrides=[f"optim.lr={lr}"])
    _, out, _ = report(capsys, str(tmp_path), "--width", "120")
    header, *_ = markdown_rows(out, run_column=True)
    assert header == ["Run", "DEVICE", "PyTorch", "Acc@1", "FPS", "Epochs", "AMP_Type", "optim.lr"]


def test_model_and_dataset_columns_are_the_runs_resolved_ones(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    # One run chose its dataset by a folder, the other by an experiment: both cells filled from
    # results.json, an ImageFolder by its folder's name; the model likewise.
    write_run(tmp_path / "0_digits", dataset="imagefolder:digits", arch="resnet18",
              overrides=["dataset.root=/data/digits", "model=resnet18"])
    write_run(tmp_path / "1_quickstart", dataset="synthetic", arch="resnet18",
              overrides=["experiment=quickstart"])
    _, out, _ = report(capsys, str(tmp_path))
    header, *rows = markdown_rows(out)
    assert "model" not in header  # the same resolved arch in both
    column = header.index("dataset")
    assert [row[column] for row in rows] == ["imagefolder:digits", "synthetic"]
