"""Outbound: claim dropped files into queue/<ch>/ under sequence numbers, then
resolve them on evidence (an acknowledgement naming their content) or fail them.

Theory of operation
-------------------
Per channel, in the spool's `queue/<ch>/`, a claimed message is `<seq>.meta`
(JSON: seq, name, size, sha256, claimed_at, and the inode, size and mtime of
the queued file, to notice a change after pick-up) plus `<seq>.data` (the file
itself, renamed out of out/<ch>/). `<seq>.fail` marks a seq being failed. The
small state file `<state>/peers/<peer>/channels/<ch>/out.json` holds `next`
(the lowest seq the next claim may take), `acked` (the highest seq the peer
acknowledged or reported committed in a hello, to notice a peer whose state went
backwards, even for messages whose acknowledgement never reached us) and
`checked` (recovery's checkpoint, below).

Sequence numbers are labels, not evidence: a file leaves the queue only on an
acknowledgement that names its seq *and* content (checked by the caller), or
into failed/ with a reason. So a lost or restored state file can at worst make
us reuse a number; the peer then reports other content under it (or cannot
say), and the file is renumbered above the peer's committed seq and sent again
(`renumber`) -- a possible duplicate, never a loss.

Pick-up, in two steps so that hashing never holds the channel's lock:
`examine()` (reads only) lists out/<ch>/ once into a backlog in arrival order
(ctime, then name; the list is kept across calls, not re-read per batch) and
takes files one at a time: open O_NOFOLLOW|O_NONBLOCK, fstat (regular files
only), a read lease (`F_SETLEASE F_RDLCK` fails while anyone holds the file
open for writing: a `cp` still writing is left for later; where we may not take
a lease, the file must be unchanged for SETTLE seconds), hash, check the lease
was not broken meanwhile, close. Its batch is bounded by count and bytes.
`claim()` then writes and fsyncs each .meta, fsyncs queue/<ch>/, renames each
file in (renameat2 NOREPLACE), checks that what arrived is the inode it hashed
(else re-hashes it, opening it O_NONBLOCK: a FIFO swapped in never blocks us),
and fsyncs both folders. Crash points:
  C1 .meta without .data: recovery deletes the .meta (the file is still in out/);
  C2 after some renames: those are pending, the rest are C1;
  C3 before the final folder fsyncs: renames are atomic; on power loss one may be
     undone, which is C1 again;
  C4 (no RENAME_NOREPLACE) between the link and the unlink: the file has both
     names; recovery sees the same inode in out/ and drops that name.
The original name is set as an xattr only once the file is queued: setting it
changes the ctime, i.e. the file's place in the arrival order while in out/.
Resolve (acknowledged): record next/acked durably, then delete (or archive to
sent/) each .data and its .meta. A crash in between leaves a queued file the
peer holds: it is sent again and the peer acknowledges it as a duplicate.
Record files are reused (issue 13): while files are queued, a resolved .meta is
renamed to a spare `.spare-N` instead of deleted, and the next claim writes its
record into a spare and renames it to `<seq>.meta` (so a backlog neither
allocates nor frees an inode per record); the resolve that empties the queue
deletes the spares. A spare is a dot-file, which recovery deletes as a
temporary: a crash while one is written, or before it is renamed, is C1 or
nothing at all.
Fail (a reason): if the seq is not yet below the recorded `next`, record it
first (else a restart could give the failed seq to another file); write
`<seq>.fail` durably, move .data to failed/<ch>/ beside a one-line .reason,
delete .meta and .fail; recovery finishes a cut failure.
Renumber (seq s -> n): write `<n>.meta`, rename `<s>.data` to `<n>.data`, delete
`<s>.meta`; a crash leaves a .meta without .data on one side (deleted, C1), or,
cut between link and unlink, both records on one inode: recovery keeps `<n>`.
Migration of revision 1 claims writes each new .meta with `migrated_from`, so
that a move cut by a crash (a copy across mounts, or link + unlink) is finished
on the next start rather than queued a second time.

The late SHA-256 (issue 13): a file of LATE_HASH bytes or more is claimed without
its SHA-256 (`sha256` "" in the record and the Claimed), so that its first byte
leaves at once: the sender hashes it in a thread beside the transfer
(`digest_late()`: the same checks as examine()'s, under a lease, against the
claimed inode, size and mtime), records it (`record_sha256()`, a .meta rewritten
atomically; a crash loses only the hash, taken again) and sends it after the data
(a `sum` frame, docs/PROTOCOL.md), or before the `msg` to a peer that does not
take it late and for a probe. What the peer delivers is still checked against a
hash taken under a lease, as at pick-up: a file written to after its claim is
refused, or failed here, never delivered mixed.

The queue in memory (issue 13): only a *window* of the lowest queued seqs
(WINDOW items, more than the sender keeps in flight) is loaded as `Claimed`;
every seq above it is a 16-byte entry of a `QueueIndex` (queue_index.py), read
from its .meta when the window reaches it (after a resolve, fail, renumber or
claim, in the same hop; `fill()` retries). So recovery need not read the whole
queue: `checked` in the state file is a *checkpoint*, set to `next` only at
moments when every claim and renumbering is complete (a resolve, a raise_floor,
a whole renumbering, claim() every CHECKPOINT_EVERY claims, recovery once it has
finished the tail; never in the middle of a claim batch or of renumber_tail,
whose later moves go below the earlier ones), so below it recovery looks at
names only (one listing of queue/<ch>/:
a lone .meta or .data, a .fail), and only the seqs at or above it -- the claims
and renumberings a crash may have cut -- are checked record by record (C4, a
swapped inode, a renumbering cut between link and unlink, found through the new
record's `renumbered_from`). A damaged record below the checkpoint is handled
as recovery would handle it (failed/), when the window reaches it, with a line
in `late_problems` for the daemon's log.

Symlinked folders (safedir.py): every step checks the folders it writes into
(out/<ch>, queue/<ch>, failed/<ch>, sent/<ch>, the state folder) first. A
spool folder found to be a link *refuses* the channel: FolderRefused (a
ResourceBusy: the files are fine, nothing is failed for it), `usable` turns
False, and recover() then loads the state but touches no spool folder, keeps
nothing pending and makes examine() find nothing, until it finds real folders
again and recovers the queue as usual. A symlinked state folder makes
recover() raise.

Errors: EMFILE, ENFILE, ENOMEM, EAGAIN and ENOBUFS are resource errors (raised
as ResourceBusy, retried later), never a reason to fail a file. Any other
OSError in a step that changes state marks the object dirty: it raises
SpoolError until recover() has rebuilt the in-memory view from disk.

Size: over 400 lines on purpose: pick-up (pickup.py), recovery
(recovery_out.py) and the item records (outbound_items.py) are already apart;
what stays is claim/resolve/fail/renumber over one in-memory view, whose
crash points above are read together.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from ..errors import FileChanged as FileChanged  # re-exported
from ..errors import ResourceBusy as ResourceBusy
from ..errors import SpoolError as SpoolError
from ..errors import SymlinkedFolder
from . import inbound as _inbound
from . import writers
from .files import (
    dump_json,
    is_int,
    move_aside,
    place_noreplace,
    place_with_reason,
    read_json,
    unlink_quietly,
    write_reason_only,
)
from .fs import DEFAULT_FS, FS, write_atomic
from .layout import (
    FOLDER_MODE,
    SpoolLayout,
    check_channel,
    make_folder,
)
from .outbound_items import *  # noqa: F403  (the module's public names, re-exported)
from .outbound_items import (
    CHECKPOINT_EVERY,
    CLAIM_BATCH,
    FRESH,
    MAX_SEQ,
    Candidate,
    Claimed,
    FailedFile,
    FolderRefused,
    Resolved,
    _Pending,
    digest_fd,
    is_resource_error,
    set_name_xattr,
    write_new,
)
from .outbound_items import WINDOW as _WINDOW
from .pickup import PickupMixin
from .queue_index import QueueIndex
from .recovery_out import RecoveryMixin

SPARE_RECORDS = 256     # retired .meta files kept per channel for reuse (queue/<ch>/.spare-N)


def _changed(st: os.stat_result, item: Claimed) -> str:
    """Why a queued file no longer is the one claimed, in the words that fit."""
    if st.st_ino != item.ino:
        how = "replaced by another file"
    elif st.st_size != item.size:
        how = f"now {st.st_size} bytes, {item.size} when queued"
    else:
        how = f"written to in place: the same size, {st.st_size} bytes, a newer modification time"
    return f"it was changed after it was queued ({how})"


def _give_back(held: list[int]) -> None:
    """An Outbound's finalizer: never takes FRESH.lock (see FreshBudget.returned)."""
    FRESH.give_back(held[0])
    held[0] = 0


