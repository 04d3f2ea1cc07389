"""Console lines wrapped to a terminal's width at word and path boundaries, never inside a word.

A terminal breaks a line that is too long at its last column, in the middle of a word or a path.
On a terminal, each line rank 0 prints (the summaries, the `epoch N done` lines, the stop lines)
is broken first at spaces and, where a word alone is longer than the room left (a run folder, a
checkpoint's path), after a `/`, `+`, `_` or `,` inside it. Continuation lines are indented: a
summary's `  key        value` line goes on under its value, any other line four columns in.
Files and pipes keep whole lines, for grep and for copying a path.
"""
from __future__ import annotations

KEY_COLUMN = 13  # where a summary line's value starts: `  run dir    outputs/...`
INDENT = 4       # where any other line goes on
BREAK_AFTER = "/+_,"


def hanging_indent(line: str) -> int:
    """Where `line`'s continuation lines start: under a summary line's value (a `  key  value`
    line, or one that already goes on under a value), else INDENT."""
    head, value = line[:KEY_COLUMN], line[KEY_COLUMN:KEY_COLUMN + 1]
    keyed = head.startswith("  ") and head[2:3] not in ("", " ") and head.endswith(" ")
    if value.strip() and (keyed or head.isspace()):
        return KEY_COLUMN
    return INDENT


def _cut(text: str, room: int) -> int:
    """Where to end a line holding the start of `text` in `room` columns: at its last space that
    fits, else after the last boundary inside a word that fits, else (a word with no boundary
    longer than the room) at the first break after it: past the room, never inside the word."""
    spaces = [i for i in range(1, min(room, len(text) - 1) + 1) if text[i] == " "]
    if spaces:
        return spaces[-1]
    inside = [i + 1 for i in range(min(room, len(text) - 1)) if text[i] in BREAK_AFTER]
    if inside:
        return inside[-1]
    later = [i + (text[i] != " ") for i in range(room, len(text) - 1)
             if text[i] == " " or text[i] in BREAK_AFTER]
    return later[0] if later else len(text)


def wrap(line: str, width: int) -> list[str]:
    """`line` as lines of at most `width` columns (a word with no boundary that is longer than
    a line stays whole), continued at its hanging indent."""
    indent = min(hanging_indent(line), max(width // 3, 1))
    # A summary line's key (or its continuation's leading spaces) stays on the first line.
    head = line[:indent] if indent == KEY_COLUMN else ""
    rest, lines, lead = line[len(head):], [], head
    while len(lead) + len(rest) > width:
        cut = _cut(rest, width - len(lead))
        if cut >= len(rest):
            break
        lines.append(lead + rest[:cut].rstrip(" "))
        rest, lead = rest[cut:].lstrip(" "), " " * indent
    lines.append(lead + rest)
    return lines


def wrap_text(text: str, width: int) -> str:
    """Every line of `text` wrapped to `width` columns."""
    return "\n".join(piece for line in text.split("\n") for piece in wrap(line, width))
