"""The results table fitted to a width (a terminal's, or --width): what gives way, in order.

1. Each run is named by its folder's short name: without the date and time Hydra put in front,
   and without the overrides every listed run's name shares.
2. Columns with the same value in every row are said once, above the table.
3. Override columns are headed by the key's last part (`optim.lr` -> `lr`) where that is unique.
4. Long cells are shortened (paths keep their end, the run and status their start), to 10
   characters at least; run names never shorter than keeps them apart.
5. Override columns go, the last first (the run names carry the overrides), then the fixed
   columns least needed to compare runs: PyTorch, FPS, Epochs, AMP_Type, DEVICE. A line above
   the table names what is not shown.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Sequence

from imgtrain.names import TIME_PREFIX

RUN, STATUS = "Run", "Status"
FIXED_COLUMNS = ("DEVICE", "PyTorch", "Acc@1", "FPS", "Epochs", "AMP_Type")
DROPPED_FIRST = ("PyTorch", "FPS", "Epochs", "AMP_Type", "DEVICE")  # of the fixed columns
MIN_WIDTH = 10  # a shortened cell keeps at least this many characters
_SHORT_STATUS = {"unfinished (running)": "unfinished", "unfinished (preempted)": "preempted"}
_JOB = re.compile(r"^(\d+_)?(.*)$")  # a sweep job's <number>_ before its name
_OLD_NAME = re.compile(r"^[a-z_.]+[-=]")  # before names.py: `key-value+key-value`


def _abbreviated(token: str) -> str:
    """One `key-value` of a folder name, shorter: a config group's choice by its value alone
    (`experiment-quickstart` -> `quickstart`), a key by its last part (`optim.lr-0.1` ->
    `lr-0.1`)."""
    match = re.match(r"([^-=]+)([-=])(.*)$", token)
    if not match:
        return token
    key, sep, value = match.groups()
    return value if "." not in key else f"{key.rsplit('.', 1)[1]}{sep}{value}"


def _tokens(rest: str) -> list[str]:
    """A folder name's parts: names.py's `quickstart_lr0.2_+3fa9c1` by `_` (the hash without its
    `+`), an older run's `experiment-quickstart+optim.lr-0.2` by `+`, abbreviated."""
    if _OLD_NAME.match(rest):
        return [_abbreviated(t) for t in rest.split("+")]
    return [t.lstrip("+") for t in rest.split("_") if t.lstrip("+")]


def short_names(names: Sequence[str]) -> list[str]:
    """Each run's folder name without the date and time in front, its overrides abbreviated and
    those all the runs share left out; the whole relative name where that would not tell runs
    apart."""
    lasts = [PurePosixPath(name).name for name in names]
    parts = [_JOB.match(TIME_PREFIX.sub("", last)).groups() for last in lasts]
    tokens = [_tokens(rest) for _, rest in parts]
    shared = set.intersection(*map(set, tokens)) if len(names) > 1 else set()
    short = [(job or "") + ("+" if _OLD_NAME.match(rest) else "_").join(
                 t for t in run_tokens if t not in shared)
             for (job, rest), run_tokens in zip(parts, tokens)]
    short = [name if name.strip("_") else last for name, last in zip(short, lasts)]
    if len(set(short)) < len(short):
        short = [name if short.count(name) == 1 else full for name, full in zip(short, names)]
    return short


def shorten(text: str, width: int, keep: str = "middle") -> str:
    """At most `width` characters, cut at the end (keep="start"), the start (keep="end"), or in
    the middle."""
    if len(text) <= width:
        return text
    if keep == "start":
        return text[:width - 1] + "…"
    if keep == "end":
        return "…" + text[-(width - 1):]
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _shorten_cell(column: str, cell: str, width: int) -> str:
    if column == STATUS:  # the error's first words matter most
        return shorten(cell, width, "start")
    return shorten(cell, width, "end" if "/" in cell else "middle")


