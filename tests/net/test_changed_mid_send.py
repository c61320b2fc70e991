"""A big queued file written to while it is being sent (an in-place writer that
kept going after the rename, `cp` over the queued copy...) is failed by the
sender with a reason that says so, and never delivered. Two real PeerLinks over a
memory stream; the change is made by the sender's own read (after its first
read-ahead), so it always falls mid-send.

The sender notices it with an fstat of the open file at the end (inode, size,
mtime against the claim); the peer's SHA-256 check is what keeps the changed
bytes out of its in/ (it quarantines them). A change that also restores the
mtime is not noticed by the sender: the peer refuses it on every attempt, and
it is failed after MAX_ATTEMPTS, still never delivered."""

import io
import os

import pytest
import trio
import trio.testing
import trustme
from memlink import drop, make_link, node_config, peer_config, scan_sync

from linkd.net import sender as sendmod
from linkd.net.connection import SessionRunner

SIZE = 3 * sendmod.READ_AHEAD + 4321         # several read hops: never read whole


class _ChangingReader(io.BufferedReader):
    """The queued file as the sender reads it; after the first read, another writer
    rewrites its last bytes in place (same size)."""

    def __init__(self, raw, path, keep_mtime):
        super().__init__(raw)
        self.path, self.keep_mtime, self.done = path, keep_mtime, False

    def readinto(self, b):
        n = super().readinto(b)
        if not self.done:
            self.done = True
            st = os.stat(self.path)
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\xff" * 16, SIZE - 16)
            finally:
                os.close(fd)
            if self.keep_mtime:
                os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return n


async def _run(tmp_path, keep_mtime, monkeypatch):
    ca = trustme.CA()
    a = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")]), "alpha")
    drop(a, "data", "big.bin", os.urandom(SIZE))
    drop(a, "data", "after.txt", b"the next file still goes")
    scan_sync(a)
    outbound = a.outbound["data"]
    real_open = outbound.open
    opened = []

    def changing_open(item):
        fh = real_open(item)
        if item.name != "big.bin":
            return fh
        opened.append(item.name)
        return _ChangingReader(fh.detach(), item.path, keep_mtime)
    monkeypatch.setattr(outbound, "open", changing_open)
    failed = []
    real_fail = outbound.fail

    def recording_fail(item, reason):
        failed.append((item.name, reason))
        return real_fail(item, reason)
    monkeypatch.setattr(outbound, "fail", recording_fail)

    left, right = trio.testing.memory_stream_pair()
    ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
    a.take_slot(ra), b.take_slot(rb)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            while outbound.pending():  # noqa: ASYNC110 (resolved or failed, every one)
                await trio.sleep(0.01)
            await ra.close("done")
            nursery.cancel_scope.cancel()
    assert opened, "the big file was never read from its queued copy"
    in_dir = b.layout.in_dir("data")
    assert sorted(p.name for p in in_dir.iterdir()) == ["after.txt"]
    assert [name for name, _ in failed] == ["big.bin"]
    assert (a.layout.failed_dir("data") / "big.bin").exists()
    return failed[0][1], b


async def test_a_file_written_to_while_sent_is_failed_as_changed_and_not_delivered(
        tmp_path, monkeypatch):
    reason, _ = await _run(tmp_path, keep_mtime=False, monkeypatch=monkeypatch)
    assert reason == "not sent: the queued file was changed while being sent"


@pytest.mark.parametrize("attempts", [2])
async def test_a_change_that_keeps_the_mtime_is_refused_by_the_peer_and_failed(
        tmp_path, monkeypatch, attempts):
    monkeypatch.setattr(sendmod, "MAX_ATTEMPTS", attempts)
    reason, b = await _run(tmp_path, keep_mtime=True, monkeypatch=monkeypatch)
    assert reason.startswith("refused by alpha") or reason.startswith("refused by bravo"), \
        reason
    assert "sha256" in reason.lower() or "checksum" in reason.lower(), reason
    assert b.status.channel("data").quarantined >= 1
