"""The outbound spool's small types and constants (a leaf module)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FileChanged as FileChanged  # re-exported
from ..errors import ResourceBusy as ResourceBusy
from ..errors import SpoolError as SpoolError
from .fs import FS, PathLike

if TYPE_CHECKING:
    from ..errors import SpoolError
    from .layout import SpoolLayout
    from .queue_index import QueueIndex

READ_SIZE = 1 << 20
CLAIM_BATCH = 64                 # files claimed per claim() call
WINDOW = 1280                    # queued items kept loaded (> the sender's 1,024 in flight)
CHECKPOINT_EVERY = 1024          # claims between two records of `next` (recovery's bound)
CLAIM_BYTES = 64 << 20           # bytes hashed per examine() call (a big file: itself alone)
SETTLE = 1.0                     # seconds unchanged, where no lease can be taken
# Where no lease can be taken, inotify tells of writers too (Outbound.writing, kept by
# net/watcher.py; spool/writers.py): a file written to in out/ and not closed
# since waits for its writer's close, or until unchanged for WRITER_GIVEUP; one
# created there and still empty waits the same (its writer has not written yet);
# after events were lost
# (OVERFLOW), every file must be unchanged for OVERFLOW_SETTLE, for OVERFLOW_WINDOW.
WRITER_GIVEUP = 600.0
OVERFLOW = ""                    # the mark of lost events (no file's name)
OVERFLOW_SETTLE = 30.0
WRITER_RETRY = 0.5               # how soon to look again at a file a writer holds
# the kinds of mark: created (and not closed since), written (and not closed since),
# suspect (in out/ when events were lost: at start-up, a folder watched anew, an
# inotify queue overflow; its writer, if any, was not seen)
CREATED, WRITTEN, SUSPECT = 0, 1, 2


class Quiet(float):
    """A wait for a file's quiet period (no lease): it looks complete, so the files
    after it in arrival order wait too (their own quiet periods end later anyway;
    taken first, they were delivered out of hand-over order)."""
# A file this big is claimed without its SHA-256, which is taken after the claim while
# the sender already sends it (outbound.py, "The late SHA-256"): its first byte leaves
# at once instead of ~0.6 s per GiB later. Smaller files are hashed at pick-up.
LATE_HASH = 32 << 20
MAX_SEQ = (1 << 53) - 1
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN,
                             errno.ENOBUFS})
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR})
_F_SETLEASE, _F_GETLEASE, _F_SETSIG = 1024, 1025, 10
_RECORD = re.compile(r"([1-9][0-9]{0,15})\.(meta|data|fail)")
_XATTR_NAME = "user.linkd.name"




class FolderRefused(ResourceBusy):
    """A folder of the channel is a symbolic link: the channel waits until
    recover() finds real folders again (see the module docstring)."""




def is_resource_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


@dataclass(frozen=True, slots=True)
class Claimed:
    channel: str
    seq: int
    name: str
    size: int
    sha256: str
    path: Path
    claimed_at: float
    ino: int = 0
    mtime_ns: int = 0
    # A file claimed without its SHA-256 (LATE_HASH): its ctime once claimed, in
    # memory only. A write, even one whose mtime was put back, moves it: the late
    # hash would otherwise take the content as rewritten for the content queued.
    ctime_ns: int = 0
    # Any file claimed here: its ctime once claimed, in memory only, for changed()
    # (message_changed): a write after the claim, even one whose mtime was put back,
    # moves it. (Not checked when the file is read: a chmod must not fail a message;
    # nor compared: an item read back from its record is the same item.)
    seen_ctime_ns: int = field(default=0, compare=False)


class _Pending(dict[int, Claimed]):
    """seq -> Claimed, keeping the total size and whether claim times still rise with
    seq (so the oldest claim is the first entry), for O(1) status counts: a queue of
    100,000 files is not summed again after every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ordered = True         # claimed_at never falls as seq rises

    def __setitem__(self, seq: int, item: Claimed) -> None:
        old = self.get(seq)
        if old is not None:
            self.bytes -= old.size
        elif self and (seq < next(reversed(self.keys()))
                       or item.claimed_at < self[next(reversed(self.keys()))].claimed_at):
            self.ordered = False
        super().__setitem__(seq, item)
        self.bytes += item.size

    def __delitem__(self, seq: int) -> None:
        self.bytes -= self[seq].size
        super().__delitem__(seq)
        if not self:
            self.ordered = True

    def pop(self, seq: int, default: Any = None) -> Any:
        if seq in self:
            item = self[seq]
            del self[seq]
            return item
        return default

    def oldest(self) -> float | None:
        if not self:
            return None
        if self.ordered:
            return next(iter(self.values())).claimed_at
        return min(i.claimed_at for i in self.values())


@dataclass(frozen=True)
class FailedFile:
    channel: str
    name: str
    size: int | None
    reason: str
    seq: int | None
    path: Path  # where it now lies in failed/ (for a vanished file: its .reason)


@dataclass(frozen=True)
class Candidate:
    """A file in out/<ch>/ that examine() found complete and hashed (`sha256` "": a
    big file, hashed after its claim)."""

    name: str
    size: int
    sha256: str
    ino: int
    mtime_ns: int
    ctime_ns: int = 0       # a big file's, as examine() saw it (claim() compares it)
    # a small file's content as examine() read and hashed it (FRESH_KEEP bytes a call at
    # most): the sender sends these bytes without reading the file again
    data: bytes | None = field(default=None, repr=False, compare=False)


@dataclass
class Examined:
    ready: list[Candidate]
    failed: list[FailedFile]
    retry_after: float | None = None     # some files were not ready: look again then
    more: bool = False                   # the backlog has more right now


