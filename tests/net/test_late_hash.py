"""A big file goes out before it is hashed (issue 13: the pick-up SHA-256 pass was
~0.6 s per GiB before the first byte left, a fifth of a 1 GiB transfer).

Two real PeerLinks over a memory stream, LATE_HASH lowered so that a few MiB count as
big. The file is claimed without its SHA-256; the msg goes without it, the hash is
taken in a thread beside the transfer, and a `sum` frame brings it after the data. The
receiver still checks the whole file against a hash taken under a lease, so a file
written to after its claim is failed, never delivered mixed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import threading

import pytest
import trio
import trustme
from memlink import FakePeer, drop, make_link, node_config, peer_config, scan_sync
from net.test_ack_evidence import run_against
from net.test_busy_resume import big_file, failing_writes, pair, run_until_delivered

from linkd.errors import FileChanged
from linkd.net import connection, sender
from linkd.net import receiver as receiver_module
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.spool import outbound_items, pickup

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(autouse=True)
def late_from_1_mib(monkeypatch):
    monkeypatch.setattr(outbound_items, "LATE_HASH", 1 * MiB)


def record_sending(monkeypatch, log: list):
    """Log alpha's msg and sum frames and the late hash's start, in the order they
    happen: ("msg", seq, sha256), ("digest", seq), ("sum", seq, sha256)."""
    real_msg, real_sum = S.Session.send_msg, S.Session.send_sum
    real_digest = pickup.PickupMixin.digest_late

    def send_msg(self, ch, seq, name, size, sha256, offset=0):
        if self.node == "alpha":
            log.append(("msg", seq, sha256))
        return real_msg(self, ch, seq, name, size, sha256, offset)

    def send_sum(self, ch, seq, sha256):
        log.append(("sum", seq, sha256))
        return real_sum(self, ch, seq, sha256)

    def digest_late(self, item, stop=lambda: False):
        log.append(("digest", item.seq))
        return real_digest(self, item, stop)
    monkeypatch.setattr(S.Session, "send_msg", send_msg)
    monkeypatch.setattr(S.Session, "send_sum", send_sum)
    monkeypatch.setattr(pickup.PickupMixin, "digest_late", digest_late)


def meta(link, seq: int) -> dict:
    return json.loads((link.layout.queue_dir("data") / f"{seq}.meta").read_text())


async def test_a_big_file_goes_out_at_once_and_its_sha256_follows_the_data(tmp_path,
                                                                            monkeypatch):
    a, b = pair(tmp_path)
    payload = os.urandom(3 * MiB + 17)
    drop(a, "data", "big.bin", payload)
    drop(a, "data", "small.txt", b"after it")
    scan_sync(a)
    [big, small] = a.outbound["data"].pending()
    assert big.sha256 == "" and meta(a, 1)["sha256"] == ""     # claimed unhashed
    assert small.sha256                                         # hashed at pick-up
    sent: list = []
    record_sending(monkeypatch, sent)

    await run_until_delivered(a, b, monkeypatch)

    digest = hashlib.sha256(payload).digest()
    assert sent[:3] == [("msg", 1, None), ("digest", 1), ("sum", 1, digest)], sent
    assert sent[3][:2] == ("msg", 2) and sent[3][2] is not None
    assert (b.layout.in_dir("data") / "big.bin").read_bytes() == payload
    assert (b.layout.in_dir("data") / "small.txt").read_bytes() == b"after it"
    assert a.outbound["data"].acked == 2


async def test_the_late_sha256_is_recorded_in_the_claim_record(tmp_path, monkeypatch):
    a, b = pair(tmp_path)
    drop(a, "data", "big.bin", os.urandom(2 * MiB))
    scan_sync(a)
    out = a.outbound["data"]
    [item] = out.pending()
    spool = a.spools["data"]

    hashed = await spool.hash_late(item)

    assert hashed.sha256 == hashlib.sha256(item.path.read_bytes()).hexdigest()
    assert meta(a, 1)["sha256"] == hashed.sha256 and out.pending()[0].sha256 == hashed.sha256
    # a restart reads it back; and one from before it was taken is hashed again
    assert out._read_meta(1).sha256 == hashed.sha256


async def test_a_peer_that_does_not_take_it_late_gets_the_sha256_in_the_msg(tmp_path,
                                                                            monkeypatch):
    real_init = S.Session.__init__

    def old_bravo(self, *args, **kw):
        real_init(self, *args, **{**kw, "late_hash": kw["node"] != "bravo"})
    monkeypatch.setattr(S.Session, "__init__", old_bravo)
    a, b = pair(tmp_path)
    payload = os.urandom(2 * MiB)
    drop(a, "data", "big.bin", payload)
    scan_sync(a)
    sent: list = []
    record_sending(monkeypatch, sent)

    await run_until_delivered(a, b, monkeypatch)

    digest = hashlib.sha256(payload).digest()
    assert sent == [("digest", 1), ("msg", 1, digest)]
    assert (b.layout.in_dir("data") / "big.bin").read_bytes() == payload


async def test_a_big_file_written_to_after_its_claim_is_failed_not_delivered(tmp_path,
                                                                            monkeypatch):
    a, b = pair(tmp_path)
    drop(a, "data", "big.bin", os.urandom(2 * MiB))
    scan_sync(a)
    [item] = a.outbound["data"].pending()
    with open(item.path, "r+b") as f:  # noqa: ASYNC230 (before the session: in place, same size)
        f.write(b"X" * 4096)

    await run_until_delivered(a, b, monkeypatch)

    assert not (b.layout.in_dir("data") / "big.bin").exists()
    failed = a.layout.failed_dir("data")
    assert (failed / "big.bin").exists()
    assert "changed after it was queued" in (failed / "big.bin.reason").read_text()


@pytest.mark.parametrize("late", [False, True], ids=["hashed-at-pick-up", "late"])
async def test_a_file_rewritten_after_its_claim_with_its_mtime_put_back_is_not_delivered(
        tmp_path, monkeypatch, late):
    """Found by review: rewritten in place (same inode and size, mtime put back) after
    its claim and before its late hash, it was delivered as rewritten, logged plain
    message_sent. Its ctime since the claim now says so; it is failed, as a file
    hashed at pick-up is (the peer refuses it, content_differs() fails it)."""
    monkeypatch.setattr(outbound_items, "LATE_HASH", 1 * MiB if late else 1 << 40)
    a, b = pair(tmp_path)
    drop(a, "data", "big.bin", os.urandom(2 * MiB))
    scan_sync(a)
    [item] = a.outbound["data"].pending()
    assert bool(item.ctime_ns) == late
    st = os.stat(item.path)
    with open(item.path, "r+b") as f:  # noqa: ASYNC230 (before the session starts)
        f.write(b"X" * 4096)
    os.utime(item.path, ns=(st.st_atime_ns, st.st_mtime_ns))

    await run_until_delivered(a, b, monkeypatch)

    assert not (b.layout.in_dir("data") / "big.bin").exists()
    reason = (a.layout.failed_dir("data") / "big.bin.reason").read_text()
    assert "changed after it was queued" in reason


async def test_a_busy_resend_of_a_late_message_resumes_at_the_durable_offset(tmp_path,
                                                                           monkeypatch):
    """The receiver's checkpoint of a late message has no SHA-256 (it came later): a
    resume from it is still accepted, and the whole file checked against the sum."""
    monkeypatch.setattr(receiver_module, "BUSY_WAIT", (0.01, 0.05))
    a, b, payload, inbound = big_file(tmp_path, 3 * MiB + 5, 256 * KiB)
    attempts = failing_writes(inbound, fail_after=2 * MiB, failures=1)
    assert a.outbound["data"].pending()[0].sha256 == ""

    nacks = await run_until_delivered(a, b, monkeypatch)

    assert (b.layout.in_dir("data") / "big.bin").read_bytes() == payload
    [busy] = [n for n in nacks if n.kind == F.NACK_BUSY]
    assert len(attempts) == 2 and attempts[1][0] == busy.resume >= 2 * MiB - 256 * KiB


async def test_a_late_hash_that_finds_the_file_changed_abandons_the_message(tmp_path,
                                                                           monkeypatch):
    """The hash fails (the file was written to while it was hashed): the message is
    abandoned mid-way or before its sum, the file failed, nothing delivered; the next
    file of the channel goes through (its msg rewinds the abandoned one)."""
    a, b = pair(tmp_path)
    drop(a, "data", "big.bin", os.urandom(3 * MiB))
    drop(a, "data", "next.txt", b"next")
    scan_sync(a)

    def digest_late(self, item, stop=lambda: False):
        raise FileChanged("it was written to after it was queued, while it was being "
                          "hashed")
    monkeypatch.setattr(pickup.PickupMixin, "digest_late", digest_late)
    sent: list = []
    real_abandon = S.Session.abandon
    monkeypatch.setattr(S.Session, "abandon",
                        lambda self, ch: (sent.append(("abandon", ch)), real_abandon(self, ch)))

    await run_until_delivered(a, b, monkeypatch)

    assert not (b.layout.in_dir("data") / "big.bin").exists()
    assert (b.layout.in_dir("data") / "next.txt").read_bytes() == b"next"
    assert ("abandon", "data") in sent
    reason = (a.layout.failed_dir("data") / "big.bin.reason").read_text()
    assert "while it was being hashed" in reason
    assert not list(b.layout.tmp_dir().iterdir())        # bravo dropped what it had


async def test_a_probe_of_a_late_message_carries_its_sha256(tmp_path):
    """The peer says it committed seq 1 already (our ack was lost): the probe must name
    the content, so the big file is hashed first; the peer holds the same, so it is
    resolved as sent without its data going out again."""
    ca = trustme.CA()
    link = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")
    payload = os.urandom(2 * MiB)
    drop(link, "data", "big.bin", payload)
    scan_sync(link)
    assert link.outbound["data"].pending()[0].sha256 == ""
    peer = FakePeer(None, committed=1, holds={("data", 1): payload})

    async def until(runner, peer):
        while link.status.channel("data").sent < 1:  # noqa: ASYNC110 (resolved in a thread)
            await trio.sleep(0.01)
    runner = await run_against(link, peer, until)

    assert not hasattr(runner, "result"), runner.result
    [msg] = [f for _, f in peer.frames if isinstance(f, F.Msg)]
    assert msg.sha256 == hashlib.sha256(payload).digest() and msg.offset == msg.size
    assert not [f for _, f in peer.frames if isinstance(f, (F.Data, F.Sum))]


async def test_a_nack_during_the_flush_before_a_sum_step_ends_nothing(tmp_path, monkeypatch):
    """Found by review: a late message with all its data out (current set, no file,
    its sum due); the sender flushes another channel's output before stepping it, and
    the peer's busy nack arrives during that flush. The step used to assert the file
    was there: 'internal error', the session ended. The interleaving is pinned: the
    hash is held until the data is out and the other channel is mid-run."""
    ca = trustme.CA()
    link = make_link(node_config(tmp_path, ca, "alpha",
                                 [peer_config("bravo", ("data", "bulk"))]), "bravo")
    drop(link, "data", "big.bin", os.urandom(2 * MiB))
    for i in range(2000):
        drop(link, "bulk", f"s{i:05d}.txt", b"x" * 100)
    scan_sync(link)
    assert link.outbound["data"].pending()[0].sha256 == ""

    release = threading.Event()
    real_digest = pickup.PickupMixin.digest_late

    def held_digest(self, item, stop=lambda: False):
        release.wait(20)
        return real_digest(self, item, stop)
    monkeypatch.setattr(pickup.PickupMixin, "digest_late", held_digest)

    real_read_whole = sender.SenderMixin._read_whole

    async def read_whole(self, state, item):
        data = self.out.get("data")
        if state.name == "bulk" and not release.is_set() and data is not None \
                and data.current is not None and data.fh is None \
                and self.session.sum_due("data"):
            # the big file's data is all out; let its hash finish during this hop
            release.set()
            while 1 not in data.hashed:  # noqa: ASYNC110 (set by a task we do not own)
                await trio.sleep(0.001)
        return await real_read_whole(self, state, item)
    monkeypatch.setattr(sender.SenderMixin, "_read_whole", read_whole)

    peer = FakePeer(None, channels=("data", "bulk"))
    fired: list = []
    real_flush = connection.SessionRunner.flush

    async def flush(self):
        await real_flush(self)
        caller = sys._getframe(1)
        # The flush _sender makes before it turns to another channel (`if unflushed
        # and name != last`), just before stepping "data": the nack arrives meanwhile.
        if not fired and caller.f_code.co_name == "_sender" \
                and caller.f_locals.get("name") == "data" \
                and caller.f_locals.get("last") != "data" \
                and self.out["data"].current is not None and self.out["data"].fh is None:
            fired.append(True)
            peer.session.send_nack("data", 1, "disk full", True, F.NACK_BUSY, 0.01, None)
            await peer.flush()
            while not self.nacks:  # noqa: ASYNC110 (the reader fills it)
                await trio.sleep(0.001)
    monkeypatch.setattr(connection.SessionRunner, "flush", flush)

    async def until(runner, peer):
        end = trio.current_time() + 60
        while not (hasattr(runner, "result") or ("data", 1) in peer.complete  # noqa: ASYNC110
                   or trio.current_time() > end):
            await trio.sleep(0.01)
    runner = await run_against(link, peer, until)

    assert fired, "the interleaving did not happen"
    result = getattr(runner, "result", None)
    assert result is None or "internal error" not in result[0], result


async def test_a_late_hash_out_of_descriptors_is_retried_and_the_transfer_kept(
        tmp_path, monkeypatch):
    """EMFILE from the hash is not the file's fault: the hash is taken again a while
    later, and the bytes already sent stay (review: the transfer was abandoned and
    started over from byte 0)."""
    monkeypatch.setattr(sender, "READ_RETRY", 0.01)
    a, b = pair(tmp_path)
    payload = os.urandom(3 * MiB)
    drop(a, "data", "big.bin", payload)
    scan_sync(a)
    real_digest = pickup.PickupMixin.digest_late
    calls: list = []

    def digest_late(self, item, stop=lambda: False):
        calls.append(item.seq)
        if len(calls) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_digest(self, item, stop)
    monkeypatch.setattr(pickup.PickupMixin, "digest_late", digest_late)
    sent: list = []
    record_sending(monkeypatch, sent)

    await run_until_delivered(a, b, monkeypatch)

    assert (b.layout.in_dir("data") / "big.bin").read_bytes() == payload
    assert calls == [1, 1]
    assert [e[0] for e in sent if e[0] != "digest"] == ["msg", "sum"]   # one transfer
