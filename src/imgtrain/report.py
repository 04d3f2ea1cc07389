"""The results table: `python -m imgtrain.report [PATH ...] [--format csv] [--sort COLUMN]`.

Reads every results.json below the paths (default outputs/) and prints one row per run: the run's
folder, the seed's Table 2 (DEVICE | PyTorch | Acc@1 | FPS | Epochs | AMP_Type), the overrides
that differ between the runs and, when any run did not complete, its status. Runs that failed
before training started are left out unless --all is given. On a terminal (or with --width) the
table is fitted to the width: see report_fit.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from imgtrain.config import override_key
from imgtrain.report_fit import FIXED_COLUMNS, RUN, STATUS, fit

# Override keys the fixed columns already show, or that only say where files went.
_SHOWN_ELSEWHERE = {"amp", "amp.level"}
# Columns every run fills from its results (the resolved values), whichever way it chose them
# (an override, an experiment, the defaults): column -> (the override keys it replaces, field).
_RESOLVED = {"model": (("model", "model.arch"), "arch"),
             "dataset": (("dataset", "dataset.name"), "dataset")}
_LOCATION_PREFIXES = ("hydra.", "hydra/")


def find_results(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """Every results.json at or below the paths, with its run's name (its folder relative to the
    path searched), in natural order (job 2 before job 10)."""
    found: dict[Path, str] = {}
    for path in paths:
        if path.is_file() and path.name == "results.json":
            found.setdefault(path, path.parent.name)
        elif path.is_dir():
            for file in path.rglob("results.json"):
                found.setdefault(file, str(file.parent.relative_to(path)) if file.parent != path
                                 else path.resolve().name)
    return sorted(found.items(), key=lambda item: _natural_key(item[0]))


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def load_runs(files: Iterable[tuple[Path, str]]) -> list[dict[str, Any]]:
    """Parsed results, each with its run's name under `run`; an unreadable file is reported on
    stderr and left out."""
    runs = []
    for file, name in files:
        try:
            runs.append({**json.loads(file.read_text()), "run": name})
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"warning: skipping {file}: {exc}\n")
    return runs


def failed_at_start(run: dict[str, Any]) -> bool:
    """A run that failed before its first training step: only run.py's failure record exists
    (a worker that started training writes epochs_completed)."""
    return run.get("status") == "failed" and "epochs_completed" not in run


def override_values(run: dict[str, Any]) -> dict[str, str]:
    """The run's `key=value` overrides as a dict, with `+`/`++`/`~` prefixes dropped, and its
    model and dataset as resolved (`imagefolder:digits` for an ImageFolder at .../digits)."""
    values = {}
    for override in run.get("overrides") or []:
        key, value = override_key(override), str(override).partition("=")[2]
        if not key.startswith(_LOCATION_PREFIXES) and key not in _SHOWN_ELSEWHERE:
            values[key] = value
    for column, (keys, field) in _RESOLVED.items():
        for key in keys:
            values.pop(key, None)
        if run.get(field):
            values[column] = str(run[field])
    return values


def differing_keys(per_run: Sequence[dict[str, str]]) -> list[str]:
    """Override keys whose value is not the same in every run (absent counts as a value)."""
    keys = sorted({key for values in per_run for key in values})
    return [key for key in keys if len({values.get(key) for values in per_run}) > 1]


def _fixed_cells(run: dict[str, Any]) -> list[str]:
    is_eval = run.get("mode") == "eval"
    evaluated = bool(run.get("epochs_completed")) or (is_eval and run.get("status") == "completed")
    return [
        f"{run.get('world_size', '?')}p-{str(run.get('device', '?')).upper()}",
        str(run.get("torch_version", "")).split("+")[0],  # the local build tag adds nothing here
        _decimals(run.get("best_acc1")) if evaluated else "",
        _decimals(run.get("images_per_sec")) if run.get("images_per_sec") else "",
        "eval" if is_eval else str(run.get("epochs_completed", "")),
        str(run.get("amp", "")),
    ]


def _decimals(value: Any) -> str:
    return "" if value is None else f"{float(value):.3f}"


def status_text(run: dict[str, Any]) -> str:
    status = run.get("status", "unknown")
    if status == "failed":
        return f"failed: {run.get('error', 'no error recorded')}"
    if status in ("running", "preempted", "interrupted"):  # a killed run also stays `running`
        return f"unfinished ({status})"
    return str(status)


def table(runs: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The header and one row of cells per run."""
    per_run = [override_values(run) for run in runs]
    keys = differing_keys(per_run)
    with_status = any(run.get("status") != "completed" for run in runs)
    header = [RUN, *FIXED_COLUMNS, *keys, *([STATUS] if with_status else [])]
    rows = []
    for run, values in zip(runs, per_run):
        row = [str(run.get("run", "")), *_fixed_cells(run), *(values.get(key, "") for key in keys)]
        rows.append(row + [status_text(run)] if with_status else row)
    return header, rows


def sort_rows(header: list[str], rows: list[list[str]], column: str,
              descending: bool = False) -> list[list[str]]:
    """Rows ordered by a column (numbers as numbers); empty cells go last either way."""
    matches = [i for i, name in enumerate(header) if name.lower() == column.lower()]
    if not matches:
        raise ValueError(f"no column {column!r}; columns: {', '.join(header)}")
    index = matches[0]
    filled = [row for row in rows if row[index] != ""]
    empty = [row for row in rows if row[index] == ""]
    return sorted(filled, key=lambda row: _sortable(row[index]), reverse=descending) + empty


def _sortable(cell: str) -> tuple[int, float, str]:
    try:
        return (0, float(cell), "")
    except ValueError:
        return (1, 0.0, cell)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with aligned columns (readable as it is on a terminal)."""
    escaped = [[cell.replace("|", "\\|") for cell in row] for row in [header, *rows]]
    widths = [max([3] + [len(row[i]) for row in escaped]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(escaped[0]), rule, *(line(row) for row in escaped[1:])])


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows([header, *rows])
    return buffer.getvalue().rstrip("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgtrain.report", description=__doc__.split(
        "\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("outputs")],
                        help="run folders, sweep folders or results.json files (default outputs/)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--sort", metavar="COLUMN", help="order rows by this column, e.g. Acc@1")
    parser.add_argument("--descending", action="store_true", help="with --sort: largest first")
    parser.add_argument("--all", action="store_true",
                        help="also list runs that failed before training started")
    parser.add_argument("--width", type=int, metavar="N",
                        help="fit the Markdown table to N columns (default: the terminal's width "
                             "on a terminal, no limit otherwise)")
    args = parser.parse_args(argv)
    runs = load_runs(find_results(args.paths))
    if not runs:
        sys.stderr.write(f"error: no results.json under {', '.join(map(str, args.paths))}\n")
        return 1
    hidden = 0 if args.all else sum(failed_at_start(run) for run in runs)
    if hidden:
        runs = [run for run in runs if not failed_at_start(run)]
        sys.stderr.write(f"{hidden} run{'s' * (hidden > 1)} that failed before training left "
                         "out (--all lists them)\n")
    if not runs:
        return 0
    header, rows = table(runs)
    if args.sort:
        try:
            rows = sort_rows(header, rows, args.sort, args.descending)
        except ValueError as exc:
            parser.error(str(exc))
    if args.format == "csv":
        print(to_csv(header, rows))
        return 0
    width = args.width or (shutil.get_terminal_size().columns if sys.stdout.isatty() else None)
    if width:
        notes, header, rows = fit(header, rows, width)
        print("\n".join([*notes, markdown(header, rows)]))
    else:
        print(markdown(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
