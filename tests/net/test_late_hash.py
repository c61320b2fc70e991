"""A big file goes out before it is hashed (issue 13: the pick-up SHA-256 pass was
~0.6 s per GiB before the first byte left, a fifth of a 1 GiB transfer).

Two real PeerLinks over a memory stream, LATE_HASH lowered so that a few MiB count as
big. The file is claimed without its SHA-256; the msg goes without it, the hash is
taken in a thread beside the transfer, and a `sum` frame brings it after the data. The
receiver still checks the whole file against a hash taken under a lease, so a file
written to after its claim is failed, never delivered mixed."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import trio
import trustme
from memlink import FakePeer, drop, make_link, node_config, peer_config, scan_sync
from net.test_ack_evidence import run_against
from net.test_busy_resume import big_file, failing_writes, pair, run_until_delivered

from linkd.errors import FileChanged
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
