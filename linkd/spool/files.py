"""Moving files into folders people read (in/, sent/, failed/, quarantine/).

Theory of operation
-------------------
Nothing is ever overwritten: a file goes in under the first free name of
`name`, `name~1`, `name~2`, ... (see `layout.tilde_name`), by
`FS.rename_noreplace`, so a name that appears between our check and our
rename makes us try the next one instead of clobbering it.

`place_noreplace` is idempotent across crashes: before using a candidate
name that exists, it checks whether that name already *is* our file (same
inode). That happens when the link+unlink fallback of `rename_noreplace` was
cut between its two steps; recovery then just drops the source name instead
of delivering the file a second time under the next free name.

`place_with_reason` is for failed/ and quarantine/: the one-line
`<name>.reason` is made durable first (tmp + fsync + rename + fsync folder),
then the file is renamed beside it and the folder fsync'd. Crash points:

* before the reason is renamed in: only a dot-temp `.<name>.reason.tmp`; the
  file is still where it was and the whole move is done again later;
* after the reason, before the file: an orphan `<name>.reason`; the retry reuses
  it only if it holds the same line and is not itself a failed file (a file
  named `x.reason` failed earlier keeps its own name and its `x.reason.reason`);
* after the file's rename, before the folder fsync: both names are there (a
  process crash loses nothing; on power loss the rename may be undone, which
  leaves the file at its source, where recovery finds it again).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import SpoolError
from .fs import FS, PathLike, write_atomic
from .layout import tilde_name

REASON_SUFFIX = ".reason"
REASON_MODE = 0o640
_MAX_TRIES = 1_000_000


def one_line(reason: str) -> str:
    """`reason` as a single printable line."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(reason)).split())
    return text or "no reason given"


def same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def place_noreplace(fs: FS, src: Path, folder: Path, name: str, *, reserve: int = 0,
                    taken: set[str] | None = None, preferred: str | None = None) -> Path:
    """Rename `src` into `folder` as the first free `name`/`name~N`; returns the path.

    `taken` holds names already promised to other files of the same batch;
    `preferred` is checked first for "already there" (see the module docstring).
    """
    if preferred is not None and same_file(src, folder / preferred):
        fs.unlink(src)
        return folder / preferred
    for n in range(_MAX_TRIES):
        candidate = tilde_name(name, n, reserve)
        if taken is not None and candidate in taken:
            continue
        path = folder / candidate
        if os.path.lexists(path):
            if same_file(src, path):
                fs.unlink(src)
                return path
            continue
        try:
            fs.rename_noreplace(src, path)
        except FileExistsError:
            continue
        return path
    raise SpoolError(f"no free name for {name!r} in {folder}")  # pragma: no cover


def pick_free(folder: Path, name: str, taken: set[str], reserve: int = 0) -> str:
    """The first of `name`, `name~1`, ... that is neither in `taken` nor in `folder`."""
    for n in range(_MAX_TRIES):
        candidate = tilde_name(name, n, reserve)
        if candidate not in taken and not os.path.lexists(folder / candidate):
            return candidate
    raise SpoolError(f"no free name for {name!r} in {folder}")  # pragma: no cover


def _reason_slot_free(folder: Path, candidate: str, line: bytes) -> bool:
    """May `candidate` (+ `.reason`) take a failed file? Neither name may hold
    another file; an orphan `<candidate>.reason` of a cut move of our own (same
    line, and not itself a failed file with a reason beside it) may be reused."""
    if os.path.lexists(folder / candidate):
        return False
    reason = folder / (candidate + REASON_SUFFIX)
    if not os.path.lexists(reason):
        return True
    if os.path.lexists(folder / (candidate + REASON_SUFFIX + REASON_SUFFIX)):
        return False
    try:
        with open(reason, "rb") as f:
            return f.read(len(line) + 1) == line
    except OSError:
        return False


def place_with_reason(fs: FS, src: Path, folder: Path, name: str, reason: str,
                      preferred: str | None = None) -> Path:
    """Move `src` to `folder/<name~N>` beside a one-line `<name~N>.reason`; neither
    name ever overwrites another file (a failed file may itself be called
    `x.reason`)."""
    line = (one_line(reason) + "\n").encode("utf-8", "replace")
    if preferred is not None and same_file(src, folder / preferred):
        fs.unlink(src)
        fs.fsync_dir(folder)
        return folder / preferred
    for n in range(_MAX_TRIES):
        candidate = tilde_name(name, n, reserve=len(REASON_SUFFIX))
        path = folder / candidate
        if os.path.lexists(path) and same_file(src, path):
            fs.unlink(src)
            fs.fsync_dir(folder)
            return path
        if not _reason_slot_free(folder, candidate, line):
            continue
        write_atomic(fs, folder / (candidate + REASON_SUFFIX), line, mode=REASON_MODE)
        try:
            fs.rename_noreplace(src, path)
        except FileExistsError:
            continue
        fs.fsync_dir(folder)
        return path
    raise SpoolError(f"no free name for {name!r} in {folder}")  # pragma: no cover


def write_reason_only(fs: FS, folder: Path, name: str, reason: str) -> Path:
    """Just `<name~N>.reason` (for something refused before any data arrived)."""
    line = (one_line(reason) + "\n").encode("utf-8", "replace")
    for n in range(_MAX_TRIES):
        candidate = tilde_name(name, n, reserve=len(REASON_SUFFIX))
        if os.path.lexists(folder / candidate) or \
                os.path.lexists(folder / (candidate + REASON_SUFFIX)):
            continue
        path = folder / (candidate + REASON_SUFFIX)
        write_atomic(fs, path, line, mode=REASON_MODE)
        return path
    raise SpoolError(f"no free name for {name!r} in {folder}")  # pragma: no cover


def dump_json(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()


def read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, None) if missing, or (None, problem) if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot open: {exc.strerror}"
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(1 << 24)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    return record, None


def move_aside(fs: FS, path: Path) -> Path:
    """Rename an unusable state file to `<name>.corrupt-<time>` (kept for a person)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while os.path.lexists(target):
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    fs.rename(path, target)
    fs.fsync_dir(path.parent)
    return target


def is_int(value: object, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and \
        all(c in "0123456789abcdef" for c in value)


def listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def unlink_quietly(fs: FS, path: PathLike) -> bool:
    try:
        fs.unlink(path)
    except FileNotFoundError:
        return False
    return True

