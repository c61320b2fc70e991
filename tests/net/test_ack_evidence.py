"""An ack is evidence, not a number (issue 7 item 3): a real PeerLink + SessionRunner
against a FakePeer that lies. Nothing may be resolved (deleted, logged sent) on an
acknowledgement that does not name what was sent, or that names a message never sent;
a peer claiming to have committed more than we ever sent resolves nothing."""

import dataclasses
import errno
import hashlib
import os

import pytest
import trio
import trio.testing
import trustme
from memlink import FakePeer, drop, make_link, node_config, peer_config, scan_sync

from linkd.net.connection import SessionRunner
from linkd.proto import frames as F
from linkd.proto.framing import encode_frame
from linkd.spool.outbound_items import FRESH


@pytest.fixture
def link(tmp_path):
    ca = trustme.CA()
    return make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")


def runner_for(link, stream):
    runner = SessionRunner(link, stream, remote="memory", dialed_by_us=True, tls_info=None)
    link.take_slot(runner)
    return runner


async def run_against(link, peer, until):
    left, right = trio.testing.memory_stream_pair()
    peer.stream = right
    runner = runner_for(link, left)
    # Generous in virtual time: under autojump_clock the clock runs ahead while a
    # spool thread (fsync of the queue, of the receipt store) is busy.
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)

            async def run_runner():
                runner.result = await runner.run()
                nursery.cancel_scope.cancel()
            nursery.start_soon(run_runner)
            await until(runner, peer)
            nursery.cancel_scope.cancel()
    return runner


async def test_an_ack_naming_other_content_ends_the_session_and_resolves_nothing(link):
    payload = os.urandom(30_000)
    drop(link, "data", "case.pdf", payload)
    scan_sync(link)
    lie = lambda e: dataclasses.replace(e, sha256=b"\0" * 32)  # noqa: E731
    peer = FakePeer(None, forge=lie)

    async def until(runner, peer):
        await trio.sleep_forever()          # the runner ends the session itself
    runner = await run_against(link, peer, until)
    reason, error = runner.result
    assert error and "protocol violation" in reason and "other content" in reason, reason
    assert [i.name for i in link.outbound["data"].pending()] == ["case.pdf"]
    assert link.status.channel("data").sent == 0


async def test_an_ack_for_a_message_never_sent_ends_the_session(link):
    drop(link, "data", "a.txt", b"a")
    scan_sync(link)
    peer = FakePeer(None, ack=False)
    entry = F.AckEntry(99, hashlib.sha256(b"a").digest(), 1, "a.txt", "a.txt", 1.0)

    async def until(runner, peer):
        await runner.opened.wait()
        while ("data", 1) not in peer.complete:  # noqa: ASYNC110 (the peer's side of the wire)
            await trio.sleep(0.01)
        await peer.send_raw(encode_frame(F.Ack("data", (entry,))))
        await trio.sleep_forever()
    runner = await run_against(link, peer, until)
    reason, error = runner.result
    assert error and "not in flight" in reason, reason
    assert [i.name for i in link.outbound["data"].pending()] == ["a.txt"]


async def test_a_nack_for_a_message_never_sent_ends_the_session(link):
    drop(link, "data", "a.txt", b"a")
    scan_sync(link)
    peer = FakePeer(None, ack=False)

    async def until(runner, peer):
        await runner.opened.wait()
        await peer.send_raw(encode_frame(F.Nack("data", 7, "no", True)))
        await trio.sleep_forever()
    runner = await run_against(link, peer, until)
    reason, error = runner.result
    assert error and "not in flight" in reason, reason
    assert [i.name for i in link.outbound["data"].pending()] == ["a.txt"]


async def test_a_peer_claiming_a_high_committed_seq_resolves_nothing_unsent(link):
    """Today's bug: hello c=3 'acknowledged' files claimed as 1..3 after a state loss.
    Now they are probed; the peer holds other content there (here: it has no record,
    so it answers with the empty body it got), they are renumbered above 1000 and sent
    in full before they count as sent."""
    payloads = {f"f{i}.bin": os.urandom(5000 + i) for i in range(3)}
    for name, data in payloads.items():
        drop(link, "data", name, data)
    scan_sync(link)
    assert [i.seq for i in link.outbound["data"].pending()] == [1, 2, 3]
    peer = FakePeer(None, committed=1000)

    async def until(runner, peer):
        while link.status.channel("data").sent < 3:  # noqa: ASYNC110 (resolved in a thread)
            await trio.sleep(0.01)
    runner = await run_against(link, peer, until)
    assert not hasattr(runner, "result"), runner.result     # the session is still up
    assert link.outbound["data"].pending() == []
    full = {peer.names[k]: peer.sha(*k) for k in peer.complete if k[1] > 1000}
    assert full == {n: hashlib.sha256(d).hexdigest() for n, d in payloads.items()}
    assert link.status.channel("data").sent == 3
    assert link.outbound["data"].next_seq > 1003