class _Table:
    """Columns being fitted: names, cells, and the width each may take."""

    def __init__(self, header: list[str], rows: list[list[str]]) -> None:
        self.names = list(header)
        self.cells = [[row[i] for row in rows] for i in range(len(header))]
        self.limits = [max([len(name)] + [len(c) for c in cells])
                       for name, cells in zip(self.names, self.cells)]

    def width(self) -> int:
        return sum(self.limits) + 3 * len(self.limits) + 1  # "| a | b |"

    def drop(self, index: int) -> None:
        for column in (self.names, self.cells, self.limits):
            del column[index]

    def natural(self, index: int) -> int:
        return max([len(self.names[index])] + [len(c) for c in self.cells[index]])

    def least(self, index: int, width: int) -> int:
        """How narrow a column may get: run names keep a third of the line (they say which run
        it is, and carry the overrides whose columns went) and stay told apart."""
        natural = self.natural(index)
        if self.names[index] != RUN:
            return min(natural, MIN_WIDTH)
        cells = self.cells[index]
        apart = next(w for w in range(1, natural + 1)
                     if len({_shorten_cell(RUN, c, w) for c in cells}) == len(set(cells)))
        return max(apart, min(natural, width // 3))

    def shrink(self, columns: set[str], width: int) -> None:
        """From their natural widths, narrow the widest of `columns` a character at a time
        until the table fits `width`."""
        self.limits = [self.natural(i) for i in range(len(self.names))]
        least = [self.least(i, width) for i in range(len(self.names))]
        while self.width() > width:
            narrowable = [i for i, name in enumerate(self.names)
                          if name in columns and self.limits[i] > least[i]]
            if not narrowable:
                return
            self.limits[max(narrowable, key=lambda i: self.limits[i])] -= 1

    def result(self) -> tuple[list[str], list[list[str]]]:
        header = [shorten(name, limit) for name, limit in zip(self.names, self.limits)]
        columns = [[_shorten_cell(name, cell, limit) for cell in cells]
                   for name, cells, limit in zip(self.names, self.cells, self.limits)]
        return header, [list(row) for row in zip(*columns)]


def fit(header: list[str], rows: list[list[str]],
        width: int) -> tuple[list[str], list[str], list[list[str]]]:
    """Lines to print above the table, and a header and rows whose Markdown lines fit `width`
    characters (as far as the run, Acc@1 and status columns at their narrowest allow)."""
    table = _Table(header, rows)
    if table.width() <= width:
        return [], header, rows
    notes = []
    table.cells[0] = short_names(table.cells[0])
    status = table.names.index(STATUS) if STATUS in table.names else None
    if status is not None:  # the report's words for unfinished runs, in fewer letters
        table.cells[status] = [_SHORT_STATUS.get(cell, cell) for cell in table.cells[status]]
    same = [i for i, cells in enumerate(table.cells) if i and len(set(cells)) == 1]
    if len(rows) > 1 and same:
        notes.append("every run: " + ", ".join(
            f"{table.names[i]} {_shorten_cell(table.names[i], table.cells[i][0], width // 2)}"
            for i in same if table.cells[i][0]))
        for i in reversed(same):
            table.drop(i)
    overrides = [n for n in table.names if n not in (RUN, STATUS, *FIXED_COLUMNS)]
    last_parts = [name.rsplit(".", 1)[-1] for name in overrides]
    for name, short in zip(overrides, last_parts):
        if last_parts.count(short) == 1 and short not in table.names:
            table.names[table.names.index(name)] = short
    shrinkable = set(table.names) - set(FIXED_COLUMNS)
    table.shrink(shrinkable, width)
    hidden = []
    for name in [*reversed(table.names[1:]), *DROPPED_FIRST]:
        if table.width() <= width:
            break
        if name in shrinkable - {RUN, STATUS} or name in DROPPED_FIRST and name in table.names:
            table.drop(table.names.index(name))
            hidden.append(name)
            table.shrink(shrinkable, width)
    if hidden:
        notes.append(f"not shown at {width} columns: {', '.join(hidden)} (--format csv has them)")
    return _wrapped(notes, width), *table.result()


def _wrapped(notes: list[str], width: int) -> list[str]:
    out = []
    for note in notes:
        line = ""
        for word in note.split(" "):
            if line and len(line) + 1 + len(word) > width:
                out.append(line)
                line = "  " + word
            else:
                line = f"{line} {word}" if line else word
        out.append(line)
    return out
