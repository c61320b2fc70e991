"""Symlinked spool folders are refused, never followed (CONTRACT §5).

Theory of operation
-------------------
Every folder linkd writes into lies below one of two *roots* the operator
configured: `spool_dir` and `state_dir`. The roots themselves (and the path
leading to them) are trusted as configured -- `/var/spool/linkd` may well be a
link to another disk. Everything *below* a root must be a real folder: if
`in/<ch>`, `tmp/`, `queue/<ch>`, `failed/<ch>`, `sent/<ch>`, `quarantine/`,
`out/<ch>`, the peer folder or a state folder is a symbolic link, a rename
into it would land the file wherever the link points, outside the spool.

`open_folder(root, path)` walks from the root to `path` one component at a
time, each with `openat(dirfd, name, O_PATH|O_DIRECTORY|O_NOFOLLOW)`: a
component that is a symlink fails with ENOTDIR (O_NOFOLLOW|O_DIRECTORY), and
is reported as `SymlinkedFolder` naming it and the fix. `check_folders()`
does that for a handful of folders and closes the descriptors: the spool calls
it (through `SpoolLayout.check`) at start-up (`SpoolLayout.create`), in every
recover(), and before each step that writes into a folder (claim, fail,
archive, begin/commit of a delivery, quarantine; the begin()s of one inbound
batch share one check of tmp/). The cost is one openat per
path component (five or six), next to the fsyncs of the same step.

Residual race: the check and the path-based rename/open that follows are two
system calls. A folder swapped for a link *between* them is followed once.
Swapping a folder needs write permission on its parent: the parents linkd
creates (`<peer>/`, `in/`, `out/`, `queue/`, ... and the 0700 state folders)
are 0750 and owned by linkd's user, so only that user or root can do it; the
folders producers may write into (`out/<ch>/`, 2770 with `spool_group`) hold
files, not folders linkd writes into, and files there are opened with
O_NOFOLLOW. docs/SECURITY.md states this.

A missing folder is not this module's business (FileNotFoundError passes
through: make_folder creates it, or the caller's own error handling applies).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..errors import (
    SpoolError,
    SymlinkedFolder,  # noqa: F401 (re-exported)
)

_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC




def _below(root: Path, path: Path) -> tuple[str, ...]:
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise SpoolError(f"{path} is not below {root}") from None
    parts = rel.parts
    if any(p in ("", ".", "..") for p in parts):
        raise SpoolError(f"{path} is not a plain path below {root}")
    return parts


def open_folder(root: Path, path: Path) -> int:
    """An O_PATH descriptor of `path`, reached from `root` without following any
    link below it. SymlinkedFolder if a component is a link, SpoolError if it is
    something else that is not a folder, FileNotFoundError if one is missing.
    The caller closes the descriptor."""
    root, path = Path(root), Path(path)
    parts = _below(root, path)
    fd = os.open(root, _FLAGS & ~os.O_NOFOLLOW)     # the root itself: as configured
    where = root
    try:
        for name in parts:
            where = where / name
            try:
                nxt = os.open(name, _FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    try:
                        mode = os.lstat(name, dir_fd=fd).st_mode
                    except OSError:
                        mode = 0
                    if not stat.S_ISLNK(mode):
                        raise SpoolError(f"{where} exists but is not a folder: move it "
                                         "away") from None
                    raise SymlinkedFolder(where, "a symbolic link") from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_folders(root: Path, folders: Iterable[Path]) -> None:
    """Raise SymlinkedFolder if any of `folders` (below `root`), or a folder on
    the way to it, is a symbolic link. Missing folders are not checked."""
    for folder in folders:
        try:
            os.close(open_folder(root, folder))
        except FileNotFoundError:
            continue
