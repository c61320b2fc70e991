"""Inbound: receive into a partial, checkpoint it, group-commit into in/<ch>/.

Theory of operation
-------------------
Per channel the state file `<state>/peers/<peer>/channels/<ch>/in.json` holds
`committed` (every seq <= it is durably in in/<ch>/: a frame at or below it is
a duplicate, acked again and not written), `intent` (a commit in progress)
and `partial` (the checkpoint {seq, name, size, sha256, offset} of the one
transfer that can be resumed). It is only ever replaced atomically (tmp +
fsync + rename + fsync folder), so it is always the old or the new version.
In memory `committed` only moves once the new value is durable.

Receive: begin() opens `tmp/<ch>.<seq>.part` (never in in/); write() appends
and, every `checkpoint_bytes`, fsyncs it and records the checkpoint; abort()
does the same for whatever was written. Crash points:
  R1 between checkpoints: recovery truncates the partial to the recorded offset
     (bytes past it were never promised), so a resume continues from there;
  R2 a partial with no checkpoint (or a checkpoint at or below committed, or a
     file shorter than its checkpoint) is deleted: the sender sends it again.
finish() checks size and SHA-256 (a resumed prefix is re-hashed from disk at
begin); a mismatch moves the partial to quarantine/ with a .reason.

Group commit of finished messages (one channel, seq order):
  1. chmod each partial to file_mode and fsync it (or chmod all + one syncfs
     when the batch is large): data and mode durable;
  2. pick each final name (sender's name, else name~N, smallest free N >= 1);
  3. fsync tmp/ (the partials' names are durable), then write
     intent = [(seq, partial, final, sent_name, size, sha256)] durably;
  4. rename each partial into in/<ch>/ (never overwriting); fsync in/<ch>/;
  4b. append each delivery to the journal (records.py) and fsync it;
  4c. the caller's `announce`: the daemon logs message_delivered for each and
     fsyncs the audit log (a delivery's audit line is durable before it counts
     as committed, so a crash can never leave a committed delivery -- acked from
     the journal on resend -- without its line);
  5. write committed = max seq, intent = null durably.
Crash points:
  K1 before 3 is durable: nothing is in in/; partials are strays that recovery
     deletes; nothing was acked, so the sender resends them;
  K2 after 3, during 4: recovery renames every intent partial that still exists
     (rename is atomic: it is either still in tmp/ or already in in/, never
     half) -- choosing the next free name if its name got taken meanwhile, and
     recognising the same inode left by a link+unlink fallback -- fsyncs
     in/<ch>/, journals and records the commit; those are reported in
     `recovered`. An intent entry whose partial is gone *and* whose final name is
     not in in/ is not counted as delivered: committed stops below it, so the
     sender sends it again (a duplicate at worst, never a loss); the partials of
     later entries are then deleted, not delivered, as they will be sent again;
  K3 after 4, before 5 is durable: as K2, every partial is already gone (the
     daemon logs `recovered` deliveries unless the audit log's tail already
     holds their lines, written at 4c before the crash);
  K4 after 5: done; the sender's ack may be lost, the resend is a duplicate.
Any OSError inside begin/write/commit/abort leaves the object "broken": nothing
more is reported committed and begin()/commit() raise SpoolError until
recover() has redone the intent from disk (recover() is cheap; the daemon calls
it at every session start). A corrupt state file is moved aside as
`<name>.corrupt-<time>`; `committed` falls back to the highest seq evidenced
by its text or a leftover temporary (else 0). Risk: messages committed but not
yet acknowledged when the file was damaged can then be delivered twice.

Symlinked folders (safedir.py): begin() checks tmp/ (once per batch of
messages: the caller passes checked=True after the first), finish() quarantine/,
commit() tmp/, in/<ch>/ and the state folder, before writing anything. A spool
folder found to be a link makes recover() load the state but touch no spool
folder and leave the channel *refused*: every begin()/commit() raises
SymlinkedFolder (the session nacks the message as busy, so the sender keeps
it and retries; the other channels go on) until a recover() finds real
folders again. A symlinked state folder makes recover() raise.

Size: over 400 lines on purpose: receive, group commit and recovery act on one
state file with one set of crash points (above); the records it writes are
already in records.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ChecksumMismatch as ChecksumMismatch  # re-exported
from ..errors import InboundRefused as InboundRefused
from ..errors import SpoolError as SpoolError
from ..errors import SymlinkedFolder
from . import direct
from .direct import DirectWriter
from .files import (
    is_int,
    is_sha256,
    listdir,
    pick_free,
    place_noreplace,
    place_with_reason,
    unlink_quietly,
    write_reason_only,
)
from .fs import DEFAULT_FS, FS, fsync_file
from .layout import (
    FOLDER_MODE,
    SpoolLayout,
    check_channel,
    group_folder_mode,
    make_folder,
    plain_name_problem,
    safe_name,
)
from .records import InState, Journal, load_state

SYNCFS_MIN = 8           # batches this large use one syncfs instead of an fsync per file


def _syncfs_reports_errors() -> bool:
    """syncfs(2) returns writeback errors only since Linux 5.8; before that an EIO
    would pass silently, so older kernels fsync each file instead."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