class Outbound(PickupMixin, RecoveryMixin):
    """One peer's outbound channel (see the module docstring)."""

    WINDOW = _WINDOW                        # items kept loaded (see "The queue in memory")
    CHECKPOINT_EVERY = CHECKPOINT_EVERY     # claims between two records of `next`

    def __init__(self, layout: SpoolLayout, channel: str, max_bytes: int, archive_sent: bool,
                 fs: FS | None = None) -> None:
        self.layout, self.channel = layout, check_channel(channel)
        self.max_bytes, self.archive_sent = max_bytes, archive_sent
        self.fs = fs or DEFAULT_FS
        self._out, self._q = layout.out_dir(channel), layout.queue_dir(channel)
        self._failed, self._state = layout.failed_dir(channel), layout.state_file_out(channel)
        self.next_seq = 1
        self.acked = 0                  # highest seq the peer acknowledged or reported committed
        self._saved_next = 1                    # `next` as the state file has it
        self._checked = 1                       # `checked` as the state file has it
        self._pending = _Pending()              # the window (see "The queue in memory")
        self._rest = QueueIndex()
        self.late_problems: list[str] = []
        self._fill_stuck: int | None = None     # a seq the window could not load (logged once)
        self._backlog: deque[str] = deque()
        self._listed: dict[str, int] = {}       # backlog name -> size when listed
        self._sizes_seen: dict[str, int] = {}   # the last listing's sizes
        self._backlog_bytes = 0
        self._not_ready: dict[str, float] = {}  # name -> when to look again
        # name -> (time.monotonic() of the mark, CREATED/WRITTEN/SUSPECT): files of out/
        # that a writer may still hold open, kept by the daemon's watcher (net/watcher.py:
        # IN_CREATE, IN_MODIFY; IN_CLOSE_WRITE, IN_MOVED_TO end it) and by examine()
        # (SUSPECT after lost events); read where no lease can be had
        self.writing: dict[str, tuple[float, int]] = {}
        self._blocking: set[str] = set()        # not-ready names waiting a quiet period
        self._quiet_seen: writers.Seen = {}     # how long each waiting file has been so
        self._why: dict[str, str] = {}          # why a file of out/ was not taken (queue)
        self._blocked_by: str | None = None     # the quiet file the last pass stopped at
        self.writing_lock = threading.Lock()    # writing: the watcher's thread and ours
        self._ready = False
        self._refused: str | None = None        # a symlinked spool folder (see the top)
        self._spares: list[str] = []            # retired .meta files to write records into
        self._qs = str(self._q)                 # queue/<ch> as text: records are named
        #                                         per file, and a pathlib join costs more
        self._spare_n = 0
        # seq -> (the item, its content as examined): see take_fresh(); what it holds is
        # counted in the daemon's FRESH budget, given back when this object goes
        self._fresh: dict[int, tuple[Claimed, bytes]] = {}
        self._fresh_held = [0]
        weakref.finalize(self, _give_back, self._fresh_held)

    def configure(self, max_bytes: int, archive_sent: bool) -> None:
        """A reload changed the channel's limits: they apply from now on."""
        self.max_bytes, self.archive_sent = max_bytes, archive_sent

    # -- paths and small helpers -----------------------------------------
    def _rec(self, seq: int, kind: str) -> Path:
        return self._q / f"{seq}.{kind}"

    def _require(self) -> None:
        if not self._ready:
            raise SpoolError(f"outbound {self.layout.peer}/{self.channel} needs recover() "
                             f"(not yet run, or a disk operation failed)")

    def _check(self, *folders: Path) -> None:
        """FolderRefused (and the channel refused until recover()) if a folder we
        are about to use is a symbolic link."""
        try:
            self.layout.check(*folders)
        except SymlinkedFolder as exc:
            self._refused = str(exc)
            raise FolderRefused(str(exc)) from None

    def _spool_folders(self) -> list[Path]:
        sent = [self.layout.sent_dir(self.channel)] if self.archive_sent else []
        return [self._out, self._q, self._failed, *sent]

    def _broken(self, what: str, exc: OSError) -> SpoolError:
        if is_resource_error(exc):
            return ResourceBusy(f"{what} on {self.layout.peer}/{self.channel}: "
                                f"{exc.strerror or exc}: will retry")
        self._ready = False
        where = f" ({exc.filename})" if exc.filename is not None else ""
        return SpoolError(f"{what} on {self.layout.peer}/{self.channel} failed: "
                          f"{exc.strerror or exc}{where}")

    def pending(self) -> list[Claimed]:
        """Every claimed, unresolved item in seq order. Beyond the window this reads
        each record from disk: for tests and tools, never the daemon's hot path
        (it uses next_pending, head, first_seq, contains)."""
        return list(self.iter_pending())

    def iter_pending(self) -> Iterator[Claimed]:
        """pending() one item at a time (memory stays bounded on a huge queue); run
        it in a thread. An item resolved meanwhile is left out."""
        snapshot = self._pending.copy()
        for seq in sorted(snapshot):
            yield snapshot[seq]
        for seq in self._rest.seqs():
            item = snapshot.get(seq) or self._pending.get(seq) or self._read_meta(seq)
            if item is not None:
                yield item

    def head(self, n: int) -> list[Claimed]:
        """The first `n` queued items (of the window; no disk access)."""
        snapshot = self._pending.copy()
        return [snapshot[s] for s in sorted(snapshot)[:n]]

    def first_seq(self) -> int | None:
        """The lowest queued seq (no disk access)."""
        snapshot = self._pending.copy()
        return min(snapshot) if snapshot else self._rest.first()

    def contains(self, seq: int) -> bool:
        """Is `seq` queued (loaded or not)? No disk access."""
        return seq in self._pending or seq in self._rest

    def get(self, seq: int) -> Claimed | None:
        """The loaded item `seq` (None if it is not queued, or not in the window)."""
        return self._pending.get(seq)

    def next_pending(self, from_seq: int) -> Claimed | None:
        """The claimed item with the smallest seq >= from_seq (O(1) when contiguous)."""
        if self._refused is not None:
            return None                         # nothing is sent from a refused channel
        item = self._pending.get(from_seq)
        if item is not None or not self._pending:
            return item             # (an empty window with a non-empty rest: fill())
        return min((i for s, i in self._pending.copy().items() if s >= from_seq),
                   key=lambda i: i.seq, default=None)

    # -- the queue in memory: window + index (see the module docstring) --------
    def _has(self, seq: int) -> bool:
        return seq in self._pending or seq in self._rest

    def _item(self, seq: int) -> Claimed | None:
        """The queued item `seq`: from the window, else read from its record."""
        item = self._pending.get(seq)
        if item is None and seq in self._rest:
            item = self._read_meta(seq)
        return item

    def _add(self, item: Claimed) -> None:
        """Queue a new item (a claim or a renumbering): into the window if it
        belongs there, else into the index (read back when the window gets there)."""
        rest = self._rest
        first = rest.first()
        if first is not None:
            into_window = item.seq < first
        else:
            into_window = len(self._pending) < self.WINDOW or item.seq < max(self._pending)
        if into_window:
            self._pending[item.seq] = item
        else:
            rest.add(item.seq, item.size)

    def _forget(self, seq: int) -> None:
        if self._pending.pop(seq, None) is None:
            self._rest.remove(seq)
        if self._fresh:
            self._take_fresh(seq)

    # -- fresh content: what examine() read, handed to the sender -------------
    def _keep_fresh(self, items: list[tuple[Claimed, bytes]]) -> None:
        """Keep the content examine() read and hashed of files claimed unchanged since,
        for the sender (take_fresh), as far as the daemon's FRESH budget allows."""
        if not items:
            return
        with FRESH.lock:
            FRESH.settle()
            for item, data in items:
                if FRESH.used + len(data) > FRESH.limit:
                    break
                FRESH.used += len(data)
                self._fresh_held[0] += len(data)
                self._fresh[item.seq] = (item, data)

    def _take_fresh(self, seq: int) -> tuple[Claimed, bytes] | None:
        with FRESH.lock:
            FRESH.settle()
            got = self._fresh.pop(seq, None)
            if got is not None:
                FRESH.used -= len(got[1])
                self._fresh_held[0] -= len(got[1])
        return got

    def take_fresh(self, item: Claimed) -> bytes | None:
        """The content of queued `item` as examine() read it, the very bytes its
        SHA-256 was taken over, once; None if none was kept (a big file, the budget
        spent, a restart). A file changed after its claim is then delivered as it was
        claimed, and resolve() finds the change (message_changed, CONTRACT §3)."""
        if item.seq not in self._fresh:
            return None
        got = self._take_fresh(item.seq)
        return got[1] if got is not None and got[0] is item else None

    def has_fresh(self, seq: int) -> bool:
        return seq in self._fresh

    def _drop_fresh(self) -> None:
        with FRESH.lock:
            FRESH.settle()
            FRESH.used -= self._fresh_held[0]
            self._fresh_held[0] = 0
            self._fresh.clear()

    def wants_fill(self) -> bool:
        """Is the window short while more is queued (a load was cut by an error)?"""
        return len(self._pending) < self.WINDOW and bool(self._rest) and self._ready

    def fill(self) -> int:
        """Load the window up (under the channel's lock, in a thread): items loaded."""
        self._require()
        return self._fill()

    def measure(self, limit: int = 1024) -> int:
        """Learn the sizes of up to `limit` queued files recovery did not read (one
        lstat each; under the channel's lock, in a thread): how many remain."""
        folder = os.fspath(self._q)

        def size_of(seq: int) -> int:
            try:
                return os.lstat(f"{folder}/{seq}.data").st_size
            except OSError:
                return 0            # gone or unreadable: the window will find out
        return self._rest.measure(size_of, limit)

    @property
    def unmeasured(self) -> int:
        """Queued files whose size the counts do not include yet."""
        return self._rest.unmeasured

    def _fill(self, preloaded: dict[int, Claimed] | None = None) -> int:
        """Move the lowest seqs of the index into the window, up to WINDOW, reading
        their records (or taking them from `preloaded`). Never raises: a record
        that cannot be read now stays where it is and is tried again later."""
        loaded = 0
        rest = self._rest
        while len(self._pending) < self.WINDOW and rest:
            seq = rest.first()
            assert seq is not None
            item = preloaded.pop(seq, None) if preloaded else None
            try:
                if item is None:
                    item = self._take_in(seq)
            except (OSError, SpoolError) as exc:
                if self._fill_stuck != seq and not isinstance(exc, ResourceBusy) \
                        and not is_resource_error(exc):
                    what = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    self.late_problems.append(
                        f"seq {seq}: cannot load its claim record: {what}: "
                        f"sending on {self.layout.peer}/{self.channel} waits for it")
                self._fill_stuck = seq
                break
            rest.pop_first()
            if item is not None:
                self._pending[seq] = item
                loaded += 1
        if loaded:
            self._fill_stuck = None
        return loaded

    def _take_in(self, seq: int) -> Claimed | None:
        """Read the record of `seq` for the window. A record that is missing or
        damaged is dealt with as recovery would (module docstring): None."""
        meta = self._rec(seq, "meta")
        item = self._read_meta(seq, strict=True)
        if item is not None:
            return item
        if not os.path.lexists(self._rec(seq, "data")):
            unlink_quietly(self.fs, meta)           # nothing left to send under it
            return None
        self._check(self._q, self._failed)
        name = self._orphan_name(seq)
        reason = f"its claim record {meta} is missing or unreadable"
        unlink_quietly(self.fs, meta)
        path = place_with_reason(self.fs, self._rec(seq, "data"), self._failed, name, reason)
        self.fs.fsync_dir(self._q)
        self.late_problems.append(f"seq {seq}: {reason}: moved to {path}")
        return None

    def open(self, item: Claimed) -> BinaryIO:
        """Open a queued file for sending; FileChanged if it is not what was claimed."""
        self._check(self._q)
        return os.fdopen(self._open_checked(item), "rb")

    def _open_checked(self, item: Claimed) -> int:
        """A descriptor on the queued file, checked against its claim record
        (FileChanged if it is no longer the regular file claimed)."""
        fd = self.fs.open(item.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileChanged("it is no longer a regular file")
            if item.ino and (st.st_ino, st.st_size, st.st_mtime_ns) != \
                    (item.ino, item.size, item.mtime_ns):
                raise FileChanged(_changed(st, item))
            if item.ctime_ns and st.st_ctime_ns != item.ctime_ns:
                raise FileChanged("it was changed after it was queued (its ctime moved: "
                                  "written to, or its times set)")
        except BaseException:
            self.fs.close(fd)
            raise
        return fd

    def read_whole(self, items: list[Claimed]) -> list[bytes | Exception]:
        """Read small queued files whole, in order, for sending (one call per batch:
        the folder is checked once, each file is opened, checked against its claim
        record as open() does, read, closed, and its SHA-256 compared with the one
        taken at pick-up). One entry per item: its bytes, or the exception that
        open() or a read gave (FileChanged if the content is not what was claimed).
        A resource error (EMFILE...) ends the batch there: the rest would fail
        alike, and the caller retries them later."""
        self._check(self._q)
        out: list[bytes | Exception] = []
        for item in items:
            try:
                out.append(self._read_whole(item))
            except (OSError, FileChanged) as exc:
                out.append(exc)
                if is_resource_error(exc):
                    break
        return out

    def _read_whole(self, item: Claimed) -> bytes:
        fd = self._open_checked(item)
        try:
            parts: list[bytes] = []
            got = 0
            while got < item.size:
                chunk = self.fs.read(fd, item.size - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        finally:
            self.fs.close(fd)
        data = b"".join(parts)
        if len(data) != item.size or hashlib.sha256(data).hexdigest() != item.sha256:
            raise FileChanged("it was changed after it was queued (its content no longer "
                              "matches the SHA-256 taken at pick-up)")
        return data

    def changed(self, item: Claimed) -> bool:
        """Does the queued file differ from its claim record now?"""
        try:
            st = os.lstat(item.path)
        except OSError:
            return True
        if item.seen_ctime_ns and st.st_ctime_ns != item.seen_ctime_ns:
            return True
        return bool(item.ino) and (st.st_ino, st.st_size, st.st_mtime_ns) != \
            (item.ino, item.size, item.mtime_ns)

    @property
    def usable(self) -> bool:
        """False after an I/O error, or while refused, until recover() has run again."""
        return self._ready and self._refused is None

    def recover(self) -> list[str]:
        self._spares.clear()        # recovery deletes the dot-files of queue/<ch>/
        self._drop_fresh()          # (a failed claim may have kept some)
        return super().recover()

    # -- claim records: reusing the files of resolved ones ----------------
    def _write_record(self, path: str, data: bytes, sync: bool) -> None:
        """write_new(), but into a spare (a resolved claim's .meta, kept under a
        dot-name) renamed to `path` once written, where there is one: a claim then
        allocates no inode and a resolve frees none. (On ext4 without a journal
        every new inode is searched for past the recently freed ones: creating a
        .meta per claim while resolving others made that search the largest cost
        of a backlog of small files, on both daemons of one disk.) A spare is a
        dot-file until the rename, so a crash leaves nothing recovery does not
        already delete; the rename is made durable with the queue folder's fsync
        that precedes every .data rename."""
        while self._spares:
            spare = self._spares.pop()
            try:
                fd = self.fs.open(spare, os.O_WRONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                # Written over from the start, then cut to its length: not O_TRUNC,
                # which on ext4 frees the record's block for the write to allocate
                # another (35-40 -> 8-13 us of CPU per record measured here). A crash
                # before the sync can leave the old record's bytes, or a mix, but only
                # where no .data is beside it: every .data rename comes after the
                # records' sync and queue/'s fsync, and recovery deletes a .meta
                # without its .data. (A spare is only handed out once its own rename
                # was made durable: see resolve().)
                self.fs.write(fd, data)
                self.fs.truncate(fd, len(data))
                if sync:
                    self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
            self.fs.rename(spare, path)
            return
        write_new(self.fs, path, data, sync=sync)

    def _retire_record(self, path: str, kept: int) -> str | None:
        """Remove a resolved claim's .meta: renamed to a spare dot-name for reuse
        (returned; at most SPARE_RECORDS are `kept`), else deleted. The spares only
        live while files are queued: the resolve that empties the queue deletes
        them."""
        if kept >= SPARE_RECORDS:
            unlink_quietly(self.fs, path)
            return None
        spare = f"{self._qs}/.spare-{self._spare_n}"
        self._spare_n += 1
        try:
            self.fs.rename(path, spare)
        except FileNotFoundError:
            return None
        return spare

    def _drop_spares(self) -> None:
        while self._spares:
            unlink_quietly(self.fs, self._spares.pop())

    # -- the state file ----------------------------------------------------
    def _save_state(self, checkpoint: bool = True) -> None:
        """Record next/acked durably. checkpoint=True (only where every claim and
        renumbering so far is complete) also records `checked` = next: recovery
        reads record by record only the seqs from there on (module docstring)."""
        self.layout.check(self._state.parent)
        checked = self.next_seq if checkpoint else min(self._checked, self.next_seq)
        write_atomic(self.fs, self._state, dump_json({"next": self.next_seq,
                                                      "acked": self.acked,
                                                      "checked": checked}))
        self._saved_next, self._checked = self.next_seq, checked

    def _load_state(self, problems: list[str]) -> None:
        record, problem = read_json(self._state)
        from_file = record is not None
        legacy = self.layout.legacy_state_file_out(self.channel)
        if record is None and problem is None and os.path.isfile(legacy):
            old, _ = read_json(legacy)       # revision 1: {"last_done": N}
            if old is not None and is_int(old.get("last_done")):
                record = {"next": int(old["last_done"]) + 1, "acked": int(old["last_done"])}
        if record is None and problem is None:
            return
        if record is not None and is_int(record.get("next"), 1) and is_int(record.get("acked")):
            self.next_seq = min(int(record["next"]), MAX_SEQ)
            self.acked = min(int(record["acked"]), MAX_SEQ)
            if from_file:
                self._saved_next = self.next_seq
                checked = record.get("checked")     # (absent before issue 13: 1)
                if isinstance(checked, int) and is_int(checked, 1):
                    self._checked = min(checked, self.next_seq)
            return
        aside = move_aside(self.fs, self._state)
        problems.append(f"{self._state} was unusable ({problem or 'bad fields'}); moved to "
                        f"{aside}: numbering continues above the queue; the peer's "
                        f"acknowledgements are checked by content, so nothing is lost")

    def raise_floor(self, committed: int) -> bool:
        """The peer has committed messages up to `committed` on this channel: new
        claims must take higher numbers (and if it says less than it once
        acknowledged, its state went back: remember the lower figure, so that the
        warning about possible duplicates is given once). True if anything moved."""
        self._require()
        target = min(committed, MAX_SEQ - 1) + 1
        if target <= self.next_seq and committed == self.acked:
            return False
        self.next_seq = max(self.next_seq, target)
        # `acked` follows what the peer reports: a later report below it means the
        # peer's state went back, even for messages whose ack never reached us.
        self.acked = committed
        try:
            self._save_state()
        except OSError as exc:
            raise self._broken("recording the peer's committed seq", exc) from None
        return True

    # -- pick-up, step 2: claim (changes state; under the channel's lock) ----
    def claim(self, ready: list[Candidate]) -> tuple[list[Claimed], list[FailedFile]]:
        """Claim examined files in order (see the module docstring)."""
        self._require()
        done: list[Claimed] = []
        failed: list[FailedFile] = []
        if not ready:
            return done, failed
        self._check(self._out, self._q)
        moved = False       # a file has left out/: a failure from here on needs recover()
        fresh: list[tuple[Claimed, bytes]] = []     # (claimed unchanged, as examined)
        try:
            now = time.time()
            items = []
            for i, c in enumerate(ready):
                seq = self.next_seq + i
                items.append(Claimed(self.channel, seq, c.name, c.size, c.sha256,
                                     self._rec(seq, "data"), now, c.ino, c.mtime_ns))
            # A batch shares one syncfs (where the kernel reports its errors, as the
            # inbound group commit does) instead of an fsync per .meta.
            share = _inbound.SYNCFS_OK and len(items) >= _inbound.SYNCFS_MIN
            for item in items:
                self._write_record(f"{self._qs}/{item.seq}.meta", self._meta_bytes(item),
                                   sync=not share)
            if share:
                self.fs.syncfs(self._q)
            self.fs.fsync_dir(self._q)
            for item, c in zip(items, ready, strict=True):
                src = self._out / item.name
                # A big file hashed late: written to since examine() (its ctime moves
                # even when its mtime is put back), it is hashed here after all.
                rewritten = False
                if not c.sha256:
                    try:
                        pre = os.lstat(src)
                        rewritten = pre.st_ctime_ns != c.ctime_ns
                    except FileNotFoundError:
                        pass
                try:
                    self.fs.rename_noreplace(src, item.path)
                except FileNotFoundError:
                    unlink_quietly(self.fs, self._rec(item.seq, "meta"))
                    continue        # vanished since examine(): nothing to send
                moved = True
                # only now: setting an xattr changes the ctime, which is the file's
                # place in the arrival order while it is still in out/ (and before
                # the lstat: the ctime it gives is the claimed file's from now on)
                set_name_xattr(item.path, item.name)
                st = os.lstat(item.path)
                if not stat.S_ISREG(st.st_mode):
                    failed.append(self._fail_claimed(item, "is not a regular file"))
                    continue
                if rewritten or (st.st_ino, st.st_size, st.st_mtime_ns) != \
                        (item.ino, item.size, item.mtime_ns):
                    item = self._rehash(item)  # replaced or written since examine()
                else:
                    item = replace(item, seen_ctime_ns=st.st_ctime_ns,
                                   ctime_ns=0 if item.sha256 else st.st_ctime_ns)
                    if c.data is not None:
                        fresh.append((item, c.data))
                done.append(item)
            self.next_seq = max(self.next_seq, items[-1].seq + 1)
            self.fs.fsync_dir(self._q)
            self.fs.fsync_dir(self._out)
            if self.next_seq - self._checked >= self.CHECKPOINT_EVERY:
                # every claim below next_seq is complete and durable: recovery after
                # a crash need only check the claims from here on
                self._save_state()
        except OSError as exc:
            if moved:
                # Even out of descriptors (EMFILE, which is "retry later", not broken):
                # files are in queue/ under seqs not yet durable nor known to the
                # sender; only recovery may adopt them (it fsyncs first). Retrying the
                # claim instead left such a file in queue/ for ever, never sent.
                self._ready = False
            raise self._broken("claiming", exc) from None
        for item in done:
            self._add(item)
        self._keep_fresh(fresh)
        self._fill()
        return done, failed

    def scan(self, peer_max: int | None = None,
             limit: int | None = None) -> tuple[list[Claimed], list[FailedFile]]:
        """examine() + claim() until out/<ch>/ has nothing ready (tests, tools)."""
        claimed: list[Claimed] = []
        failed: list[FailedFile] = []
        while limit is None or len(claimed) < limit:
            room = CLAIM_BATCH if limit is None else min(CLAIM_BATCH, limit - len(claimed))
            found = self.examine(peer_max, room, relist=not claimed and not failed)
            failed += found.failed
            got, bad = self.claim(found.ready)
            claimed += got
            failed += bad
            if not found.ready and not found.more:
                break
        return claimed, failed

    def content_differs(self, item: Claimed) -> bool:
        """Blocking: does the queued file's content differ from its claim (size or
        SHA-256), even where its inode, size and mtime do not say so (`changed()`)?
        For a refusal by the peer's checksum only: it reads the whole file. Gone, or a
        symlink now: it differs. Any other error (EIO, EMFILE, EACCES...) proves
        nothing: False, and the ordinary retry finds the error again when it opens
        the file (where a read error or a resource shortage has its own handling)."""
        if not item.sha256:
            return False        # hashed late and not yet: nothing to compare with
        try:
            fd = self.fs.open(item.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            return exc.errno in (errno.ENOENT, errno.ELOOP)
        try:
            size, sha256 = digest_fd(self.fs, fd)
        except OSError:
            return False
        finally:
            try:
                self.fs.close(fd)
            except OSError:
                pass
        return size != item.size or sha256 != item.sha256

    def record_sha256(self, item: Claimed, sha256: str) -> Claimed:
        """The late SHA-256 of `item` (digest_late()) into its .meta (atomically: a crash
        leaves the record without it, and it is taken again) and the window. Returns
        the queued item as it now is (unchanged if it was resolved, failed, renumbered
        or hashed meanwhile)."""
        self._require()
        current = self._item(item.seq)
        if current is None or current.sha256 or (current.path, current.ino) != \
                (item.path, item.ino):
            return current if current is not None else item
        new = replace(current, sha256=sha256)
        try:
            write_atomic(self.fs, self._rec(item.seq, "meta"), self._meta_bytes(new))
        except OSError as exc:
            if is_resource_error(exc):
                raise
            raise self._broken("recording a SHA-256", exc) from None
        if item.seq in self._pending:
            self._pending[item.seq] = new
        return new

    def _rehash(self, item: Claimed) -> Claimed:
        fd = self.fs.open(item.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileChanged("not a regular file")
            size, sha256 = digest_fd(self.fs, fd)
        finally:
            self.fs.close(fd)
        new = replace(item, size=size, sha256=sha256, ino=st.st_ino,
                      mtime_ns=st.st_mtime_ns)
        write_atomic(self.fs, self._rec(item.seq, "meta"), self._meta_bytes(new))
        return new

    # -- resolution --------------------------------------------------------
    def resolve(self, seqs: list[int]) -> list[Resolved]:
        """The peer acknowledged these seqs with matching content (the caller
        checked): remove (or archive) them. Unknown seqs are ignored."""
        self._require()
        items = [i for s in sorted(set(seqs)) if (i := self._item(s)) is not None]
        if not items:
            return []
        self._check(self._q, *self._spool_folders()[3:])
        try:
            top = items[-1].seq
            if top > self.acked or top >= self.next_seq:
                self.acked = max(self.acked, top)
                self.next_seq = max(self.next_seq, top + 1)
                self._save_state()
            done = []
            retired: list[str] = []
            for item in items:
                changed = self.changed(item)
                self._dispose(item)
                spare = self._retire_record(f"{self._qs}/{item.seq}.meta",
                                            len(self._spares) + len(retired))
                if spare is not None:
                    retired.append(spare)
                self._forget(item.seq)
                done.append(Resolved(item, changed))
            if not self._pending and not self._rest:
                self._spares += retired
                self._drop_spares()     # a drained queue/<ch>/ is empty
                retired = []
            self.fs.fsync_dir(self._q)
            # Only now may a claim write into them: before this fsync the unlink of
            # their .data and their own rename may not be durable, and a record
            # written in place there could end up as a resolved seq's .meta beside
            # its .data after a power cut. (A resolve that fails before this point
            # leaves them unused dot-files, which recovery deletes.)
            self._spares += retired
        except OSError as exc:
            raise self._broken("removing acknowledged files", exc) from None
        self._fill()
        return done

    def _dispose(self, item: Claimed) -> None:
        if self.archive_sent:
            sent = self.layout.sent_dir(self.channel)
            make_folder(sent, FOLDER_MODE, self.fs)
            if os.path.lexists(item.path):
                place_noreplace(self.fs, item.path, sent, item.name)
                self.fs.fsync_dir(sent)
        else:
            unlink_quietly(self.fs, item.path)

    def fail(self, item: Claimed, reason: str) -> FailedFile:
        """Move a claimed file to failed/<ch>/ with a one-line reason."""
        self._require()
        if not self._has(item.seq):
            raise SpoolError(f"seq {item.seq} is not pending on {self.layout.peer}/"
                             f"{self.channel}")
        self._check(self._q, self._failed)
        try:
            failed = self._fail_claimed(item, reason)
        except OSError as exc:
            raise self._broken(f"failing seq {item.seq}", exc) from None
        self._fill()
        return failed

    def _fail_claimed(self, item: Claimed, reason: str) -> FailedFile:
        if item.seq >= self._saved_next:
            # the queue alone would let a restart hand this seq (logged as failed)
            # to another file: record that it is used
            self.next_seq = max(self.next_seq, item.seq + 1)
            self._save_state(checkpoint=False)      # (maybe in the middle of a claim)
        write_atomic(self.fs, self._rec(item.seq, "fail"),
                     dump_json({"seq": item.seq, "name": item.name, "reason": reason}))
        if os.path.lexists(item.path):
            path = place_with_reason(self.fs, item.path, self._failed, item.name, reason)
        else:
            path = write_reason_only(self.fs, self._failed, item.name,
                                     f"{reason} (its queued copy had vanished)")
        unlink_quietly(self.fs, self._rec(item.seq, "meta"))
        unlink_quietly(self.fs, self._rec(item.seq, "fail"))
        self.fs.fsync_dir(self._q)
        self._forget(item.seq)
        return FailedFile(self.channel, item.name, item.size, reason, item.seq, path)

    def renumber(self, item: Claimed, above: int) -> Claimed:
        """Give a pending item a new seq above both `above` and every number used,
        durably (the peer holds other content, or cannot say, under its old one)."""
        new = self._renumber_to(item, max(self.next_seq, min(above, MAX_SEQ - 1) + 1),
                                checkpoint=True)
        self._fill()
        return new

    def renumber_tail(self, first: int, above: int) -> list[tuple[Claimed, Claimed]]:
        """Renumber every pending item from seq `first` on, keeping their order, to
        base+1, base+2, ... where base is above `above` and every number used:
        (old, new) pairs in seq order. The items move last-first, each to its exact
        target, so a crash between two moves leaves the queue in pick-up order
        (the moved tail above the unmoved head); the next session moves the rest.
        The later moves go *below* the earlier ones, so none of them records the
        checkpoint: only the whole tail, once it has moved."""
        self._require()
        seqs = [s for s in sorted(self._pending.copy()) if s >= first]
        seqs += self._rest.seqs(first)
        base = max(self.next_seq - 1, min(above, MAX_SEQ - len(seqs) - 1))
        moved = []
        for i in range(len(seqs) - 1, -1, -1):
            item = self._item(seqs[i])      # (beyond the window: read from its record)
            if item is not None:            # (a damaged record: the window deals with it)
                moved.append((item, self._renumber_to(item, base + 1 + i)))
        if moved:
            try:
                self._save_state()
            except OSError as exc:
                raise self._broken("recording the renumbering", exc) from None
        self._fill()
        return moved[::-1]

    def _renumber_to(self, item: Claimed, new_seq: int, checkpoint: bool = False) -> Claimed:
        self._require()
        if not self._has(item.seq):
            raise SpoolError(f"seq {item.seq} is not pending on {self.layout.peer}/"
                             f"{self.channel}")
        if self._has(new_seq) or new_seq > MAX_SEQ:
            raise SpoolError(f"cannot renumber seq {item.seq} to {new_seq} on "
                             f"{self.layout.peer}/{self.channel}")
        # (a rename moves the ctime: a late hash then checks inode, size and mtime)
        new = replace(item, seq=new_seq, path=self._rec(new_seq, "data"), ctime_ns=0,
                      seen_ctime_ns=0)
        self._check(self._q)
        try:
            write_new(self.fs, self._rec(new_seq, "meta"),
                      self._meta_bytes(new, renumbered_from=item.seq))
            self.fs.fsync_dir(self._q)
            self.fs.rename_noreplace(item.path, new.path)
            unlink_quietly(self.fs, self._rec(item.seq, "meta"))
            self.next_seq = max(self.next_seq, new_seq + 1)
            self._save_state(checkpoint)
        except OSError as exc:
            raise self._broken(f"renumbering seq {item.seq}", exc) from None
        self._add(new)                      # before the old one goes: never seen missing
        self._forget(item.seq)
        return new


