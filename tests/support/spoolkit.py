"""Fault injection for spool tests (like trio.testing: shipped, not used in production).

    fs = FaultyFS(crash_at=12)            # Crash before the 13th durable step
    fs = FaultyFS(fail_at=("fsync_dir", 2), error=errno.EIO)   # the 3rd fsync_dir fails
    fs = FaultyFS(fault=lambda i, op, target: PermissionError(13, "denied") if ... else None)

Steps are counted from 0, over every `FS.step` call (`calls`, `trace`), and per op
(`op_calls`). A fault fires once; after a Crash the objects using this FS are
meant to be abandoned, like a dead process, and new ones built on the same
folders with a fresh FS.

`sync=False` keeps fsync, fsync_dir and syncfs as counted steps but skips the
system call: sound when the fault modelled is a process death (the kernel keeps
everything written), and it makes crash-point sweeps fast. It models no power loss.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Callable
from pathlib import Path

from linkd.errors import SpoolError
from linkd.spool.fs import FS, PathLike
from linkd.spool.inbound import ChecksumMismatch, Completed, Delivered, Inbound
from linkd.spool.layout import SpoolLayout
from linkd.spool.outbound import Claimed, FailedFile, Outbound


class Crash(BaseException):
    """A simulated process death (tests only). A BaseException so that no
    `except Exception` / `except OSError` in the code under test can swallow it."""

    def __init__(self, index: int, op: str, target: str, tag: str = "") -> None:
        super().__init__(f"simulated crash at step {index} ({op} {target}) {tag}".rstrip())
        self.index, self.op, self.target, self.tag = index, op, target, tag

Point = int | tuple[str, int] | None
Fault = Callable[[int, str, object], BaseException | None]


class FaultyFS(FS):
    def __init__(self, *, crash_at: Point = None, fail_at: Point = None,
                 error: int = errno_mod.EIO, fault: Fault | None = None, tag: str = "",
                 renameat2: bool = True, sync: bool = True) -> None:
        self.sync = sync
        self.crash_at, self.fail_at, self.error, self.fault = crash_at, fail_at, error, fault
        self.tag = tag
        self.use_renameat2 = renameat2
        self.calls = 0
        self.op_calls: dict[str, int] = {}
        self.trace: list[tuple[str, str]] = []
        self.fired: BaseException | None = None

    @staticmethod
    def _hit(point: Point, index: int, op: str, op_index: int) -> bool:
        if point is None:
            return False
        if isinstance(point, int):
            return point == index
        return point == (op, op_index)

    def step(self, op: str, target: object) -> None:
        index = self.calls
        op_index = self.op_calls.get(op, 0)
        self.calls += 1
        self.op_calls[op] = op_index + 1
        self.trace.append((op, os.fspath(target) if isinstance(target, os.PathLike)
                           else str(target)))
        if self.fired is not None:
            return
        exc: BaseException | None = None
        if self.fault is not None:
            exc = self.fault(index, op, target)
        if exc is None and self._hit(self.crash_at, index, op, op_index):
            exc = Crash(index, op, str(target), self.tag)
        if exc is None and self._hit(self.fail_at, index, op, op_index):
            exc = OSError(self.error, os.strerror(self.error), str(target))
        if exc is not None:
            self.fired = exc
            raise exc

    def fsync(self, fd: int) -> None:
        if self.sync:
            super().fsync(fd)
        else:
            self.step("fsync", fd)

    def fsync_dir(self, path: PathLike) -> None:
        if self.sync:
            super().fsync_dir(path)
        else:
            self.step("fsync_dir", path)

    def syncfs(self, path: PathLike) -> None:
        if self.sync:
            super().syncfs(path)
        else:
            self.step("syncfs", path)


def drop(folder: Path, name: str, data: bytes, mtime_ns: int | None = None) -> Path:
    """Queue a file the Maildir way: write a dot-name, set its mtime, rename it in."""
    tmp = folder / f".{name}.dropping"
    tmp.write_bytes(data)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.rename(tmp, folder / name)
    return folder / name


class LinkHarness:
    """A sender spool (node alpha, peer bravo) and a receiver spool (node bravo,
    peer alpha) joined by a perfect in-memory wire, driven exactly the way the
    daemon is meant to drive the API -- the reference for its session loop:

    session start: recover() both sides; the hello carries the receiver's
    `committed`: raise_floor() it, and probe each pending item at or below it
    (`_probe`: resolve it if the receiver holds the same content under its seq,
    else renumber it); scan(); for each pending item:
    begin() at the receiver's resume point, stream the bytes, finish(); commit()
    in batches and resolve() the delivered seqs whose content matches.
    A session ends early on Crash (that side is rebuilt from disk) or SpoolError
    (objects kept; the next session's recover() repairs them).
    """

    def __init__(self, root: Path, *, channel: str = "data", checkpoint_bytes: int = 8 << 20,
                 chunk: int = 64 << 10, batch: int = 64, max_bytes: int = 1 << 30,
                 peer_max: int | None = None, archive_sent: bool = False,
                 file_mode: int = 0o640, sync: bool = False,
                 refuse: Callable[[Claimed], str | None] = lambda item: None) -> None:
        self.channel, self.checkpoint_bytes, self.chunk, self.batch = \
            channel, checkpoint_bytes, chunk, batch
        self.max_bytes, self.peer_max, self.archive_sent = max_bytes, peer_max, archive_sent
        self.file_mode, self.sync, self.refuse = file_mode, sync, refuse
        self.sender = SpoolLayout(root / "alpha" / "spool", root / "alpha" / "state", "bravo")
        self.receiver = SpoolLayout(root / "bravo" / "spool", root / "bravo" / "state", "alpha")
        self.sender.create([channel], archive_sent)
        self.receiver.create([channel], False)
        self.delivered: list[Delivered] = []
        self.acked: list[Claimed] = []
        self.failed: list[FailedFile] = []
        self.problems: list[str] = []
        self.crashes: list[Crash] = []
        self.errors: list[SpoolError] = []
        self.max_committed = 0
        self.cut_at: int | None = None    # end the session after this many bytes of a message
        self.ob = self.new_sender()
        self.ib = self.new_receiver()

    def fs(self, side: str) -> FS:
        return FaultyFS(sync=self.sync, tag=side)

    def new_sender(self, fs: FS | None = None) -> Outbound:
        return Outbound(self.sender, self.channel, self.max_bytes, self.archive_sent,
                        fs=fs or self.fs("sender"))

    def new_receiver(self, fs: FS | None = None) -> Inbound:
        return Inbound(self.receiver, self.channel, self.max_bytes, self.file_mode,
                       self.checkpoint_bytes, fs=fs or self.fs("receiver"))

    def audit(self, moment: str) -> None:
        """Hook for invariant checks: after a crash ("crash") and after the
        recoveries at each session start ("recovered")."""

    def session(self) -> None:
        self.problems += self.ob.recover()
        self.problems += self.ib.recover()
        self.delivered += self.ib.take_recovered()
        self._check_committed()
        self.audit("recovered")
        self._probe()
        self.failed += self.ob.scan(self.peer_max)[1]
        batch: list[Completed] = []
        for item in self.ob.pending():
            if item.seq <= self.ib.committed:
                continue
            reason = self.refuse(item)
            if reason:
                self.failed.append(self.ob.fail(item, reason))
                continue
            point = self.ib.resume_point()
            offset = point[1] if point is not None and point[0] == item.seq else 0
            offset = self.ib.begin(item.seq, item.name, item.size, item.sha256, offset)
            try:
                complete = self._stream(item, offset)
            except OSError as exc:     # reading the claimed copy failed: end the session
                raise SpoolError(f"reading seq {item.seq}: {exc}") from exc
            if not complete:
                self.ib.abort()
                return
            try:
                batch.append(self.ib.finish())
            except ChecksumMismatch as exc:
                self.failed.append(self.ob.fail(item, str(exc)))
                continue
            if len(batch) >= self.batch:
                self._commit(batch)
                batch = []
        self._commit(batch)

    def _stream(self, item: Claimed, offset: int) -> bool:
        with self.ob.open(item) as f:
            f.seek(offset)
            while chunk := f.read(self.chunk):
                self.ib.write(chunk)
                offset += len(chunk)
                if self.cut_at is not None and offset >= self.cut_at:
                    self.cut_at = None
                    return False
        return True

    def _probe(self) -> None:
        """What the daemon does at session start: raise the numbering above the
        receiver's committed seq, resolve queued files the receiver holds with the
        same content; if it holds other content (or cannot say) under any of them,
        renumber that file and every later one, keeping pick-up order."""
        self.ob.raise_floor(self.ib.committed)
        first = None
        for item in self.ob.pending():
            if item.seq > self.ib.committed:
                break
            held = self.ib.lookup(item.seq)
            if held is not None and (held["sha256"], held["size"], held["sent_name"]) == \
                    (item.sha256, item.size, item.name):
                self.acked += [r.item for r in self.ob.resolve([item.seq])]
            elif first is None:
                first = item.seq
        if first is not None:
            self.ob.renumber_tail(first, self.ib.committed)

    def _commit(self, batch: list[Completed]) -> None:
        got = self.ib.commit(batch) if batch else []
        self.delivered += got
        self._check_committed()
        by_seq = {i.seq: i for i in self.ob.pending()}
        ok = [d.seq for d in got if d.seq in by_seq and by_seq[d.seq].sha256 == d.sha256]
        self.acked += [r.item for r in self.ob.resolve(ok)]

    def _check_committed(self) -> None:
        assert self.ib.committed >= self.max_committed, \
            f"committed went back from {self.max_committed} to {self.ib.committed}"
        self.max_committed = self.ib.committed

    def crashed(self, crash: Crash, rebuild: Callable[[str], FS | None]) -> None:
        """Handle a Crash: rebuild the side that died; the other side's session ends."""
        self.crashes.append(crash)
        self.audit("crash")
        if crash.tag == "receiver":
            self.ib = self.new_receiver(rebuild("receiver"))
        else:
            self.ob = self.new_sender(rebuild("sender"))
            try:
                self.ib.abort()
            except SpoolError:
                pass

    def run(self, rebuild: Callable[[str], FS | None] = lambda side: None,
            max_sessions: int = 50) -> None:
        """Sessions until one ends normally."""
        for _ in range(max_sessions):
            try:
                self.session()
                return
            except Crash as crash:
                self.crashed(crash, rebuild)
            except SpoolError as exc:
                self.errors.append(exc)
                try:
                    self.ib.abort()
                except SpoolError:
                    pass
        raise AssertionError(f"no session completed in {max_sessions} tries")

    def idle(self) -> bool:
        return not self.ob.pending() and self.ob.waiting()[0] == 0

    def drain(self, rebuild: Callable[[str], FS | None] = lambda side: None) -> None:
        for _ in range(20):
            self.run(rebuild)
            if self.idle():
                return
        raise AssertionError("the link did not drain")
