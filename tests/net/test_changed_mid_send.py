"""A big queued file written to while it is being sent (an in-place writer that
kept going after the rename, `cp` over the queued copy...). Two real PeerLinks
over a memory stream; the change is made by the sender's own first read (after
its first read-ahead), so it always falls mid-send.

The sender does not hash the file a second time while sending it: the peer
hashes what it receives against the SHA-256 taken at pick-up (which the `msg`
frame carries) and refuses a mismatch, so changed bytes are never delivered.

* Bytes already read or still to be read rewritten: refused (quarantined) by the
  peer; its nack finds the queued file changed (inode, size, mtime against the
  claim) and the sender fails it at once, never delivered.
* The same with the mtime put back: the peer refuses it; the sender, finding
  inode, size and mtime as claimed, reads the file once more (a refusal of a
  message sent whole is the peer's checksum), finds other content and fails it at
  once: one copy in the peer's quarantine, not MAX_ATTEMPTS. (A refused file
  whose content is as claimed is sent again: tests/net/test_session_nack.py.)
* A change that left the bytes sent as they were (an append past the claimed
  size, a touch): the peer holds exactly what was queued; delivered, and the
  sender logs message_changed (a file once failed for this was delivered all
  the same: failed/ said "not sent" of a file the peer had)."""

import io
import os

import pytest
import structlog
import trio
import trio.testing
import trustme
from memlink import drop, make_link, node_config, peer_config, scan_sync

from linkd.net import sender as sendmod
from linkd.net.connection import SessionRunner

SIZE = 3 * sendmod.READ_AHEAD + 4321         # several read hops: never read whole


class _ChangingReader(io.BufferedReader):
    """The queued file as the sender reads it; after the first read, another writer
    changes it (`how`)."""

    def __init__(self, raw, path, how):
        super().__init__(raw)
        self.path, self.how, self.done = path, how, False

    def readinto(self, b):
        n = super().readinto(b)
        if not self.done:
            self.done = True
            st = os.stat(self.path)
            if self.how == "touch":
                os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
                return n
            fd = os.open(self.path, os.O_WRONLY)
            try:
                if self.how == "append":
                    os.pwrite(fd, b"more", SIZE)
                else:                                # rewrite its last bytes in place
                    os.pwrite(fd, b"\xff" * 16, SIZE - 16)
            finally:
                os.close(fd)
            if self.how == "rewrite, mtime kept":
                os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return n


async def _run(tmp_path, how, monkeypatch):
    ca = trustme.CA()
    a = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")]), "alpha")
    content = os.urandom(SIZE)
    drop(a, "data", "big.bin", content)
    drop(a, "data", "after.txt", b"the next file still goes")
    scan_sync(a)
    outbound = a.outbound["data"]
    real_open = outbound.open
    opened = []

    def changing_open(item):
        fh = real_open(item)
        if item.name != "big.bin" or opened:
            return fh
        opened.append(item.name)
        return _ChangingReader(fh.detach(), item.path, how)
    monkeypatch.setattr(outbound, "open", changing_open)
    failed = []
    real_fail = outbound.fail

    drained = trio.Event()          # every claimed file resolved or failed
    real_resolve = outbound.resolve

    def note_drained():             # both run in the spool's worker threads
        if not outbound.pending():
            trio.from_thread.run_sync(drained.set)

    def recording_fail(item, reason):
        failed.append((item.name, reason))
        done = real_fail(item, reason)
        note_drained()
        return done

    def noted_resolve(seqs):
        done = real_resolve(seqs)
        note_drained()
        return done
    monkeypatch.setattr(outbound, "fail", recording_fail)
    monkeypatch.setattr(outbound, "resolve", noted_resolve)

    left, right = trio.testing.memory_stream_pair()
    ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
    a.take_slot(ra), b.take_slot(rb)
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            await drained.wait()
            await ra.close("done")
            nursery.cancel_scope.cancel()
    assert opened, "the big file was never read from its queued copy"
    delivered = {p.name: p.read_bytes() for p in b.layout.in_dir("data").iterdir()}
    events = [(e["event"], e.get("name")) for e in logs if e.get("node", "alpha") != "bravo"]
    return failed, delivered, content, events, a, b


@pytest.mark.parametrize("how", ["rewrite"])
async def test_a_file_rewritten_while_sent_is_refused_and_failed_at_once(
        tmp_path, monkeypatch, how):
    failed, delivered, _content, _events, a, b = await _run(tmp_path, how, monkeypatch)
    assert sorted(delivered) == ["after.txt"]
    assert [name for name, _ in failed] == ["big.bin"]
    reason = failed[0][1]
    assert reason.startswith("not sent: the queued file was changed after it was queued "
                             "(refused by bravo: "), reason
    assert "sha256" in reason
    assert b.status.channel("data").quarantined == 1      # one attempt, not MAX_ATTEMPTS
    assert (a.layout.failed_dir("data") / "big.bin").exists()


async def test_a_rewrite_that_keeps_the_mtime_is_refused_once_then_failed(
        tmp_path, monkeypatch):
    """Inode, size and mtime as claimed: only the content says it changed. The
    refusal of a message sent whole makes the sender read the file once more."""
    failed, delivered, _content, _events, _a, b = await _run(
        tmp_path, "rewrite, mtime kept", monkeypatch)
    assert sorted(delivered) == ["after.txt"]
    assert [name for name, _ in failed] == ["big.bin"]
    assert failed[0][1].startswith("not sent: the queued file was changed after it was "
                                   "queued (refused by bravo: "), failed[0][1]
    assert b.status.channel("data").quarantined == 1      # not MAX_ATTEMPTS copies


@pytest.mark.parametrize("how", ["append", "touch"])
async def test_a_change_that_left_the_sent_bytes_alone_is_delivered_and_logged_changed(
        tmp_path, monkeypatch, how):
    failed, delivered, content, events, _a, _b = await _run(tmp_path, how, monkeypatch)
    assert failed == []
    assert delivered == {"big.bin": content, "after.txt": b"the next file still goes"}
    assert ("message_sent", "big.bin") in events
    # its message_changed line follows its own message_sent, as when logged one by one
    # (an ack's message_sent lines are logged a run at a time)
    sender = [e for e in events if e[0] in ("message_sent", "message_changed")]
    assert sender[sender.index(("message_sent", "big.bin")) + 1] == \
        ("message_changed", "big.bin")