SYNCFS_OK = _syncfs_reports_errors()
READ_SIZE = 1 << 20


@dataclass(frozen=True)
class Completed:
    channel: str
    seq: int
    name: str
    size: int
    sha256: str
    partial: Path


@dataclass(frozen=True)
class Delivered:
    channel: str
    seq: int
    name: str           # as delivered (may carry ~N)
    sent_name: str      # as the sender named it
    size: int
    sha256: str
    path: Path
    delivered_at: float = 0.0

    def journal_entry(self) -> dict[str, object]:
        return {"seq": self.seq, "sha256": self.sha256, "size": self.size,
                "sent_name": self.sent_name, "name": self.name,
                "delivered_at": self.delivered_at}






@dataclass
class _Transfer:
    seq: int
    name: str
    size: int
    sha256: str
    fd: int
    path: Path
    written: int
    durable: int
    digest: Any
    writer: DirectWriter | None = None   # big messages: appended through O_DIRECT

    def close(self, fs: FS) -> None:
        """Release the writer's buffer and descriptor, then the file's (no step)."""
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            fs.close(self.fd)


class Inbound:
    """One peer's inbound channel (see the module docstring)."""

    def __init__(self, layout: SpoolLayout, channel: str, max_bytes: int, file_mode: int,
                 checkpoint_bytes: int = 8 << 20, fs: FS | None = None) -> None:
        self.layout, self.channel = layout, check_channel(channel)
        self.max_bytes, self.file_mode = max_bytes, file_mode
        self.checkpoint_bytes = max(1, checkpoint_bytes)
        self.fs = fs or DEFAULT_FS
        self._in, self._tmp = layout.in_dir(channel), layout.tmp_dir()
        self._st = InState(layout.state_file_in(channel))
        self._journal = Journal(layout.journal_file(channel))
        self._xfer: _Transfer | None = None
        self._finished: dict[int, Completed] = {}
        self._unreported: list[Delivered] = []   # renamed in a commit that then failed
        self._ready = False
        self._refused: str | None = None         # a symlinked spool folder (see the top)
        # deliveries recover() completed and the daemon has not yet taken to log
        # (take_recovered(); recover() runs in worker threads, hence the lock)
        self.recovered: list[Delivered] = []
        self._recovered_lock = threading.Lock()
        self._group: str | None = None          # the spool_group whose gid is _gid
        self._gid: int | None = None

    @property
    def committed(self) -> int:
        return self._st.committed

    def configure(self, max_bytes: int, file_mode: int) -> None:
        """A reload changed the channel's limits: they apply from now on."""
        self.max_bytes, self.file_mode = max_bytes, file_mode

    def lookup(self, seq: int) -> dict[str, object] | None:
        """What we committed under `seq` (from the journal), if we still know."""
        return self._journal.lookup(seq)

    def take_recovered(self) -> list[Delivered]:
        """The deliveries recovery completed since the last call (to be logged once)."""
        with self._recovered_lock:
            done, self.recovered = self.recovered, []
        return done

    def journaled(self) -> list[dict[str, Any]]:
        """The recent committed deliveries the journal holds, oldest first."""
        return [e for e in self._journal.entries() if e["seq"] <= self.committed]

    def _require(self) -> None:
        if self._refused is not None:
            raise SpoolError(self._refused)
        if not self._ready:
            raise SpoolError(f"inbound {self.layout.peer}/{self.channel} needs recover() "
                             f"(not yet run, or a disk operation failed)")

    def _broken(self, what: str, exc: OSError) -> SpoolError:
        self._ready = False
        if self._xfer is not None:
            try:
                self._xfer.close(self.fs)
            except OSError:
                pass
            self._xfer = None
        where = f" ({exc.filename})" if exc.filename is not None else ""
        return SpoolError(f"{what} on {self.layout.peer}/{self.channel} failed: "
                          f"{exc.strerror or exc}{where}")

    def _partial_path(self, seq: int) -> Path:
        return self._tmp / f"{self.channel}.{seq}.part"

    # -- recovery ----------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish or roll back whatever a crash or an I/O error cut short."""
        if self._xfer is not None:
            try:
                self.abort()
            except SpoolError:
                pass  # recovery below truncates to the last durable checkpoint
        self._ready, self._finished = False, {}
        problems: list[str] = []
        folders = (self._in, self._tmp, self.layout.quarantine_dir())
        try:
            self.layout.check(self._st.path.parent)
            make_folder(self._st.path.parent, 0o700, self.fs)
            self._st = load_state(self.fs, self._st.path, self.channel, problems,
                                  self.layout.legacy_state_file_in(self.channel))
            self._journal.load(self.fs, problems)
            try:
                self.layout.check(*folders)
            except SymlinkedFolder as exc:
                if self._refused != str(exc):
                    problems.append(f"inbound {self.layout.peer}/{self.channel} refused: {exc}")
                self._refused = str(exc)
                return problems
            self._refused = None
            for folder in folders:
                make_folder(folder, FOLDER_MODE, self.fs)
            done = self._recover(problems)
            with self._recovered_lock:
                self.recovered = self.recovered + done
        except OSError as exc:
            raise self._broken("recovery", exc) from None
        self._unreported = []
        self._ready = True
        return problems

    def resume_point(self) -> tuple[int, int] | None:
        """(seq, durable offset) of the checkpointed partial, if any."""
        ck = self._st.partial
        if ck is None or ck["seq"] <= self.committed or ck["seq"] in self._finished:
            return None
        return ck["seq"], ck["offset"]

    # -- receiving ---------------------------------------------------------
    def begin(self, seq: int, name: str, size: int, sha256: str, offset: int = 0, *,
              checked: bool = False) -> int:
        """Start (offset 0) or resume (offset = the durable checkpoint) message `seq`;
        returns the offset used. InboundRefused for anything this spool won't take.
        checked=True: the caller's batch already had tmp/ checked by an earlier
        begin() (one folder check per batch of small messages, not one per message)."""
        self._require()
        if self._xfer is not None:
            raise SpoolError(f"seq {self._xfer.seq} is still open: finish() or abort() it")
        if not is_int(seq, 1):
            raise InboundRefused(f"seq {seq!r} is not a positive integer")
        if seq <= self.committed:
            raise InboundRefused(f"seq {seq} is a duplicate (committed is {self.committed})")
        if self._finished and seq <= max(self._finished):
            raise InboundRefused(f"seq {seq} was already received (commit pending)")
        problem = plain_name_problem(name)
        if problem:
            raise InboundRefused(f"file name {name!r} {problem}")
        if not is_int(size) or size > self.max_bytes:
            raise InboundRefused(f"size {size!r} is over max_message_bytes ({self.max_bytes})")
        sha = sha256.lower() if isinstance(sha256, str) else None
        if sha is None or not (sha == "" or is_sha256(sha)):
            raise InboundRefused(f"sha256 {sha256!r} is not 64 hex digits")
        if not is_int(offset) or offset > size:
            raise InboundRefused(f"offset {offset!r} is not within 0..{size}")
        path = self._partial_path(seq)
        ck = self._st.partial
        if not checked:
            self._check(self._tmp)
        try:
            if offset:
                # A SHA-256 not known on one side (a late one: the Sum brings it)
                # matches any: the whole file is still checked before the commit.
                if ck is None or (ck["seq"], ck["name"], ck["size"], ck["offset"]) \
                        != (seq, name, size, offset) \
                        or (sha and ck["sha256"] and ck["sha256"] != sha):
                    durable = ck["offset"] if ck and ck["seq"] == seq else 0
                    raise InboundRefused(f"cannot resume seq {seq} at offset {offset}: the "
                                         f"durable offset is {durable}")
                fd = self.fs.open(path, os.O_RDWR | os.O_NOFOLLOW)
                try:
                    digest = self._rehash(fd, offset)
                except BaseException:
                    self.fs.close(fd)
                    raise
            else:
                if ck is not None and ck["seq"] not in self._finished:
                    # offset 0 discards any older resumable partial of the channel
                    unlink_quietly(self.fs, self._partial_path(ck["seq"]))
                    self._st = self._st.saved(self.fs, partial=None)
                fd = self.fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
                try:
                    self._give_group(fd)
                except BaseException:
                    self.fs.close(fd)
                    raise
                digest = hashlib.sha256()
            writer = None
            if direct.wanted(size - offset):
                try:
                    writer = direct.DirectWriter(self.fs, path, fd, offset)
                except BaseException:
                    self.fs.close(fd)
                    raise
        except OSError as exc:
            raise self._broken(f"starting seq {seq}", exc) from None
        self._xfer = _Transfer(seq, name, size, sha, fd, path, offset, offset, digest, writer)
        return offset

    def _give_group(self, fd: int) -> None:
        """With [node] spool_group, a delivered file belongs to that group (in/ is
        2750 for it, and file_mode gives the group read access): made in tmp/, which
        is ours alone, it had the daemon's own group, and the group's consumers could
        not read it (an operator trial)."""
        group = getattr(self.layout, "spool_group", None)
        if group is None:
            return
        if self._group != group:       # (looked up once: getgrnam reads /etc/group)
            self._group, self._gid = group, group_folder_mode("in", group)[1]
        if self._gid is not None:
            try:
                os.fchown(fd, -1, self._gid)
            except PermissionError:
                raise SpoolError(f"cannot give a delivered file the group {group} "
                                 f"([node].spool_group): the user linkd runs as must be a "
                                 f"member of it (usermod -aG {group} <user>), then restart "
                                 f"linkd") from None

    def _check(self, *folders: Path) -> None:
        """Refuse (SymlinkedFolder, channel refused until recover()) if a folder we are
        about to write into is a symbolic link."""
        try:
            self.layout.check(*folders)
        except SymlinkedFolder as exc:
            self._refused = str(exc)
            raise

    def _rehash(self, fd: int, offset: int) -> Any:
        digest = hashlib.sha256()
        if os.fstat(fd).st_size < offset:
            raise InboundRefused(f"partial file is shorter than its checkpoint ({offset})")
        self.fs.truncate(fd, offset)
        pos = 0
        while pos < offset:
            chunk = os.pread(fd, min(READ_SIZE, offset - pos), pos)
            if not chunk:
                raise OSError(5, "partial file shrank while re-reading it")
            digest.update(chunk)
            pos += len(chunk)
        os.lseek(fd, offset, os.SEEK_SET)
        return digest

    def _transfer(self) -> _Transfer:
        if self._xfer is None:
            raise SpoolError(f"no transfer is open on {self.layout.peer}/{self.channel}")
        return self._xfer

    def write(self, data: bytes | memoryview) -> None:
        x = self._transfer()
        if x.written + len(data) > x.size:
            raise InboundRefused(f"seq {x.seq}: more than the announced {x.size} bytes")
        try:
            if x.writer is not None:
                x.writer.append(data)
            else:
                self.fs.write(x.fd, data)
            x.digest.update(data)
            x.written += len(data)
            if x.written - x.durable >= self.checkpoint_bytes:
                self._checkpoint(x)
        except OSError as exc:
            raise self._broken(f"writing seq {x.seq}", exc) from None

    def _checkpoint(self, x: _Transfer) -> None:
        self._check(self._st.path.parent)
        if x.writer is not None:
            x.writer.settle()
        self.fs.fsync(x.fd)
        self._st = self._st.saved(self.fs, partial={
            "seq": x.seq, "name": x.name, "size": x.size, "sha256": x.sha256,
            "offset": x.written})
        x.durable = x.written

    def finish(self, sha256: str | None = None) -> Completed:
        """All `size` bytes are in: check the SHA-256 (begin()'s, or `sha256` when the
        sender announced it only now, after the data). No fsync (commit does it)."""
        x = self._transfer()
        if x.written != x.size:
            raise InboundRefused(f"seq {x.seq} ended at {x.written} of {x.size} bytes")
        if sha256 is not None:
            x.sha256 = sha256.lower()
        if not is_sha256(x.sha256):
            raise InboundRefused(f"seq {x.seq} is complete, but no SHA-256 was announced")
        if x.writer is not None:
            try:
                x.writer.settle()
            except OSError as exc:
                raise self._broken(f"writing seq {x.seq}", exc) from None
        self._xfer = None
        x.close(self.fs)
        got = x.digest.hexdigest()
        if got != x.sha256:
            reason = f"seq {x.seq}: sha256 is {got}, the sender announced {x.sha256}"
            self._check(self.layout.quarantine_dir(), self._st.path.parent)
            try:
                where = place_with_reason(self.fs, x.path, self.layout.quarantine_dir(),
                                          x.name, reason)
                if self._st.partial is not None and self._st.partial["seq"] == x.seq:
                    self._st = self._st.saved(self.fs, partial=None)
            except OSError as exc:
                raise self._broken(f"quarantining seq {x.seq}", exc) from None
            raise ChecksumMismatch(reason, where)
        done = Completed(self.channel, x.seq, x.name, x.size, x.sha256, x.path)
        self._finished[x.seq] = done
        return done

    def abort(self) -> None:
        """The session ended mid-transfer: make what was written durable and record
        it as the checkpoint, so that the next session can resume from it."""
        x, self._xfer = self._xfer, None
        if x is None:
            return
        try:
            if self._ready and x.written > x.durable:
                self._checkpoint(x)
            elif self._ready and x.written == 0:
                self.fs.unlink(x.path)
        except OSError as exc:
            raise self._broken(f"checkpointing seq {x.seq}", exc) from None
        finally:
            x.close(self.fs)

    # -- commit ------------------------------------------------------------
    def commit(self, batch: list[Completed],
               announce: Callable[[list[Delivered]], None] | None = None) -> list[Delivered]:
        """Make a batch of finished messages visible in in/<ch>/, durably, in seq
        order; returns them as delivered. Raises SpoolError (nothing reported
        committed) on any I/O error; recover() then completes or rolls it back.

        `announce(delivered)` runs once the files are in in/<ch>/ and journaled, and
        before `committed` records them: the caller makes their audit lines durable
        there, so that a delivery at or below `committed` always has its line (a
        crash before `committed` is written leaves the intent, and recovery reports
        the batch again in `recovered`). An OSError from it fails the commit, but the
        files are in in/<ch>/ by then: recover() completes it and reports it."""
        self._require()
        items = sorted(batch, key=lambda c: c.seq)
        for c in items:
            if self._finished.get(c.seq) != c:
                raise SpoolError(f"seq {c.seq} on {self.layout.peer}/{self.channel} is not a "
                                 f"finished, uncommitted message of this object")
        if not items:
            return []
        self._check(self._tmp, self._in, self._st.path.parent)
        try:
            if SYNCFS_OK and len(items) >= SYNCFS_MIN:
                for c in items:
                    self.fs.chmod(c.partial, self.file_mode)
                self.fs.syncfs(self._tmp)
            else:
                for c in items:
                    fsync_file(self.fs, c.partial, self.file_mode)
            taken: set[str] = set()
            plan = []
            for c in items:
                final = pick_free(self._in, c.name, taken)
                taken.add(final)
                plan.append((c, final))
            intent = [[c.seq, c.partial.name, final, c.name, c.size, c.sha256]
                      for c, final in plan]
            self.fs.fsync_dir(self._tmp)
            self._st = self._st.saved(self.fs, intent=intent)
            now = time.time()
            for c, final in plan:
                path = place_noreplace(self.fs, c.partial, self._in, c.name,
                                       taken=taken - {final}, preferred=final)
                self._unreported.append(Delivered(self.channel, c.seq, path.name, c.name,
                                                  c.size, c.sha256, path, now))
            self.fs.fsync_dir(self._in)
            self._journal.append(self.fs, [d.journal_entry() for d in self._unreported])
            if announce is not None:
                announce(list(self._unreported))
            last = items[-1].seq
            ck = self._st.partial
            self._st = self._st.saved(self.fs, committed=last, intent=None,
                                      partial=ck if ck and ck["seq"] > last else None)
        except OSError as exc:
            raise self._broken(f"committing seq {items[0].seq}..{items[-1].seq}", exc) \
                from None
        done, self._unreported = self._unreported, []
        for c in items:
            del self._finished[c.seq]
        return done

    def quarantine(self, name: str, data_path: Path | None, reason: str) -> Path:
        """Keep `data_path` (or, if None, just a reason) in quarantine/ as `name`
        (made plain if it is not), beside a one-line .reason; returns the path."""
        folder = self.layout.quarantine_dir()
        plain = name if isinstance(name, str) and plain_name_problem(name) is None \
            else safe_name(name)
        self._check(folder)
        try:
            make_folder(folder, FOLDER_MODE, self.fs)
            if data_path is None:
                return write_reason_only(self.fs, folder, plain, reason)
            return place_with_reason(self.fs, Path(data_path), folder, plain, reason)
        except OSError as exc:
            raise SpoolError(f"cannot quarantine {plain!r} in {folder}: {exc.strerror}") \
                from None

    def _recover(self, problems: list[str]) -> list[Delivered]:
        """The recovery pass (module docstring); returns completed deliveries."""
        ib = self
        fs, st, in_dir, tmp = ib.fs, ib._st, ib._in, ib._tmp
        unreported = {d.seq: d for d in ib._unreported}
        recovered: list[Delivered] = []
        dirty = bool(unreported)
        lost: list[int] = []
        if st.intent:
            for seq, part, final, sent, size, sha in sorted(st.intent):
                src = tmp / part
                if lost and os.path.lexists(src):
                    # above a lost entry committed stops, so the sender sends this
                    # again: delivering it now would make that a duplicate (the
                    # stray sweep below deletes the partial)
                    continue
                if os.path.lexists(src):
                    fsync_file(fs, src, ib.file_mode)
                    path = place_noreplace(fs, src, in_dir, sent, preferred=final)
                    problems.append(f"seq {seq}: finished delivering it as {path}")
                elif seq in unreported:
                    path = unreported[seq].path
                elif os.path.lexists(in_dir / final):
                    path = in_dir / final
                else:
                    problems.append(f"seq {seq}: its partial vanished and {in_dir / final} is "
                                    f"not there: not counted as delivered (it is sent again)")
                    lost.append(seq)
                    continue
                recovered.append(Delivered(ib.channel, seq, path.name, sent, size, sha, path,
                                           time.time()))
            fs.fsync_dir(in_dir)
            ib._journal.append(fs, [d.journal_entry() for d in recovered])
            top = min(lost) - 1 if lost else max(e[0] for e in st.intent)
            recovered = [d for d in recovered if d.seq <= top]
            st = dataclasses.replace(st, committed=max(st.committed, top), intent=None)
            dirty = True
        elif unreported:
            fs.fsync_dir(in_dir)
            recovered = [unreported[s] for s in sorted(unreported) if s <= st.committed]
        ck = st.partial
        if ck is not None:
            partial = tmp / f"{ib.channel}.{ck['seq']}.part"
            try:
                size = os.lstat(partial).st_size
            except FileNotFoundError:
                size = -1
            if ck["seq"] <= st.committed or size < ck["offset"]:
                if ck["seq"] > st.committed:
                    problems.append(f"seq {ck['seq']}: partial file missing or shorter than its "
                                    f"checkpoint ({ck['offset']} bytes): it will be sent again")
                st, dirty = dataclasses.replace(st, partial=None), True
            elif size > ck["offset"]:
                fd = fs.open(partial, os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    fs.truncate(fd, ck["offset"])
                    fs.fsync(fd)
                finally:
                    fs.close(fd)
        keep = st.partial["seq"] if st.partial else None
        stray = re.compile(re.escape(ib.channel) + r"\.(\d+)\.part")
        removed = False
        for name in listdir(tmp):
            match = stray.fullmatch(name)
            if match and int(match[1]) != keep:
                removed = unlink_quietly(fs, tmp / name) or removed
        if removed:
            fs.fsync_dir(tmp)
        ib._st = st.saved(fs) if dirty else st
        return recovered


def quarantine_usage(folder: Path) -> tuple[int, int]:
    """(files, bytes) held in a peer's quarantine/ (the .reason notes not counted);
    a missing folder is empty. Symlinks are counted, never followed."""
    count = total = 0
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(".reason") or entry.name.startswith("."):
                    continue
                count += 1
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    except FileNotFoundError:
        pass
    return count, total
