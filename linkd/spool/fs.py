"""The file-system seam: every durable step of the spool goes through an `FS`.

Theory of operation
-------------------
The spool's correctness rests on the *order* of a handful of system calls
(write, fsync, rename, fsync of the folder, ...). Each of them is a method of
`FS`, and every method that changes what is on disk first calls
`FS.step(op, target)`. Production code uses `FS()` (plain `os` calls); tests
use `FaultyFS` (tests/support/spoolkit.py), whose `step` raises `OSError` (ENOSPC,
EIO, ...) or a simulated crash at the N-th step, so every crash point of every
protocol can be visited one by one, on real files.

Steps (the `op` names): open, write, fsync, fsync_dir, rename, replace,
rename_noreplace, link, unlink, chmod, truncate, syncfs, mkdir. Reads and
closes are not steps: they change nothing on disk.

`rename_noreplace` is atomic and never overwrites: renameat2(RENAME_NOREPLACE)
where the kernel and file system support it; else link(2) + unlink(2) (a crash
in between leaves both names on the same inode: the callers' recovery checks
for that with `os.path.samefile`); else, on file systems without hard links,
check-then-rename (safe only because one daemon holds the state-dir lock).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_syncfs = getattr(_libc, "syncfs", None)
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


class FS:
    """Plain `os` calls, one method per durable step (see the module docstring)."""

    use_renameat2 = True

    def step(self, op: str, target: object) -> None:
        """Called before every durable step; the fault-injection hook."""

    # -- files -----------------------------------------------------------
    def open(self, path: PathLike, flags: int, mode: int = 0o600) -> int:
        self.step("open", path)
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` (looping over short writes)."""
        self.step("write", fd)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:      # some FUSE servers: would loop for ever
                raise OSError(errno.EIO, "write made no progress", str(fd))
            view = view[n:]

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of `data` at `offset` (a "write" step; looping over short writes)."""
        self.step("write", fd)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            if n <= 0:      # some FUSE servers: would loop for ever
                raise OSError(errno.EIO, "write made no progress", str(fd))
            view, offset = view[n:], offset + n

    def fsync(self, fd: int) -> None:
        self.step("fsync", fd)
        os.fsync(fd)

    def fsync_dir(self, path: PathLike) -> None:
        self.step("fsync_dir", path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def chmod(self, target: int | PathLike, mode: int) -> None:
        self.step("chmod", target)
        if isinstance(target, int):
            os.fchmod(target, mode)
        else:
            os.chmod(target, mode)

    def truncate(self, target: int | PathLike, length: int) -> None:
        self.step("truncate", target)
        if isinstance(target, int):
            os.ftruncate(target, length)
        else:
            os.truncate(target, length)

    def syncfs(self, path: PathLike) -> None:
        """Flush every dirty page of the file system holding `path` (syncfs(2))."""
        self.step("syncfs", path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _syncfs is None:  # pragma: no cover - every glibc since 2.14 has it
                os.sync()
            elif _syncfs(fd) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), str(path))
        finally:
            os.close(fd)

    # -- names -----------------------------------------------------------
    def mkdir(self, path: PathLike, mode: int) -> None:
        self.step("mkdir", path)
        os.mkdir(path, mode)

    def rename(self, src: PathLike, dst: PathLike) -> None:
        self.step("rename", dst)
        os.rename(src, dst)

    def replace(self, src: PathLike, dst: PathLike) -> None:
        self.step("replace", dst)
        os.replace(src, dst)

    def link(self, src: PathLike, dst: PathLike) -> None:
        self.step("link", dst)
        os.link(src, dst, follow_symlinks=False)

    def unlink(self, path: PathLike) -> None:
        self.step("unlink", path)
        os.unlink(path)

    def rename_noreplace(self, src: PathLike, dst: PathLike) -> None:
        """Atomically rename `src` to `dst`; FileExistsError if `dst` exists."""
        self.step("rename_noreplace", dst)
        if self.use_renameat2 and _renameat2 is not None:
            rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                            _RENAME_NOREPLACE)
            if rc == 0:
                return
            e = ctypes.get_errno()
            if e not in _UNSUPPORTED:
                raise OSError(e, os.strerror(e), str(src), None, str(dst))
        try:
            self.link(src, dst)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            # No hard links here: check-then-rename, safe under the state-dir lock.
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) \
                    from None
            self.rename(src, dst)
            return
        self.unlink(src)


DEFAULT_FS = FS()


def write_atomic(fs: FS, path: Path, data: bytes, mode: int = 0o600,
                 tmp: Path | None = None) -> None:
    """Replace `path` with `data` durably: tmp + fsync + rename + fsync folder.

    The temporary is `tmp`, by default the dot-name `.<name>.tmp` beside `path`;
    a crash leaves either the old file or the new one, plus at worst that
    temporary (which recovery deletes).
    """
    tmp = path.with_name(f".{path.name}.tmp") if tmp is None else tmp
    fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        fs.write(fd, data)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.replace(tmp, path)
    fs.fsync_dir(path.parent)


def fsync_file(fs: FS, path: PathLike, mode: int | None = None) -> None:
    """Open `path` (no symlinks), optionally fchmod it, fsync it, close it."""
    fd = fs.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if mode is not None:
            fs.chmod(fd, mode)
        fs.fsync(fd)
    finally:
        fs.close(fd)


def fsync_dir(path: PathLike) -> None:
    """fsync a folder (outside the spool's FS seam: for tools and the audit log)."""
    DEFAULT_FS.fsync_dir(path)


class _StatFS(ctypes.Structure):
    # struct statfs begins with f_type (__fsword_t: a long on Linux's 64- and
    # 32-bit ABIs alike); the rest is padding big enough for any layout
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 248)]


def fs_type(folder: PathLike) -> int | None:
    """statfs(2) f_type of the file system holding `folder` (None if unknown)."""
    buf = _StatFS()
    if _libc.statfs(os.fsencode(folder), ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF
