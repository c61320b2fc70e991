"""A receiver whose disk fills up mid-message (found in an operator's trial: a 200 MiB
file on a spool with 120 MiB free).

Two real PeerLinks over a memory stream. The receiver's spool write fails with ENOSPC
part-way through a big message; it nacks "busy". The resend must start at what the
receiver holds durably (the nack names it), not at byte 0 -- which re-sent and
re-wrote 120 MiB every 1.6 s -- and the waits between resends must keep growing
while the storage keeps failing, even when each resend writes some data first (they
were reset to 1 s by every batch written)."""

from __future__ import annotations

import errno
import os

import trustme
from memlink import drop, make_link, node_config, peer_config, run_pair, scan_sync

from linkd.net import receiver as receiver_module
from linkd.net.connection import SessionRunner
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.spool.fs import FS

KiB, MiB = 1 << 10, 1 << 20


def pair(tmp_path):
    ca = trustme.CA()
    a = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")]), "alpha")
    return a, b


def big_file(tmp_path, size: int, checkpoint_bytes: int):
    """alpha with big.bin (`size` random bytes) queued for bravo, whose inbound spool
    checkpoints every `checkpoint_bytes`: (alpha, bravo, the bytes, bravo's spool)."""
    a, b = pair(tmp_path)
    payload = os.urandom(size)
    drop(a, "data", "big.bin", payload)
    scan_sync(a)
    inbound = b.inbound["data"]
    inbound.checkpoint_bytes = checkpoint_bytes
    return a, b, payload, inbound


def failing_writes(inbound, fail_after: int, failures: int):
    """Make inbound.write raise ENOSPC once `fail_after` bytes of a message were
    written since its begin() (at whatever offset it began), `failures` times.
    Returns the list of (offset, bytes written) of each begin()."""
    real_begin, real_write = inbound.begin, inbound.write
    attempts: list[list[int]] = []
    left = [failures]

    def begin(seq, name, size, sha256, offset=0, **kw):
        used = real_begin(seq, name, size, sha256, offset, **kw)
        attempts.append([offset, 0])
        return used

    def write(data):
        if left[0] and attempts and attempts[-1][1] + len(data) > fail_after:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(data)
        attempts[-1][1] += len(data)
    inbound.begin, inbound.write = begin, write
    return attempts


async def run_until_delivered(a, b, monkeypatch, before_close=None):
    """Run both sides until alpha's queue is empty (then call `before_close`, while the
    session is still up); the busy nacks bravo sent."""
    nacks: list[F.Nack] = []
    real_send_nack = S.Session.send_nack

    def send_nack(self, ch, seq, reason, retry, kind=F.NACK_RETRY, wait=0.0, resume=None):
        nacks.append(F.Nack(ch, seq, reason, retry, kind, wait, resume))
        return real_send_nack(self, ch, seq, reason, retry, kind, wait, resume)
    monkeypatch.setattr(S.Session, "send_nack", send_nack)
    await run_pair(a, b, before_close=before_close)
    return nacks


async def test_a_busy_nack_resends_from_the_receivers_durable_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(receiver_module, "BUSY_WAIT", (0.01, 0.05))
    a, b, payload, inbound = big_file(tmp_path, 3 * MiB + 12_345, 256 * KiB)
    attempts = failing_writes(inbound, fail_after=2 * MiB + 100 * KiB, failures=1)

    nacks = await run_until_delivered(a, b, monkeypatch)

    assert (b.layout.in_dir("data") / "big.bin").read_bytes() == payload
    [busy] = [n for n in nacks if n.kind == F.NACK_BUSY]
    assert busy.seq == 1 and busy.resume is not None and busy.resume >= 2 * MiB, busy
    # the resend began where the receiver's durable copy ended, and wrote only the rest
    assert len(attempts) == 2, attempts
    assert attempts[1][0] == busy.resume
    assert attempts[1][0] + attempts[1][1] == len(payload)
    assert a.outbound["data"].acked == 1


async def test_busy_waits_keep_growing_while_resends_fail_part_way(tmp_path, monkeypatch):
    monkeypatch.setattr(receiver_module, "BUSY_WAIT", (0.01, 0.5))
    a, b, payload, inbound = big_file(tmp_path, 8 * MiB, 256 * KiB)
    # every resend writes a first batch (1 MiB) and fails in its second
    attempts = failing_writes(inbound, fail_after=3 * MiB // 2, failures=4)

    nacks = await run_until_delivered(a, b, monkeypatch)

    assert (b.layout.in_dir("data") / "big.bin").read_bytes() == payload
    busy = [n for n in nacks if n.kind == F.NACK_BUSY]
    assert [n.wait for n in busy] == [0.01, 0.02, 0.04, 0.08], busy
    # and each resend went on from the durable offset before it
    assert [off for off, _ in attempts] == sorted(off for off, _ in attempts)
    assert attempts[-1][0] > 0 and len(attempts) == 5, attempts


async def test_the_queue_says_why_a_file_waits_while_the_peer_cannot_store_it(
        tmp_path, monkeypatch):
    monkeypatch.setattr(receiver_module, "BUSY_WAIT", (0.01, 0.05))
    a, b = pair(tmp_path)
    drop(a, "data", "big.bin", os.urandom(2 * MiB))
    scan_sync(a)
    attempts = failing_writes(b.inbound["data"], fail_after=MiB // 2, failures=1)
    seen: list[str | None] = []
    real_handle = SessionRunner._handle_nacks

    async def handle_nacks(self):
        await real_handle(self)
        if self.link is a:
            seen.append(self.held_reason("data"))
            entries = list(a.iter_queue_entries("data"))
            seen.append(entries[0]["state"] + ": " + str(entries[0]["reason"]))
            seen.append(a.status.channel("data").held)
            seen.append(b.status.channel("data").inbound_error)
    monkeypatch.setattr(SessionRunner, "_handle_nacks", handle_nacks)
    after: list[str | None] = []

    def before_close():     # acknowledged, the session still up (its end clears both)
        after.extend([a.status.channel("data").held, b.status.channel("data").inbound_error])

    await run_until_delivered(a, b, monkeypatch, before_close)

    assert attempts, "the fault was never injected"
    reason = "bravo: receiver cannot store it now: [Errno 28] No space"
    assert seen and seen[0] and seen[0].startswith(reason), seen
    assert seen[1].startswith("held: " + reason), seen
    assert seen[2] == seen[0]
    assert seen[3] == "[Errno 28] No space left on device", seen
    # sent again and acknowledged: neither side says so any more
    assert after == [None, None], after


class FullAt(FS):
    """A disk that holds the first `limit` bytes of a .part file: a write past it fails
    with ENOSPC through the spool's own FS seam (so the spool treats it as a failed
    write, and the resume point is its last periodic checkpoint, as for real).
    From the review of 2b5fa39."""

    def __init__(self, limit: int, failures: int) -> None:
        self.limit, self.left = limit, failures

    def _check(self, fd: int, offset: int, n: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith(".part") and self.left and offset + n > self.limit:
            self.left -= 1
            raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, fd, data):
        self._check(fd, os.lseek(fd, 0, os.SEEK_CUR), len(data))
        super().write(fd, data)

    def pwrite(self, fd, data, offset):
        self._check(fd, offset, len(data))
        super().pwrite(fd, data, offset)


async def test_a_disk_full_at_the_fs_seam_resumes_from_the_last_checkpoint(
        tmp_path, monkeypatch):
    monkeypatch.setattr(receiver_module, "BUSY_WAIT", (0.01, 0.5))
    a, b = pair(tmp_path)
    payload = os.urandom(12 * MiB + 4321)       # O_DIRECT-sized where the fs allows it
    drop(a, "data", "big.bin", payload)
    scan_sync(a)
    inbound = b.inbound["data"]
    inbound.checkpoint_bytes = MiB
    inbound.fs = FullAt(limit=7 * MiB + 5000, failures=3)
    begins: list[int] = []
    real_begin = inbound.begin

    def begin(seq, name, size, sha256, offset=0, **kw):
        begins.append(offset)
        return real_begin(seq, name, size, sha256, offset, **kw)
    inbound.begin = begin

    nacks = await run_until_delivered(a, b, monkeypatch)

    assert (b.layout.in_dir("data") / "big.bin").read_bytes() == payload
    busy = [n for n in nacks if n.kind == F.NACK_BUSY]
    assert [n.wait for n in busy] == [0.01, 0.02, 0.04], busy
    assert [n.resume for n in busy] == [7 * MiB] * 3, busy    # the last checkpoint
    assert begins == [0, 7 * MiB, 7 * MiB, 7 * MiB], begins


async def test_neither_side_stays_held_once_the_refused_message_failed(tmp_path, monkeypatch):
    """From the review of 2b5fa39: a busy nack, then the resend is refused for good (the
    receiver's limit was lowered meanwhile) and the file goes to failed/. No ack ever
    comes on the channel, yet neither side may go on saying it cannot store."""
    monkeypatch.setattr(receiver_module, "BUSY_WAIT", (0.01, 0.05))
    a, b = pair(tmp_path)
    drop(a, "data", "big.bin", os.urandom(2 * MiB))
    scan_sync(a)
    inbound = b.inbound["data"]
    inbound.checkpoint_bytes = 256 * KiB
    failing_writes(inbound, fail_after=MiB, failures=1)
    real_recover = inbound.recover
    recovered: list[int] = []

    def recover():
        out = real_recover()
        recovered.append(1)
        if len(recovered) > 1:      # after the ENOSPC, not at the session's start
            inbound.configure(MiB, inbound.file_mode)
        return out
    inbound.recover = recover
    seen: list[object] = []

    def before_close():
        seen.extend([len(list(a.layout.failed_dir("data").glob("big.bin"))),
                     a.status.channel("data").held, b.status.channel("data").inbound_error])

    await run_until_delivered(a, b, monkeypatch, before_close)

    assert seen == [1, None, None], seen


async def test_an_audit_refusal_also_names_the_durable_offset(tmp_path, monkeypatch):
    """From the re-trial: while the audit log was failed, its refusals carried no
    offset, so a big file went out from byte 0 every 30 s (the partial was kept)."""
    from linkd.evidence import audit as A
    monkeypatch.setattr(receiver_module, "BUSY_WAIT", (0.01, 0.05))
    monkeypatch.setattr(receiver_module, "QUARANTINE_WAIT", 0.01)
    a, b, payload, inbound = big_file(tmp_path, 3 * MiB, 256 * KiB)
    attempts = failing_writes(inbound, fail_after=2 * MiB, failures=1)
    log = A.AuditLog(tmp_path / "audit", "bravo", None)
    log.open()
    A.install(log)
    real_handle = SessionRunner._handle_nacks
    refusals: list[tuple[str, int | None]] = []

    async def handle_nacks(self):
        for nack in self.nacks if self.link is a else []:
            refusals.append((nack.reason, nack.resume))
            if len(refusals) == 1:      # the disk filled up: the audit log fails too
                log.failed = OSError(28, "No space left on device")
            else:                       # and can be written again
                log.failed = None
        await real_handle(self)
    monkeypatch.setattr(SessionRunner, "_handle_nacks", handle_nacks)
    try:
        await run_until_delivered(a, b, monkeypatch)
    finally:
        A.install(None)
        log.close()

    assert (b.layout.in_dir("data") / "big.bin").read_bytes() == payload
    assert len(refusals) == 2, refusals
    (storage, at), (audit, again) = refusals
    assert "No space" in storage and audit.startswith("the audit log"), refusals
    assert at is not None and again == at, refusals
    assert [off for off, _ in attempts] == [0, at], attempts