async def test_a_probe_ignores_the_peers_size_limit(link):
    """The peer took the file before it lowered its limit (campaign seed 1733724005):
    the probe carries no data, the peer says it holds it, the file is sent, not failed
    (it used to be failed as 'over the peer's max_message_bytes' while delivered)."""
    payload = os.urandom(5000)
    drop(link, "data", "big.bin", payload)
    scan_sync(link)
    peer = FakePeer(None, committed=1, max_bytes=1000, holds={("data", 1): payload})

    async def until(runner, peer):
        stats = link.status.channel("data")
        while stats.sent + stats.failed < 1:  # noqa: ASYNC110 (resolved in a thread)
            await trio.sleep(0.01)
    runner = await run_against(link, peer, until)
    assert not hasattr(runner, "result"), runner.result
    assert list(link.layout.failed_dir("data").iterdir()) == []
    assert link.outbound["data"].pending() == [] and link.status.channel("data").sent == 1


# -- a queued file that cannot be read (issue 7 item 4) ------------------------------------


class _BadFile:
    def read(self, n):
        raise OSError(errno.EIO, "Input/output error")

    def readinto(self, buffer):         # how the sender reads a big file
        raise OSError(errno.EIO, "Input/output error")

    def close(self):
        pass


@pytest.fixture
def quick_retry(monkeypatch):
    # Real time, not an autojump clock: spool work runs in threads, and a MockClock
    # would leap to the test's own deadline while a thread is slow on a loaded machine.
    monkeypatch.setattr("linkd.net.sender.READ_RETRY", 0.05)


async def test_a_file_that_cannot_be_read_is_failed_and_wedges_nothing(tmp_path, quick_retry):
    """EIO reading a queued file used to end every session of the peer, forever. Now
    it is retried a few times, then failed with the reason; the session stays up and
    the other files of the channel and of other channels flow."""
    ca = trustme.CA()
    link = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo",
                                                                     ("data", "other"))]),
                     "bravo")
    drop(link, "data", "bad.bin", os.urandom(300_000))
    drop(link, "data", "next.bin", b"next")
    drop(link, "other", "good.bin", b"good")
    scan_sync(link)
    spool = link.spools["data"]
    real_open = spool.open
    opened = []

    async def failing_open(item, offset, *args, **kwargs):
        fh = await real_open(item, offset, *args, **kwargs)
        if item.name == "bad.bin":
            fh.close()
            opened.append(item.seq)
            return _BadFile()
        return fh
    spool.open = failing_open
    peer = FakePeer(None, channels=("data", "other"))

    async def until(runner, peer):
        while link.status.channel("data").failed < 1 or \
                link.status.channel("data").sent < 1:  # noqa: ASYNC110 (spool threads)
            await trio.sleep(0.05)
    runner = await run_against(link, peer, until)
    assert not hasattr(runner, "result"), runner.result     # the session stayed up
    assert len(opened) == 3                                 # MAX_ATTEMPTS tries
    failed = link.layout.failed_dir("data")
    assert sorted(p.name for p in failed.iterdir()) == ["bad.bin", "bad.bin.reason"]
    assert "Input/output error" in (failed / "bad.bin.reason").read_text()
    assert {peer.names[k] for k in peer.complete} >= {"next.bin", "good.bin"}


async def test_resource_errors_delay_a_send_but_never_fail_the_file(tmp_path, quick_retry,
                                                                   monkeypatch):
    monkeypatch.setattr(FRESH, "limit", 0)      # read from the queue, as after a restart
    ca = trustme.CA()
    link = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")
    drop(link, "data", "fine.bin", b"fine")
    scan_sync(link)
    spool = link.spools["data"]
    real_open, real_read = spool.open, spool.read_whole
    refusals = []

    async def emfile_open(item, offset, *args, **kwargs):
        if len(refusals) < 5:
            refusals.append(item.seq)
            raise OSError(errno.EMFILE, "Too many open files")
        return await real_open(item, offset, *args, **kwargs)

    async def emfile_read(items):      # small files are read whole, a batch per hop
        if len(refusals) < 5:
            refusals.append(items[0].seq)
            return [OSError(errno.EMFILE, "Too many open files")]   # the batch stops
        return await real_read(items)
    spool.open, spool.read_whole = emfile_open, emfile_read
    peer = FakePeer(None)

    async def until(runner, peer):
        while link.status.channel("data").sent < 1:  # noqa: ASYNC110 (spool threads)
            await trio.sleep(0.05)
    await run_against(link, peer, until)
    assert len(refusals) == 5 and link.status.channel("data").failed == 0
    assert not list(link.layout.failed_dir("data").iterdir())