@dataclass(frozen=True)
class Resolved:
    item: Claimed
    changed: bool        # the queued file changed after pick-up (the peer has the original)


def write_new(fs: FS, path: PathLike, data: bytes, sync: bool = True) -> None:
    """Write a new record file and fsync it (its folder is fsync'd by the caller;
    sync=False: the caller syncs the file system before relying on it)."""
    fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
    try:
        fs.write(fd, data)
        if sync:
            fs.fsync(fd)
    finally:
        fs.close(fd)


def digest_fd(fs: FS, fd: int, stop: Callable[[], bool] | None = None) -> tuple[int, str]:
    """(size, SHA-256 hex) of what is left to read on `fd`, READ_SIZE bytes per read
    through the FS seam (pick-up, a re-hash at claim, the sender's second look, the
    late hash). `stop()` true before a chunk is read: OSError ECANCELED."""
    digest, size = hashlib.sha256(), 0
    while True:
        if stop is not None and stop():
            raise OSError(errno.ECANCELED, "hashing stopped: the session ended")
        chunk = fs.read(fd, READ_SIZE)
        if not chunk:
            return size, digest.hexdigest()
        digest.update(chunk)
        size += len(chunk)


def digest_keep(fs: FS, fd: int, keep: int, expect: int) -> tuple[int, str, bytes | None]:
    """digest_fd(), keeping what was read if it is `keep` bytes or fewer (else None).
    A file expected (fstat) to be that small is read `expect` + 1 bytes at a time: a
    read allocates what it asks for, and a kept 4 KiB piece of a 1 MiB allocation
    left a hole in the heap that the next 1 MiB read could not use."""
    digest, size = hashlib.sha256(), 0
    parts: list[bytes] | None = [] if expect <= keep else None
    want = expect + 1 if parts is not None else READ_SIZE
    while True:
        chunk = fs.read(fd, want)
        if not chunk:
            data = b"".join(parts) if parts is not None else None
            return size, digest.hexdigest(), data
        digest.update(chunk)
        size += len(chunk)
        if parts is not None:
            if size <= keep:
                parts.append(chunk)
            else:
                parts, want = None, READ_SIZE


class FreshBudget:
    """How many bytes of fresh content (Candidate.data kept after its claim, until the
    sender takes it) all channels of the daemon hold at once: one bound for the
    process, whatever the number of peers and channels. Thread-safe (claims run in
    worker threads, the sender takes in the event loop)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0               # (with `lock` held: call settle() first)
        self.lock = threading.Lock()
        # What a collected Outbound held, given back without the lock: its finalizer
        # runs wherever the garbage collector does, which may be inside this very
        # lock (the full suite hung: a claim's allocation under the lock collected an
        # old Outbound, whose finalizer waited for the lock its own thread held).
        self.returned: deque[int] = deque()

    def give_back(self, n: int) -> None:
        """Lock-free (a finalizer's): counted off at the next settle()."""
        self.returned.append(n)

    def settle(self) -> None:
        """With `lock` held: count off what was given back."""
        while self.returned:
            self.used -= self.returned.popleft()

    def in_use(self) -> int:
        with self.lock:
            self.settle()
            return self.used


FRESH_KEEP = 256 << 10           # bytes of small files kept per examine() call ...
FRESH = FreshBudget(2 << 20)     # ... and by every channel together until sent


def set_name_xattr(path: Path, name: str) -> None:
    """Keep the original name on the file itself, where the file system allows
    (it names the file in failed/ if its .meta is ever lost)."""
    try:
        os.setxattr(path, _XATTR_NAME, name.encode("utf-8"), follow_symlinks=False)
    except OSError:
        pass


class OutboundState:
    """What pickup.py and recovery_out.py use of Outbound (a typed seam: the
    attributes are set by Outbound.__init__, the methods are its own)."""

    layout: SpoolLayout
    channel: str
    fs: FS
    max_bytes: int
    archive_sent: bool
    next_seq: int
    acked: int
    _out: Path
    _q: Path
    _failed: Path
    _state: Path
    _pending: _Pending          # the window: the lowest queued seqs, loaded
    _rest: QueueIndex           # every queued seq above the window (queue_index.py)
    late_problems: list[str]    # found while loading the window, for the daemon's log
    WINDOW: int
    CHECKPOINT_EVERY: int
    _listed: dict[str, int]
    _backlog_bytes: int
    _backlog: deque[str]
    _not_ready: dict[str, float]
    _blocking: set[str]
    _quiet_seen: dict[str, tuple[tuple[int, int, int], float, float]]
    _why: dict[str, str]
    _blocked_by: str | None
    writing_lock: threading.Lock
    writing: dict[str, tuple[float, int]]
    _ready: bool
    _refused: str | None
    _saved_next: int
    _checked: int

    if TYPE_CHECKING:
        def _require(self) -> None: ...
        def _check(self, *folders: Path) -> None: ...
        def _spool_folders(self) -> list[Path]: ...
        def _broken(self, what: str, exc: OSError) -> SpoolError: ...
        def _rec(self, seq: int, kind: str) -> Path: ...
        def _save_state(self, checkpoint: bool = True) -> None: ...
        def _load_state(self, problems: list[str]) -> None: ...
        def _rehash(self, item: Claimed) -> Claimed: ...
        def _open_checked(self, item: Claimed) -> int: ...
        def _recover_queue(self, problems: list[str], checked_below: int) -> None: ...
        def _meta_bytes(self, item: Claimed, **extra: Any) -> bytes: ...
        def _read_meta(self, seq: int, strict: bool = False) -> Claimed | None: ...
        def _orphan_name(self, seq: int) -> str: ...
        def _add(self, item: Claimed) -> None: ...
        def _fill(self, preloaded: dict[int, Claimed] | None = None) -> int: ...
