"""Outbound: claim dropped files into queue/<ch>/ under sequence numbers, then
resolve them on evidence (an acknowledgement naming their content) or fail them.

Theory of operation
-------------------
Per channel, in the spool's `queue/<ch>/`, a claimed message is `<seq>.meta`
(JSON: seq, name, size, sha256, claimed_at, and the inode, size and mtime of
the queued file, to notice a change after pick-up) plus `<seq>.data` (the file
itself, renamed out of out/<ch>/). `<seq>.fail` marks a seq being failed. The
small state file `<state>/peers/<peer>/channels/<ch>/out.json` holds `next`
(the lowest seq the next claim may take) and `acked` (the highest seq the peer
ever acknowledged, to notice a peer whose state went backwards).

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
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import FileChanged as FileChanged  # re-exported
from ..errors import ResourceBusy as ResourceBusy
from ..errors import SpoolError as SpoolError
from ..errors import SymlinkedFolder
from . import inbound as _inbound
from .files import (
    dump_json,
    is_int,
    is_sha256,
    listdir,
    move_aside,
    place_noreplace,
    place_with_reason,
    read_json,
    same_file,
    unlink_quietly,
    write_reason_only,
)
from .fs import DEFAULT_FS, FS, write_atomic
from .layout import (
    FOLDER_MODE,
    STATE_MODE,
    SpoolLayout,
    check_channel,
    make_folder,
    plain_name_problem,
)

READ_SIZE = 1 << 20
CLAIM_BATCH = 64                 # files claimed per claim() call
CLAIM_BYTES = 64 << 20           # bytes hashed per examine() call (a big file: itself alone)
SETTLE = 1.0                     # seconds unchanged, where no lease can be taken
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
    """A file in out/<ch>/ that examine() found complete and hashed."""

    name: str
    size: int
    sha256: str
    ino: int
    mtime_ns: int


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


class Outbound:
    """One peer's outbound channel (see the module docstring)."""

    def __init__(self, layout: SpoolLayout, channel: str, max_bytes: int, archive_sent: bool,
                 fs: FS | None = None) -> None:
        self.layout, self.channel = layout, check_channel(channel)
        self.max_bytes, self.archive_sent = max_bytes, archive_sent
        self.fs = fs or DEFAULT_FS
        self._out, self._q = layout.out_dir(channel), layout.queue_dir(channel)
        self._failed, self._state = layout.failed_dir(channel), layout.state_file_out(channel)
        self.next_seq = 1
        self.acked = 0                          # highest seq the peer ever acknowledged
        self._saved_next = 1                    # `next` as the state file has it
        self._pending = _Pending()
        self._backlog: deque[str] = deque()
        self._listed: dict[str, int] = {}       # backlog name -> size when listed
        self._sizes_seen: dict[str, int] = {}   # the last listing's sizes
        self._backlog_bytes = 0
        self._not_ready: dict[str, float] = {}  # name -> when to look again
        self._ready = False
        self._refused: str | None = None        # a symlinked spool folder (see the top)

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
        return SpoolError(f"{what} on {self.layout.peer}/{self.channel} failed: "
                          f"{exc.strerror or exc} ({exc.filename})")

    def pending(self) -> list[Claimed]:
        """Claimed, unresolved items in seq order. Safe to call from the event loop
        while a worker thread runs claim/resolve/fail (one C-level copy)."""
        snapshot = self._pending.copy()
        return [snapshot[s] for s in sorted(snapshot)]

    def get(self, seq: int) -> Claimed | None:
        return self._pending.get(seq)

    def next_pending(self, from_seq: int) -> Claimed | None:
        """The claimed item with the smallest seq >= from_seq (O(1) when contiguous)."""
        if self._refused is not None:
            return None                         # nothing is sent from a refused channel
        item = self._pending.get(from_seq)
        if item is not None or not self._pending:
            return item
        return min((i for s, i in self._pending.copy().items() if s >= from_seq),
                   key=lambda i: i.seq, default=None)

    def open(self, item: Claimed) -> BinaryIO:
        """Open a queued file for sending; FileChanged if it is not what was claimed."""
        self._check(self._q)
        fd = self.fs.open(item.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileChanged("it is no longer a regular file")
            if item.ino and (st.st_ino, st.st_size, st.st_mtime_ns) != \
                    (item.ino, item.size, item.mtime_ns):
                raise FileChanged(f"it was changed after it was queued (now {st.st_size} "
                                  f"bytes, claimed with {item.size})")
        except BaseException:
            self.fs.close(fd)
            raise
        return os.fdopen(fd, "rb")

    def changed(self, item: Claimed) -> bool:
        """Does the queued file differ from its claim record now?"""
        try:
            st = os.lstat(item.path)
        except OSError:
            return True
        return bool(item.ino) and (st.st_ino, st.st_size, st.st_mtime_ns) != \
            (item.ino, item.size, item.mtime_ns)

    @property
    def usable(self) -> bool:
        """False after an I/O error, or while refused, until recover() has run again."""
        return self._ready and self._refused is None

    # -- the state file ----------------------------------------------------
    def _save_state(self) -> None:
        self.layout.check(self._state.parent)
        write_atomic(self.fs, self._state, dump_json({"next": self.next_seq,
                                                      "acked": self.acked}))
        self._saved_next = self.next_seq

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
        if target <= self.next_seq and committed >= self.acked:
            return False
        self.next_seq = max(self.next_seq, target)
        self.acked = min(self.acked, committed)
        try:
            self._save_state()
        except OSError as exc:
            raise self._broken("recording the peer's committed seq", exc) from None
        return True

    # -- recovery ----------------------------------------------------------
    def recover(self) -> list[str]:
        """Rebuild the view from disk, finishing whatever a crash cut short."""
        self._ready = False
        problems: list[str] = []
        try:
            self.layout.check(self._state.parent)
            make_folder(self._state.parent, STATE_MODE, self.fs)
            self.next_seq, self.acked, self._saved_next = 1, 0, 1
            self._load_state(problems)
            try:
                self.layout.check(*self._spool_folders())
            except SymlinkedFolder as exc:
                if self._refused != str(exc):
                    problems.append(f"outbound {self.layout.peer}/{self.channel} refused: "
                                    f"{exc}")
                self._refused = str(exc)
                self._pending = _Pending()
                self._backlog.clear()
                self._not_ready.clear()
                self._ready = True
                return problems
            self._refused = None
            make_folder(self._q, FOLDER_MODE, self.fs)
            make_folder(self._failed, FOLDER_MODE, self.fs)
            self._migrate(problems)
            self._recover_queue(problems)
        except OSError as exc:
            raise self._broken("recovery", exc) from None
        self._backlog.clear()
        self._listed.clear()
        self._backlog_bytes = 0
        self._not_ready.clear()
        self._ready = True
        return problems

    def _recover_queue(self, problems: list[str]) -> None:
        groups: dict[int, set[str]] = {}
        changed = False
        for name in listdir(self._q):
            match = _RECORD.fullmatch(name)
            if match:
                groups.setdefault(int(match[1]), set()).add(match[2])
            elif name.startswith("."):
                changed = unlink_quietly(self.fs, self._q / name) or changed  # a temporary
            else:
                problems.append(f"unknown file {self._q / name} left alone (applications "
                                f"drop files into out/, never into queue/)")
        for name in listdir(self._failed):
            if name.startswith(".") and name.endswith(".reason.tmp"):
                unlink_quietly(self.fs, self._failed / name)
        self._pending = _Pending()
        for seq in sorted(groups):
            kinds = groups[seq]
            meta = self._read_meta(seq) if "meta" in kinds else None
            if "fail" in kinds:
                rec, _ = read_json(self._rec(seq, "fail"))
                if "data" in kinds:
                    name = str((rec or {}).get("name") or (meta.name if meta else
                                                            self._orphan_name(seq)))
                    reason = str((rec or {}).get("reason") or "failed (reason lost in a crash)")
                    path = place_with_reason(self.fs, self._rec(seq, "data"), self._failed,
                                             name, reason)
                    problems.append(f"seq {seq}: finished moving it to {path}")
                for kind in ("meta", "fail"):
                    unlink_quietly(self.fs, self._rec(seq, kind))
                changed = True
            elif "data" in kinds and meta is not None:
                source = self._out / meta.name
                if same_file(source, meta.path):
                    # a claim by link + unlink (no RENAME_NOREPLACE) cut in between:
                    # finish it, or the out/ name would be claimed a second time
                    self.fs.unlink(source)
                    self.fs.fsync_dir(self._out)
                if meta.ino and os.lstat(meta.path).st_ino != meta.ino:
                    meta = self._rehash(meta)   # cut inside a claim that found a swapped file
                self._pending[seq] = meta
                # A claim cut inside the link+unlink fallback of rename_noreplace leaves
                # the file under both names: drop the out/ one, or it is claimed twice.
                if os.path.lexists(self._out / meta.name) and \
                        same_file(self._out / meta.name, meta.path):
                    self.fs.unlink(self._out / meta.name)
                    problems.append(f"seq {seq}: finished claiming {meta.name!r} (a cut "
                                    f"link+unlink left it in out/ too)")
            elif "data" in kinds:
                name = self._orphan_name(seq)
                reason = f"its claim record {self._rec(seq, 'meta')} is missing or unreadable"
                unlink_quietly(self.fs, self._rec(seq, "meta"))
                path = place_with_reason(self.fs, self._rec(seq, "data"), self._failed,
                                         name, reason)
                problems.append(f"seq {seq}: {reason}: moved to {path}")
                changed = True
            else:
                self.fs.unlink(self._rec(seq, "meta"))  # a cut claim or renumbering
                changed = True
        inodes: dict[tuple[int, int], int] = {}
        for seq in sorted(self._pending, reverse=True):
            st = os.lstat(self._rec(seq, "data"))
            newer = inodes.setdefault((st.st_dev, st.st_ino), seq)
            if newer != seq:
                # a renumbering by link + unlink cut in between: the file is pending
                # under its new seq already (it would otherwise be sent twice)
                self.fs.unlink(self._rec(seq, "data"))
                self.fs.unlink(self._rec(seq, "meta"))
                del self._pending[seq]
                changed = True
        top = max(self._pending, default=0)
        if top >= self.next_seq:
            self.next_seq = top + 1
        if changed:
            self.fs.fsync_dir(self._q)

    def _orphan_name(self, seq: int) -> str:
        """The original name of a queued file whose .meta is lost (kept in an
        extended attribute where the file system has them), else `seq-<N>`."""
        try:
            raw = os.getxattr(self._rec(seq, "data"), _XATTR_NAME, follow_symlinks=False)
            name = raw.decode("utf-8")
            if plain_name_problem(name) is None:
                return name
        except (OSError, UnicodeDecodeError):
            pass
        return f"seq-{seq}"

    def _read_meta(self, seq: int) -> Claimed | None:
        rec, _ = read_json(self._rec(seq, "meta"))
        if rec is None or rec.get("seq") != seq or not is_int(rec.get("size")) \
                or not is_sha256(rec.get("sha256")) or not isinstance(rec.get("name"), str) \
                or plain_name_problem(rec["name"]):
            return None
        at = rec.get("claimed_at")
        ino, mtime = rec.get("ino", 0), rec.get("mtime_ns", 0)
        return Claimed(self.channel, seq, rec["name"], rec["size"], rec["sha256"],
                       self._rec(seq, "data"), float(at) if isinstance(at, (int, float)) else 0.0,
                       ino if is_int(ino) else 0, mtime if is_int(mtime) else 0)

    def _meta_bytes(self, item: Claimed, **extra: Any) -> bytes:
        return dump_json({"seq": item.seq, "name": item.name, "size": item.size,
                          "sha256": item.sha256, "claimed_at": item.claimed_at,
                          "ino": item.ino, "mtime_ns": item.mtime_ns, **extra})

    def _migrate(self, problems: list[str]) -> None:
        """Move revision 1 claims (`<state>/peers/<peer>/out/<ch>/`) into queue/."""
        old = self.layout.legacy_claimed_dir(self.channel)
        if not os.path.isdir(old) or os.path.islink(old):
            return
        legacy_state = self.layout.legacy_state_file_out(self.channel)
        rec, _ = read_json(legacy_state)
        last_done = int(rec["last_done"]) if rec and is_int(rec.get("last_done")) else 0
        seqs: dict[int, set[str]] = {}
        for name in listdir(old):
            match = re.fullmatch(r"(\d{1,20})\.(meta|data|fail)", name)
            if match:
                seqs.setdefault(int(match[1]), set()).add(match[2])
        top = max(self._pending_seqs_on_disk(), default=0)
        self.next_seq = max(self.next_seq, last_done + 1, top + 1)
        moved: dict[int, int] = {}      # revision 1 seq -> queue seq, of a cut migration
        for name in listdir(self._q):
            match = _RECORD.fullmatch(name)
            if match and match[2] == "meta":
                rec, _ = read_json(self._q / name)
                if rec is not None and is_int(rec.get("migrated_from"), 1):
                    moved[int(rec["migrated_from"])] = int(match[1])
        for seq in sorted(seqs):
            kinds = seqs[seq]
            src_data, src_meta = old / f"{seq:012d}.data", old / f"{seq:012d}.meta"
            if "data" not in kinds:
                continue
            if seq in moved:            # a migration cut after its claim record
                if os.path.lexists(self._rec(moved[seq], "data")):
                    self.fs.unlink(src_data)    # copied (or linked) already
                else:
                    self._move_across(src_data, self._rec(moved[seq], "data"))
                continue
            meta, _ = read_json(src_meta)
            name = str((meta or {}).get("name") or f"seq-{seq}")
            if plain_name_problem(name):
                name = f"seq-{seq}"
            if "fail" in kinds or seq <= last_done or meta is None:
                if seq <= last_done and "fail" not in kinds:
                    self.fs.unlink(src_data)        # acknowledged under revision 1
                    continue
                place_with_reason(self.fs, src_data, self._failed, name,
                                  "claim record missing or failed before the upgrade")
                continue
            new = self.next_seq
            self.next_seq += 1
            item = Claimed(self.channel, new, name, int(meta.get("size", 0)),
                           str(meta.get("sha256", "")), self._rec(new, "data"), time.time())
            write_atomic(self.fs, self._rec(new, "meta"),
                         self._meta_bytes(item, migrated_from=seq))
            self._move_across(src_data, item.path)
            problems.append(f"migrated claimed file {name!r} (seq {seq}) into {self._q} as "
                            f"seq {new}")
        shutil.rmtree(old, ignore_errors=True)
        for leftover in (legacy_state,):
            unlink_quietly(self.fs, leftover)
        self._save_state()

    def _pending_seqs_on_disk(self) -> list[int]:
        return [int(m[1]) for m in map(_RECORD.fullmatch, listdir(self._q)) if m]

    def _move_across(self, src: Path, dst: Path) -> None:
        """rename, or (state dir on another mount) copy + fsync + unlink."""
        try:
            self.fs.rename_noreplace(src, dst)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        tmp = dst.with_name(f".{dst.name}.tmp")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, READ_SIZE)
            fout.flush()
            os.fsync(fout.fileno())
        self.fs.rename(tmp, dst)
        self.fs.fsync_dir(dst.parent)
        self.fs.unlink(src)

    # -- pick-up, step 1: examine (reads only; no lock needed) --------------
    def _list_out(self) -> list[str]:
        found: list[tuple[int, str]] = []
        sizes: dict[str, int] = {}
        self._sizes_seen = sizes
        try:
            with os.scandir(self._out) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            continue        # sub-folders are ignored (CONTRACT §3)
                        st = entry.stat(follow_symlinks=False)
                        found.append((st.st_ctime_ns, entry.name))
                        sizes[entry.name] = st.st_size
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            return []
        return [name for _, name in sorted(found)]

    def queue_stats(self) -> tuple[int, int, float | None, int, int]:
        """(queued count, queued bytes, oldest claim time, waiting count, waiting bytes)
        in O(1): `waiting` is the pick-up backlog as last listed (out/ is listed
        again on every inotify wake-up and rescan), not a fresh scan of out/."""
        return (len(self._pending), self._pending.bytes, self._pending.oldest(),
                len(self._backlog), self._backlog_bytes)

    def _backlog_add(self, names: list[str] | deque[str], front: bool = False) -> None:
        for name in names:
            self._backlog_bytes += self._listed.get(name, 0)
        if front:
            self._backlog.extendleft(reversed(names))
        else:
            self._backlog.extend(names)

    def waiting(self) -> tuple[int, int]:
        """(count, bytes) of files in out/<ch>/ not yet claimed (one scandir)."""
        count = total = 0
        try:
            with os.scandir(self._out) as it:
                for entry in it:
                    try:
                        if not entry.name.startswith(".") and entry.is_file(
                                follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                            count += 1
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            pass
        return count, total

    def waiting_files(self, limit: int = 100_000) -> list[tuple[str, int, float]]:
        """(name, size, ctime) of files in out/<ch>/ not yet claimed, arrival order."""
        found: list[tuple[float, str, int]] = []
        try:
            with os.scandir(self._out) as it:
                for entry in it:
                    try:
                        if not entry.name.startswith(".") and entry.is_file(
                                follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            found.append((st.st_ctime, entry.name, st.st_size))
                    except FileNotFoundError:
                        continue
                    if len(found) >= limit:
                        break
        except FileNotFoundError:
            pass
        return [(name, size, ctime) for ctime, name, size in sorted(found)]

    def examine(self, peer_max: int | None = None, limit: int = CLAIM_BATCH,
                max_bytes: int = CLAIM_BYTES, relist: bool = False) -> Examined:
        """Find and hash up to `limit` complete files of out/<ch>/ (see the module
        docstring). Files that can never be sent go to failed/ here. ResourceBusy
        when descriptors or memory run out (nothing is failed for that)."""
        self._require()
        if self._refused is not None:
            return Examined([], [])             # recover() looks again (usable is False)
        self._check(self._out, self._q, self._failed)
        now = time.monotonic()
        if relist or not self._backlog:
            queued = set(self._backlog)
            new = [n for n in self._list_out() if n not in queued]
            for n in new:
                self._listed[n] = self._sizes_seen.get(n, 0)
            self._backlog_add(new)
        result = Examined([], [])
        hashed = 0
        skipped: list[str] = []
        while self._backlog and len(result.ready) < limit and hashed < max_bytes:
            name = self._backlog.popleft()
            self._backlog_bytes -= self._listed.get(name, 0)
            again = self._not_ready.get(name)
            if again is not None and again > now:
                skipped.append(name)
                continue
            try:
                got = self._examine_one(name, peer_max, result.failed)
            except OSError as exc:
                self._backlog_add([name], front=True)
                self._backlog_add(skipped, front=True)
                skipped = []
                if is_resource_error(exc):
                    raise ResourceBusy(f"picking up {name!r} on {self.layout.peer}/"
                                       f"{self.channel}: {exc.strerror}: will retry") from None
                raise SpoolError(f"cannot pick up {self._out / name}: {exc.strerror}") from None
            if isinstance(got, Candidate):
                self._not_ready.pop(name, None)
                self._listed.pop(name, None)
                result.ready.append(got)
                hashed += got.size
            elif isinstance(got, float):
                self._not_ready[name] = now + got
                skipped.append(name)
            else:
                self._not_ready.pop(name, None)
                self._listed.pop(name, None)
        # files not ready yet stay in the backlog, at its front (they arrived first)
        self._backlog_add(skipped, front=True)
        waits = [t - now for t in self._not_ready.values()]
        result.retry_after = max(0.05, min(waits)) if waits else None
        result.more = len(self._backlog) > len(skipped)
        if len(self._not_ready) > 4 * len(self._backlog) + 64:      # forget vanished names
            keep = set(self._backlog)
            self._not_ready = {n: t for n, t in self._not_ready.items() if n in keep}
        return result

    def _examine_one(self, name: str, peer_max: int | None,
                     failed: list[FailedFile]) -> Candidate | float | None:
        """A Candidate; a float: not ready, look again in that many seconds; None:
        gone, or moved to failed/."""
        path = self._out / name
        problem = plain_name_problem(name)
        if problem:
            failed.append(self._fail_unclaimed(name, None, f"file name {problem}"))
            return None
        try:
            st = os.lstat(path)
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            raise
        if stat.S_ISDIR(st.st_mode):
            return None
        if stat.S_ISLNK(st.st_mode):
            failed.append(self._fail_unclaimed(
                name, None, "is a symbolic link: linkd never follows links in the spool; "
                "copy the file into out/ instead"))
            return None
        if not stat.S_ISREG(st.st_mode):
            failed.append(self._fail_unclaimed(name, None, "is not a regular file"))
            return None
        try:
            fd = self.fs.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in _GONE or exc.errno in (errno.ELOOP, errno.ENXIO):
                return None             # gone, or swapped for a link or FIFO: next scan
            if exc.errno in (errno.EACCES, errno.EPERM):
                failed.append(self._fail_unclaimed(name, None, f"cannot read it: "
                                                   f"{exc.strerror}: check its permissions"))
                return None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None             # swapped meanwhile: look again at the next scan
            leased = self._lease(fd)
            if leased is None:
                return 0.2              # someone has it open for writing (a cp running)
            if not leased:
                settled = time.time() - max(st.st_mtime, st.st_ctime)
                if settled < SETTLE:
                    return SETTLE - settled + 0.01
            problem = self._size_problem(st.st_size, peer_max)
            if problem is not None:
                os.close(fd)
                fd = -1
                failed.append(self._fail_unclaimed(name, st.st_size, problem))
                return None
            digest, size = hashlib.sha256(), 0
            while chunk := self.fs.read(fd, READ_SIZE):
                digest.update(chunk)
                size += len(chunk)
            if leased and fcntl.fcntl(fd, _F_GETLEASE) != fcntl.F_RDLCK:
                return 0.2              # a writer opened it while we hashed
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (size, st.st_mtime_ns):
                return 0.2              # written while we hashed (no lease here)
            problem = self._size_problem(size, peer_max)
            if problem is not None:
                os.close(fd)
                fd = -1
                failed.append(self._fail_unclaimed(name, size, problem))
                return None
            return Candidate(name, size, digest.hexdigest(), st.st_ino, st.st_mtime_ns)
        except OSError as exc:
            if is_resource_error(exc):
                raise
            if fd >= 0:
                os.close(fd)
                fd = -1
            failed.append(self._fail_unclaimed(name, None, f"cannot read it: "
                                               f"{exc.strerror or exc}"))
            return None
        finally:
            if fd >= 0:
                os.close(fd)            # closing drops the lease

    @staticmethod
    def _lease(fd: int) -> bool | None:
        """Take a read lease: True; None if a writer holds the file open; False if
        no lease can be had here (not the owner without CAP_LEASE, or no support)."""
        try:
            # A lease break would signal us with SIGIO, whose default is to end the
            # process: route it to SIGURG, which is ignored by default.
            fcntl.fcntl(fd, _F_SETSIG, int(signal.SIGURG))
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
            return True
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOSYS,
                             errno.ENOTSUP):
                return False
            raise

    def _size_problem(self, size: int, peer_max: int | None) -> str | None:
        if size > self.max_bytes:
            return f"{size} bytes is over this channel's max_message_bytes ({self.max_bytes})"
        if peer_max is not None and size > peer_max:
            return f"{size} bytes is over the peer's max_message_bytes ({peer_max})"
        return None

    def _fail_unclaimed(self, name: str, size: int | None, reason: str) -> FailedFile:
        try:
            path = place_with_reason(self.fs, self._out / name, self._failed, name, reason)
            self.fs.fsync_dir(self._out)
        except FileNotFoundError:
            if os.path.lexists(self._out / name):
                raise SpoolError(f"cannot move {self._out / name} to {self._failed}: "
                                 f"is the folder missing?") from None
            path = self._failed / name   # vanished meanwhile: nothing to keep
        except OSError as exc:
            if is_resource_error(exc):
                raise
            raise SpoolError(f"cannot move {self._out / name} to {self._failed}: "
                             f"{exc.strerror}") from None
        return FailedFile(self.channel, name, size, reason, None, path)

    # -- pick-up, step 2: claim (changes state; under the channel's lock) ----
    def claim(self, ready: list[Candidate]) -> tuple[list[Claimed], list[FailedFile]]:
        """Claim examined files in order (see the module docstring)."""
        self._require()
        done: list[Claimed] = []
        failed: list[FailedFile] = []
        if not ready:
            return done, failed
        self._check(self._out, self._q)
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
                write_new(self.fs, self._rec(item.seq, "meta"), self._meta_bytes(item),
                          sync=not share)
            if share:
                self.fs.syncfs(self._q)
            self.fs.fsync_dir(self._q)
            for item in items:
                src = self._out / item.name
                try:
                    self.fs.rename_noreplace(src, item.path)
                except FileNotFoundError:
                    unlink_quietly(self.fs, self._rec(item.seq, "meta"))
                    continue        # vanished since examine(): nothing to send
                st = os.lstat(item.path)
                if not stat.S_ISREG(st.st_mode):
                    failed.append(self._fail_claimed(item, "is not a regular file"))
                    continue
                # only now: setting an xattr changes the ctime, which is the file's
                # place in the arrival order while it is still in out/
                set_name_xattr(item.path, item.name)
                if (st.st_ino, st.st_size, st.st_mtime_ns) != (item.ino, item.size,
                                                                item.mtime_ns):
                    item = self._rehash(item)  # replaced or written since examine()
                done.append(item)
            self.next_seq = max(self.next_seq, items[-1].seq + 1)
            self.fs.fsync_dir(self._q)
            self.fs.fsync_dir(self._out)
        except OSError as exc:
            raise self._broken("claiming", exc) from None
        for item in done:
            self._pending[item.seq] = item
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

    def _rehash(self, item: Claimed) -> Claimed:
        fd = self.fs.open(item.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileChanged("not a regular file")
            digest, size = hashlib.sha256(), 0
            while chunk := self.fs.read(fd, READ_SIZE):
                digest.update(chunk)
                size += len(chunk)
        finally:
            self.fs.close(fd)
        new = replace(item, size=size, sha256=digest.hexdigest(), ino=st.st_ino,
                      mtime_ns=st.st_mtime_ns)
        write_atomic(self.fs, self._rec(item.seq, "meta"), self._meta_bytes(new))
        return new

    # -- resolution --------------------------------------------------------
    def resolve(self, seqs: list[int]) -> list[Resolved]:
        """The peer acknowledged these seqs with matching content (the caller
        checked): remove (or archive) them. Unknown seqs are ignored."""
        self._require()
        items = [self._pending[s] for s in sorted(set(seqs)) if s in self._pending]
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
            for item in items:
                changed = self.changed(item)
                self._dispose(item)
                unlink_quietly(self.fs, self._rec(item.seq, "meta"))
                del self._pending[item.seq]
                done.append(Resolved(item, changed))
            self.fs.fsync_dir(self._q)
        except OSError as exc:
            raise self._broken("removing acknowledged files", exc) from None
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
        if self._pending.get(item.seq) is None:
            raise SpoolError(f"seq {item.seq} is not pending on {self.layout.peer}/"
                             f"{self.channel}")
        self._check(self._q, self._failed)
        try:
            return self._fail_claimed(item, reason)
        except OSError as exc:
            raise self._broken(f"failing seq {item.seq}", exc) from None

    def _fail_claimed(self, item: Claimed, reason: str) -> FailedFile:
        if item.seq >= self._saved_next:
            # the queue alone would let a restart hand this seq (logged as failed)
            # to another file: record that it is used
            self.next_seq = max(self.next_seq, item.seq + 1)
            self._save_state()
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
        self._pending.pop(item.seq, None)
        return FailedFile(self.channel, item.name, item.size, reason, item.seq, path)

    def renumber(self, item: Claimed, above: int) -> Claimed:
        """Give a pending item a new seq above both `above` and every number used,
        durably (the peer holds other content, or cannot say, under its old one)."""
        return self._renumber_to(item, max(self.next_seq, min(above, MAX_SEQ - 1) + 1))

    def renumber_tail(self, first: int, above: int) -> list[tuple[Claimed, Claimed]]:
        """Renumber every pending item from seq `first` on, keeping their order, to
        base+1, base+2, ... where base is above `above` and every number used:
        (old, new) pairs in seq order. The items move last-first, each to its exact
        target, so a crash between two moves leaves the queue in pick-up order
        (the moved tail above the unmoved head); the next session moves the rest."""
        self._require()
        items = [self._pending[s] for s in sorted(self._pending) if s >= first]
        base = max(self.next_seq - 1, min(above, MAX_SEQ - len(items) - 1))
        moved = []
        for i in range(len(items) - 1, -1, -1):
            moved.append((items[i], self._renumber_to(items[i], base + 1 + i)))
        return moved[::-1]

    def _renumber_to(self, item: Claimed, new_seq: int) -> Claimed:
        self._require()
        if self._pending.get(item.seq) is None:
            raise SpoolError(f"seq {item.seq} is not pending on {self.layout.peer}/"
                             f"{self.channel}")
        if new_seq in self._pending or new_seq > MAX_SEQ:
            raise SpoolError(f"cannot renumber seq {item.seq} to {new_seq} on "
                             f"{self.layout.peer}/{self.channel}")
        new = replace(item, seq=new_seq, path=self._rec(new_seq, "data"))
        self._check(self._q)
        try:
            write_new(self.fs, self._rec(new_seq, "meta"),
                      self._meta_bytes(new, renumbered_from=item.seq))
            self.fs.fsync_dir(self._q)
            self.fs.rename_noreplace(item.path, new.path)
            unlink_quietly(self.fs, self._rec(item.seq, "meta"))
            self.next_seq = max(self.next_seq, new_seq + 1)
            self._save_state()
        except OSError as exc:
            raise self._broken(f"renumbering seq {item.seq}", exc) from None
        self._pending[new_seq] = new        # before the old one goes: never seen missing
        del self._pending[item.seq]
        return new


def write_new(fs: FS, path: Path, data: bytes, sync: bool = True) -> None:
    """Write a new record file and fsync it (its folder is fsync'd by the caller;
    sync=False: the caller syncs the file system before relying on it)."""
    fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
    try:
        fs.write(fd, data)
        if sync:
            fs.fsync(fd)
    finally:
        fs.close(fd)


def set_name_xattr(path: Path, name: str) -> None:
    """Keep the original name on the file itself, where the file system allows
    (it names the file in failed/ if its .meta is ever lost)."""
    try:
        os.setxattr(path, _XATTR_NAME, name.encode("utf-8"), follow_symlinks=False)
    except OSError:
        pass


def describe_queue_record(path: Path) -> dict[str, Any] | None:
    """A queue .meta as a dict (for `linkctl queue` when no daemon runs)."""
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None
