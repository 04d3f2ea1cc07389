"""The sample index's cache (`dataset.index_cache`): a split is listed by one process per job,
and every later run, resume and requeue checks the cached index against the tree without a
listing.

The cache keeps one entry per split folder:
`<cache>/<name>-<split>-<hash of the resolved folder>/` holds `index.json` (which build is
current, and the modification time of every directory the listing read: that is what changes
when files or class folders are added or removed on POSIX filesystems) and the builds' folders of
.npy files. Checking an entry costs one stat per directory (about 1,000 for ImageNet), no listing.
The builds are written whole, then index.json is replaced atomically to point at the new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from imgtrain.data.index import Listing, list_split, load, write_arrays
from imgtrain.errors import ConfigError
from imgtrain.fileio import write_json_atomic

log = logging.getLogger("imgtrain")

VERSION = 1  # of the files' layout: another version is rebuilt, never misread
POINTER = "index.json"
BUILDING = "building"  # present, and touched, while a process lists the split
# How long a process that does not build waits for a builder to start (a node that has not yet
# reached this point), and how long a builder may go without touching its marker before the
# waiting ones call it gone. The listing itself may take much longer: the marker shows it is alive.
BUILDER_START_S = 300
BUILDER_SILENT_S = 300
POLL_S = 0.5
KEEP_SUPERSEDED_S = 24 * 3600  # a job still starting may be about to map an older build


def cache_folder(setting: str) -> Path:
    """dataset.index_cache: `auto` is $XDG_CACHE_HOME/imgtrain/index (~/.cache/imgtrain/index)."""
    if setting == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "imgtrain" / \
            "index"
    return Path(setting).expanduser()


def entry_folder(cache: Path, folder: str) -> Path:
    """The cache entry of a split folder: named after it, keyed by its resolved path (a symlink
    and its target share one entry)."""
    real = os.path.realpath(folder)
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    parent, split = os.path.split(real)
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", f"{os.path.basename(parent)}-{split}")
    return cache / f"{readable}-{digest}"


def prepare(folder: str, cache: Path, builds: bool) -> str:
    """The folder of `folder`'s current index build, listing the split only when no cached build
    matches the tree. `builds`: this process is the job's one builder; the others wait for it."""
    entry = entry_folder(cache, folder)
    current, why = current_build(entry, folder)
    if current is not None:
        return current
    if builds and not _builder_alive(entry):
        return _build(entry, folder, why)
    return _wait(entry, folder, builds)


def current_build(entry: Path, folder: str) -> tuple[str | None, str]:
    """The entry's build if it still describes the tree, else (None, why not)."""
    pointer = _pointer(entry)
    if pointer is None:
        return None, ""
    if isinstance(pointer, str):
        return None, pointer
    if pointer.get("version") != VERSION or pointer.get("folder") != os.path.realpath(folder):
        return None, "its cached index was written by another version of imgtrain"
    try:
        changed = tree_changes(folder, pointer["directories"])
        files = entry / pointer["build"]
    except (KeyError, TypeError, ValueError):
        return None, "its cached index.json is incomplete"
    if changed:
        return None, f"it changed since it was listed ({changed})"
    damaged = check_build(files, pointer)
    return (None, f"its cached index is damaged: {damaged}") if damaged else (str(files), "")


