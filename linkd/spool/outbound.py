"""Outbound: claim dropped files under sequence numbers, then ack or fail them.

Theory of operation
-------------------
Per channel, in `claimed_dir` (state dir, same mount as the spool), a claimed
message is `<seq>.meta` (JSON: seq, name, size, sha256, claimed_at) plus
`<seq>.data` (the file itself, renamed out of out/<ch>/). `<ch>.json` holds
`last_done`: every seq <= last_done is resolved (acknowledged or failed) and
every unresolved seq is > last_done. `<seq>.fail` marks a seq being failed.
Invariant: a seq is *pending* iff .meta and .data exist, there is no .fail and
seq > last_done. The next seq is max(every seq with a record, last_done) + 1.

Claim (a batch): hash each file (open O_NOFOLLOW, fstat, 1 MiB reads); write
and fsync every .meta; fsync claimed_dir; rename each file to <seq>.data;
fsync claimed_dir and out/<ch>/. Crash points:
  C1 during/after .meta writes, before a rename: .meta without .data; recovery
     deletes it (the file is still in out/), so the number is reused, never
     skipped, and was never sent (only .data is ever sent);
  C2 after some renames: those are pending, the rest are C1;
  C3 before the final folder fsyncs: a crash loses nothing (renames are atomic);
     on power loss a rename may be undone, which is C1 again.
  A .meta-only seq *below* a seq that has .data cannot come from a crash (renames
  go in seq order); if seen it is treated as resolved (a skipped number), the
  file -- if still in out/ -- is simply claimed again.
Ack up to N: write last_done=N durably FIRST, then delete (or archive to
sent/, never overwriting) each .data <= N and its .meta; fsync the folders.
  A1 before last_done is renamed in: nothing happened; the peer acks again or the
     file is resent, and the receiver drops it as a duplicate (seq <= committed);
  A2 after: recovery finishes the deletes/archives of every record <= last_done;
     an archive cut inside the link+unlink fallback is detected (same inode).
Fail (seq k, a reason): write `<k>.fail` (tmp+fsync+rename+fsync dir), move
.data to failed/<ch>/ beside a one-line .reason (files.place_with_reason),
then, if no pending seq is below k, advance last_done past it.
  F1 before the .fail exists: k is still pending; F2 after: recovery finishes
     the move (reason from the .fail record), k stays a resolved "tombstone"
     (.meta/.fail kept, so k is never reused) until last_done passes it.
A .data without a readable .meta is failed the same way at recovery (reason:
its claim record is missing), never blocking start-up. Dot-files in
claimed_dir are temporaries of atomic writes: deleted at recovery.

Any OSError in a step marks the object dirty: scan/ack/fail raise SpoolError
until recover() has rebuilt the in-memory view from disk.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import SpoolError
from .files import (
    dump_json,
    place_noreplace,
    place_with_reason,
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
from .recovery import recover_outbound

READ_SIZE = 1 << 20
CLAIM_BATCH = 256
_SKIP_ERRNOS = {errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.ENOTDIR}


@dataclass(frozen=True)
class Claimed:
    channel: str
    seq: int
    name: str
    size: int
    sha256: str
    path: Path
    claimed_at: float


@dataclass(frozen=True)
class FailedFile:
    channel: str
    name: str
    size: int | None
    reason: str
    seq: int | None
    path: Path  # where it now lies in failed/ (for a vanished file: its .reason)


class Outbound:
    """One peer's outbound channel (see the module docstring)."""

    def __init__(self, layout: SpoolLayout, channel: str, max_bytes: int, archive_sent: bool,
                 fs: FS | None = None) -> None:
        self.layout, self.channel = layout, check_channel(channel)
        self.max_bytes, self.archive_sent = max_bytes, archive_sent
        self.fs = fs or DEFAULT_FS
        self._out, self._claimed = layout.out_dir(channel), layout.claimed_dir(channel)
        self._failed, self._state = layout.failed_dir(channel), layout.state_file_out(channel)
        self.last_done = 0
        self._high = 0                          # highest seq with a record (or last_done)
        self._pending: dict[int, Claimed] = {}
        self._tombstones: set[int] = set()      # resolved seqs > last_done, records kept
        self._ready = False

    # -- paths and small helpers -----------------------------------------
    def _rec(self, seq: int, kind: str) -> Path:
        return self._claimed / f"{seq:012d}.{kind}"

    def _require(self) -> None:
        if not self._ready:
            raise SpoolError(f"outbound {self.layout.peer}/{self.channel} needs recover() "
                             f"(not yet run, or a disk operation failed)")

    def _broken(self, what: str, exc: OSError) -> SpoolError:
        self._ready = False
        return SpoolError(f"{what} on {self.layout.peer}/{self.channel} failed: "
                          f"{exc.strerror or exc} ({exc.filename})")

    def pending(self) -> list[Claimed]:
        """Claimed, unresolved items in seq order. Like `next_pending`, `waiting` and
        `last_done`, safe to call while another thread runs scan/ack/fail."""
        snapshot = self._pending.copy()          # one C-level copy: atomic under the GIL
        return [snapshot[s] for s in sorted(snapshot)]

    def next_pending(self, from_seq: int) -> Claimed | None:
        """The claimed item with the smallest seq >= from_seq (the sender's hot path:
        O(1) in the usual contiguous case, no sort)."""
        item = self._pending.get(from_seq)
        if item is not None or not self._pending or from_seq > self._high:
            return item
        return min((i for s, i in self._pending.copy().items() if s >= from_seq),
                   key=lambda i: i.seq, default=None)

    def open(self, item: Claimed) -> BinaryIO:
        fd = self.fs.open(item.path, os.O_RDONLY | os.O_NOFOLLOW)
        return os.fdopen(fd, "rb")

    @property
    def usable(self) -> bool:
        """False after an I/O error until recover() has run again."""
        return self._ready

    # -- recovery ----------------------------------------------------------
    def recover(self) -> list[str]:
        """Rebuild the view from disk, finishing whatever a crash cut short."""
        self._ready = False
        problems: list[str] = []
        try:
            make_folder(self._claimed, STATE_MODE, self.fs)
            make_folder(self._failed, FOLDER_MODE, self.fs)
            recover_outbound(self, problems)
        except OSError as exc:
            raise self._broken("recovery", exc) from None
        self._ready = True
        return problems

    # -- pick-up -----------------------------------------------------------
    def _candidates(self) -> list[str]:
        found: list[tuple[int, str]] = []
        try:
            with os.scandir(self._out) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_file(follow_symlinks=False):
                            found.append((entry.stat(follow_symlinks=False).st_mtime_ns,
                                          entry.name))
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            return []
        return [name for _, name in sorted(found)]

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

    def scan(self, peer_max: int | None = None,
             limit: int | None = None) -> tuple[list[Claimed], list[FailedFile]]:
        """Claim every eligible file in out/<ch>/ in pick-up order (mtime, name);
        files that cannot be sent go straight to failed/. `limit` caps the claims."""
        self._require()
        claimed: list[Claimed] = []
        failed: list[FailedFile] = []
        names = deque(self._candidates())
        while names and (limit is None or len(claimed) < limit):
            room = CLAIM_BATCH if limit is None else min(CLAIM_BATCH, limit - len(claimed))
            batch: list[tuple[str, int, int, str, int]] = []
            try:
                while names and len(batch) < room:
                    name = names.popleft()
                    got = self._hash(name, peer_max, failed)
                    if got is not None:
                        batch.append(got)
                claimed += self._claim(batch)
            except OSError as exc:
                raise self._broken("claiming", exc) from None
            finally:
                for _, fd, *_rest in batch:
                    self.fs.close(fd)
        return claimed, failed

    def _hash(self, name: str, peer_max: int | None,
              failed: list[FailedFile]) -> tuple[str, int, int, str, int] | None:
        """Open and hash one candidate: (name, fd, size, sha256, inode), or None
        when it vanished, is not a regular file, or was moved to failed/."""
        path = self._out / name
        problem = plain_name_problem(name)
        if problem:
            failed.append(self._fail_unclaimed(name, None, f"file name {problem}"))
            return None
        try:
            fd = self.fs.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in _SKIP_ERRNOS:
                return None
            failed.append(self._fail_unclaimed(name, None, f"cannot read it: {exc.strerror}"))
            return None
        size = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.fs.close(fd)
                return None
            size = st.st_size
            problem = self._size_problem(size, peer_max)
            if problem is None:
                digest, size = hashlib.sha256(), 0
                while chunk := self.fs.read(fd, READ_SIZE):
                    digest.update(chunk)
                    size += len(chunk)
                problem = self._size_problem(size, peer_max)
                if problem is None:
                    return name, fd, size, digest.hexdigest(), st.st_ino
        except OSError as exc:
            problem = f"cannot read it: {exc.strerror}"
        self.fs.close(fd)
        failed.append(self._fail_unclaimed(name, size, problem))
        return None

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
            raise SpoolError(f"cannot move {self._out / name} to {self._failed}: "
                             f"{exc.strerror}") from None
        return FailedFile(self.channel, name, size, reason, None, path)

    def _claim(self, batch: list[tuple[str, int, int, str, int]]) -> list[Claimed]:
        done: list[Claimed] = []
        while batch:
            now = time.time()
            items = [Claimed(self.channel, self._high + 1 + i, name, size, sha,
                             self._rec(self._high + 1 + i, "data"), now)
                     for i, (name, _fd, size, sha, _ino) in enumerate(batch)]
            for item in items:
                fd = self.fs.open(self._rec(item.seq, "meta"),
                                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
                try:
                    self.fs.write(fd, dump_json({"seq": item.seq, "name": item.name,
                                                 "size": item.size, "sha256": item.sha256,
                                                 "claimed_at": item.claimed_at}))
                    self.fs.fsync(fd)
                finally:
                    self.fs.close(fd)
            self.fs.fsync_dir(self._claimed)
            rest: list[tuple[str, int, int, str, int]] = []
            for i, item in enumerate(items):
                try:
                    self.fs.rename(self._out / item.name, item.path)
                except FileNotFoundError:
                    # Vanished from out/ since we hashed it: drop this and later claims
                    # (their .meta only), and number the rest again: no seq is skipped.
                    for later in items[i:]:
                        self.fs.unlink(self._rec(later.seq, "meta"))
                    rest = batch[i + 1:]
                    break
                if os.lstat(item.path).st_ino != batch[i][4]:
                    item = self._rehash(item)    # replaced under the same name meanwhile
                done.append(item)
                self._high = item.seq
            batch = rest
        self.fs.fsync_dir(self._claimed)
        self.fs.fsync_dir(self._out)
        for item in done:
            self._pending[item.seq] = item
        return done

    def _rehash(self, item: Claimed) -> Claimed:
        digest, size = hashlib.sha256(), 0
        with self.open(item) as f:
            while chunk := f.read(READ_SIZE):
                digest.update(chunk)
                size += len(chunk)
        new = Claimed(item.channel, item.seq, item.name, size, digest.hexdigest(), item.path,
                      item.claimed_at)
        write_atomic(self.fs, self._rec(item.seq, "meta"),
                     dump_json({"seq": new.seq, "name": new.name, "size": new.size,
                                "sha256": new.sha256, "claimed_at": new.claimed_at}))
        return new

    # -- resolution --------------------------------------------------------
    def _advance(self, upto: int) -> None:
        """Raise last_done to cover `upto` and every resolved seq below the first
        pending one, durably; then drop the records it now covers."""
        target = min(self._pending) - 1 if self._pending else self._high
        target = max(target, upto)
        if target > self.last_done:
            write_atomic(self.fs, self._state, dump_json({"last_done": target}))
            self.last_done = target
            self._high = max(self._high, target)
        covered = sorted(s for s in self._tombstones if s <= self.last_done)
        for seq in covered:
            for kind in ("meta", "fail"):
                unlink_quietly(self.fs, self._rec(seq, kind))
            self._tombstones.discard(seq)
        if covered:
            self.fs.fsync_dir(self._claimed)

    def _dispose(self, seq: int, name: str) -> None:
        data = self._rec(seq, "data")
        if self.archive_sent:
            sent = self.layout.sent_dir(self.channel)
            make_folder(sent, FOLDER_MODE, self.fs)
            place_noreplace(self.fs, data, sent, name)
            self.fs.fsync_dir(sent)
        else:
            self.fs.unlink(data)

    def ack(self, upto: int) -> list[Claimed]:
        """The peer has everything <= upto durably: resolve those, in seq order.
        (Also call it with the peer's committed seq at each session start: that
        repairs a last_done lost with a corrupt state file.)"""
        self._require()
        if upto <= self.last_done:
            return []
        done = [self._pending.pop(s) for s in sorted(self._pending) if s <= upto]
        try:
            self._advance(upto)                  # last_done is durable BEFORE any removal
        except OSError as exc:
            raise self._broken("recording an acknowledgement", exc) from None
        try:
            for item in done:
                self._dispose(item.seq, item.name)
                self.fs.unlink(self._rec(item.seq, "meta"))
            self.fs.fsync_dir(self._claimed)
        except OSError as exc:
            raise self._broken("removing acknowledged files", exc) from None
        return done

    def fail(self, item: Claimed, reason: str) -> FailedFile:
        """Move a claimed file to failed/<ch>/ with a one-line reason."""
        self._require()
        if self._pending.get(item.seq) is None:
            raise SpoolError(f"seq {item.seq} is not pending on {self.layout.peer}/"
                             f"{self.channel}")
        try:
            write_atomic(self.fs, self._rec(item.seq, "fail"),
                         dump_json({"seq": item.seq, "name": item.name, "reason": reason}))
            if os.path.lexists(item.path):
                path = place_with_reason(self.fs, item.path, self._failed, item.name, reason)
                self.fs.fsync_dir(self._claimed)
            else:
                path = write_reason_only(self.fs, self._failed, item.name,
                                         f"{reason} (its claimed copy had vanished)")
            del self._pending[item.seq]
            self._tombstones.add(item.seq)
            self._advance(0)
        except OSError as exc:
            raise self._broken(f"failing seq {item.seq}", exc) from None
        return FailedFile(self.channel, item.name, item.size, reason, item.seq, path)
