"""Appending a received file through O_DIRECT, past the page cache.

Theory of operation
-------------------
The receiver writes every byte of a big message once and then reads none of
it back (the SHA-256 is computed from the frames as they arrive). Written
through the page cache, each byte is first copied by the kernel into a page of
its own: measured on the 2-core VMs linkd is benchmarked on (docs/PERFORMANCE.md
§3), that copy cost 1.1-2.4 CPU-seconds of system time per GiB whenever the
pages were fresh ones, 38 % of the receiver's CPU in a 512 MiB transfer, and
more than the whole of SHA-256. Through O_DIRECT the device reads the bytes
from our buffer: 0.2 CPU-s per GiB, and 0.9 s instead of 1.8-3.0 s of wall time
for 1 GiB with the same fsyncs.

O_DIRECT wants the buffer's address, the length and the file offset aligned
(BLOCK covers every logical block size in use). So `DirectWriter` stages the
bytes in an aligned buffer (an anonymous mmap) that always holds the file's
bytes from `base` (a BLOCK multiple) to `base + fill`:

* `append()` copies into the stage and writes every full stage with one
  O_DIRECT pwrite;
* `settle()` -- before an fsync, and before the file is closed -- writes the
  whole blocks it holds the same way and the tail (under one block) through
  the ordinary descriptor, i.e. the page cache; the tail *stays* staged, and
  the next O_DIRECT write of that block writes it again (the kernel writes out
  and drops the cached page of a range before an O_DIRECT write to it).

After `settle()` every appended byte is in the file, so what the caller's
fsync makes durable is exactly what it would have been without O_DIRECT:
nothing about checkpoints, commits or their crash points changes, and
recovery reads the file through the page cache as before.

O_DIRECT is used only on local file systems known to handle it (LOCAL_FS:
ext4, XFS, btrfs, tmpfs); the checkpoint fsyncs the ordinary descriptor, which
on a FUSE or network file system need not flush what the other one wrote.
Where O_DIRECT is refused (a file system without it, such as tmpfs before
Linux 6.6 or some FUSE file systems: EINVAL or EOPNOTSUPP at open or at a
write) the writer falls back, for the rest of the file, to plain writes
through the ordinary descriptor.
Every write goes through the spool's `FS` seam as a "write" step, the extra
descriptor as an "open" step, so the fault-injection tests reach them.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from .fs import FS, fs_type

BLOCK = 4096                 # O_DIRECT alignment: a multiple of every logical block size
STAGE = 1 << 20              # the staging buffer: one O_DIRECT write per MiB
DIRECT_MIN = 4 << 20         # messages smaller than this are written the ordinary way
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# what a file system says when it does not do O_DIRECT (at open or at a write)
_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
# statfs f_type of the local file systems O_DIRECT is used on: ext2/3/4, XFS, btrfs,
# tmpfs. Elsewhere (FUSE, NFS, SMB...) an fsync of one descriptor need not flush
# what another wrote, so the checkpoint's fsync would not cover the direct writes.
LOCAL_FS = {0xEF53, 0x58465342, 0x9123683E, 0x01021994}


def wanted(size: int) -> bool:
    """Whether a message of `size` bytes is written through O_DIRECT."""
    return bool(_O_DIRECT) and size >= DIRECT_MIN


class DirectWriter:
    """Appends to the file open on `fd` (readable if `start` is not a BLOCK multiple:
    the block it ends in is re-read) from offset `start` through a second,
    O_DIRECT descriptor (see the module docstring). OSError from open() (other
    than O_DIRECT being refused) is the caller's, as for any other write."""

    def __init__(self, fs: FS, path: Path, fd: int, start: int) -> None:
        self.fs, self.fd = fs, fd
        self.base = start - start % BLOCK     # file offset of stage[0]
        self.fill = start - self.base         # stage[:fill] holds the file's bytes
        self.dfd: int | None = None
        self.stage: mmap.mmap | None = None
        if fs_type(path.parent) not in LOCAL_FS:
            return                            # not known to be safe here: plain writes
        try:
            self.dfd = fs.open(path, os.O_WRONLY | os.O_NOFOLLOW | _O_DIRECT)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            return                            # no O_DIRECT here: plain writes
        try:
            mine, theirs = os.fstat(self.dfd), os.fstat(fd)
            if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
                # the name was replaced between the two opens: direct writes would
                # go to another file than the one checkpointed and committed
                raise OSError(errno.EIO, "the partial file was replaced while opening it",
                              str(path))
            self.stage = mmap.mmap(-1, STAGE)
            if self.fill:
                head = os.pread(fd, self.fill, self.base)
                if len(head) != self.fill:
                    raise OSError(errno.EIO, "partial file shrank while re-reading its tail",
                                  str(path))
                self.stage[:self.fill] = head
        except BaseException:
            self.close()
            raise

    @property
    def direct(self) -> bool:
        return self.stage is not None

    def append(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            stage = self.stage
            if stage is None:       # no O_DIRECT (from the start, or since a refusal)
                self._plain(view, self.base + self.fill)
                self.fill += len(view)
                return
            take = min(len(view), STAGE - self.fill)
            stage[self.fill:self.fill + take] = view[:take]
            self.fill += take
            view = view[take:]
            if self.fill == STAGE:
                self._blocks()

    def settle(self) -> None:
        """Put every appended byte into the file (see the module docstring)."""
        if self.stage is None:
            return
        self._blocks()
        if self.stage is not None and self.fill:
            self._plain(self.stage[:self.fill], self.base)     # a copy of under BLOCK

    def close(self) -> None:
        """Release the buffer and the O_DIRECT descriptor (not `fd`)."""
        stage, self.stage = self.stage, None
        if stage is not None:
            try:
                stage.close()
            except BufferError:
                pass    # a view of it is still alive (an error's traceback): the GC unmaps it
        if self.dfd is not None:
            dfd, self.dfd = self.dfd, None
            self.fs.close(dfd)

    # -- internals -------------------------------------------------------------
    def _blocks(self) -> None:
        """Write the whole blocks staged with O_DIRECT; keep the tail staged."""
        assert self.stage is not None and self.dfd is not None
        n = self.fill - self.fill % BLOCK
        if not n:
            return
        whole = memoryview(self.stage)
        try:
            self.fs.pwrite(self.dfd, whole[:n], self.base)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            # O_DIRECT refused after all (an alignment this file system wants bigger
            # than BLOCK, ...): the staged bytes and the rest go the ordinary way
            self._plain(whole[:self.fill], self.base)
            self.base += self.fill
            self.fill = 0
            whole.release()
            self.close()
            return
        tail = self.fill - n
        if tail:
            whole[:tail] = whole[n:self.fill]
        whole.release()
        self.base += n
        self.fill -= n

    def _plain(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.fs.pwrite(self.fd, data, offset)