def _pointer(entry: Path) -> dict[str, Any] | str | None:
    """The entry's index.json (None: no index yet; a string: why it cannot be read)."""
    try:
        pointer = json.loads((entry / POINTER).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        return f"its cached index.json is unreadable ({exc})"
    return pointer if isinstance(pointer, dict) else "its cached index.json is not an index"


def tree_changes(folder: str, directories: list[list[Any]]) -> str:
    """What changed since the listing, from each listed directory's modification time ('':
    nothing). One stat per directory, no listing."""
    classes_changed, changed = False, []
    for relative, mtime in directories:
        try:
            now = os.stat(os.path.join(folder, relative) if relative else folder).st_mtime_ns
        except OSError:
            now = None
        if now != mtime:
            if relative:
                changed.append(relative)
            else:
                classes_changed = True
    reasons = ["class folders added or removed"] \
        if classes_changed else []
    if changed:
        reasons.append(f"files added or removed in {len(changed)} folder(s), e.g. {changed[0]}/")
    return "; ".join(reasons)


def check_build(files: Path, pointer: dict[str, Any]) -> str:
    """Why a build's arrays cannot be what index.json says they are ('': they are): a damaged
    or half-deleted cache is listed again, never read as a smaller dataset."""
    try:
        index = load(str(files))
    except (OSError, ValueError) as exc:
        return f"its arrays are unreadable ({type(exc).__name__}: {exc})"
    count, classes = pointer.get("count"), pointer.get("classes")
    if len(index) != count or len(index.offsets) != count + 1 or \
            (count and int(index.offsets[-1]) != len(index.paths)):
        return f"its arrays hold {len(index)} samples where index.json says {count}"
    if list(index.classes) != classes or (count and int(index.labels.max()) >= len(classes)):
        return "its class list does not match its labels"
    return ""


def _build(entry: Path, folder: str, why: str) -> str:
    """List the split, write the build, then point index.json at it (atomically, last)."""
    marker = entry / BUILDING
    try:
        entry.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{os.uname().nodename} {os.getpid()}\n")
    except OSError as exc:
        raise _unwritable(entry, exc) from None
    started = time.monotonic()
    if why:
        log.info("dataset: listing %s again: %s", folder, why)
    else:
        log.info("dataset: listing %s once for its sample index (cached in %s)", folder, entry)
    previous = _pointer(entry)
    try:
        listing = list_split(folder, alive=lambda: os.utime(marker))
        build = f"build-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        try:
            write_arrays(entry, build, listing.index)
            _point_at(entry, build, folder, listing)
        except OSError as exc:  # a full disk, a quota
            raise _unwritable(entry, exc) from None
    finally:
        marker.unlink(missing_ok=True)
    log.info("dataset: %s: %d images in %d classes%s, listed in %.1f s", folder,
             len(listing.index), len(listing.index.classes), _difference(previous, listing),
             time.monotonic() - started)
    _remove_superseded(entry, build)
    _forget_deleted_trees(entry.parent)
    return str(entry / build)


def _difference(previous: dict[str, Any] | str | None, listing: Listing) -> str:
    """How the new listing differs from the cached one it replaces, in its count and classes."""
    if not isinstance(previous, dict) or not isinstance(previous.get("classes"), list):
        return ""
    old, new = previous["classes"], listing.index.classes
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    changes = [f"{len(names)} class folder(s) {verb}, e.g. {names[0]}"
               for names, verb in ((added, "added"), (removed, "removed")) if names]
    return f" (was {previous.get('count')} in {len(old)}" + \
        "".join(f"; {change}" for change in changes) + ")"


def _point_at(entry: Path, build: str, folder: str, listing: Listing) -> None:
    """Make `build` the entry's current one: the last write, atomic, so a reader sees the old
    build or the new one, complete."""
    previous = _pointer(entry)
    if isinstance(previous, dict) and isinstance(previous.get("build"), str):
        # Its time now says when it was superseded: _remove_superseded keeps it a while.
        with contextlib.suppress(OSError):
            os.utime(entry / previous["build"])
    write_json_atomic(entry / POINTER, {
        "version": VERSION, "folder": os.path.realpath(folder), "build": build,
        "count": len(listing.index), "classes": list(listing.index.classes),
        "directories": listing.directories})


def _unwritable(entry: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"dataset.index_cache: cannot write the sample index in {entry} "
                       f"({exc.strerror or exc}); set dataset.index_cache to a writable folder, "
                       "or null to list the tree in every process")


def _remove_superseded(entry: Path, current: str) -> None:
    """Older builds, once no job can still be starting on them, and abandoned partial ones."""
    cutoff = time.time() - KEEP_SUPERSEDED_S
    for old in entry.iterdir():
        if old.is_dir() and old.name != current and old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)


def _forget_deleted_trees(cache: Path) -> None:
    """Entries of split folders that no longer exist (a test's or a scratch copy's)."""
    for entry in cache.iterdir():
        pointer = _pointer(entry) if entry.is_dir() else None
        if isinstance(pointer, dict) and isinstance(pointer.get("folder"), str) and \
                not os.path.isdir(pointer["folder"]):
            shutil.rmtree(entry, ignore_errors=True)


def _builder_alive(entry: Path) -> bool:
    """Another process (another run of a sweep) is listing this split now."""
    try:
        return time.time() - (entry / BUILDING).stat().st_mtime < BUILDER_SILENT_S
    except OSError:  # none (or no entry at all)
        return False


def _wait(entry: Path, folder: str, builds: bool) -> str:
    """Wait for the builder (global rank 0, node 0, or another run listing the same split) to
    write a build that matches the tree; bounded, with one line saying why it gave up."""
    log.info("dataset: waiting for %s to list %s (cache %s)",
             "another run" if builds else "the job's first process", folder, entry)
    started = time.monotonic()
    seen_builder = False
    while True:
        current, _ = current_build(entry, folder)
        if current is not None:
            return current
        alive = _builder_alive(entry)
        if not alive:  # it may have finished between the two looks
            current, _ = current_build(entry, folder)
            if current is not None:
                return current
        seen_builder = seen_builder or alive
        waited = time.monotonic() - started
        if builds and not alive:  # the other run stopped: list it here
            return _build(entry, folder, "the run that was listing it stopped")
        if not alive and seen_builder:
            raise ConfigError(f"the job's first process stopped listing {folder} for the sample "
                              f"index (in {entry}) after {waited:.0f} s: its own error says why")
        if not alive and waited > BUILDER_START_S:
            raise ConfigError(
                f"waited {waited:.0f} s for the job's first process to list {folder} for the "
                f"sample index in {entry}, and it never began; with several nodes, "
                "dataset.index_cache must be a folder every node sees (e.g. "
                "dataset.index_cache=/shared/imgtrain-index)")
        time.sleep(POLL_S)
