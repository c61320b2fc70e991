"""Small files are sent a batch per thread hop (issue 13): counted, never timed.

A real PeerLink + SessionRunner against a FakePeer over memory streams (or two real
PeerLinks). The sender sends a small file's content as pick-up read and hashed it
(no second read, no thread hop); what pick-up did not keep (after a restart, or
over the budget: the `no_fresh` tests) it reads whole, several per hop, each file
once, its SHA-256 checked against the claim before anything of it is on the wire,
and writes runs of small messages out together; acknowledgements are resolved,
receipts and all, in one hop per batch; the receiver checks its folders once per
batch, not once per message.
"""

import gc
import os
import threading

import pytest
import structlog
import trio
import trio.testing
import trustme
from memlink import FakePeer, drop, make_link, node_config, peer_config, scan_sync
from test_ack_evidence import run_against

from linkd.net import sender as sender_mod
from linkd.net.connection import SessionRunner
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.proto.framing import DEFAULT_MAX_FRAME, FrameDecoder
from linkd.spool import Inbound, Outbound, SpoolLayout
from linkd.spool.outbound_items import FRESH


@pytest.fixture
def no_fresh(monkeypatch):
    """Pick-up keeps nothing for the sender (as after a restart): it reads."""
    monkeypatch.setattr(FRESH, "limit", 0)


def _link(tmp_path):
    ca = trustme.CA()
    return make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")


def _count_calls(monkeypatch, cls, name):
    calls = []
    real = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        calls.append(args)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, name, wrapper)
    return calls


def _overwrite_keeping_mtime(path, data):
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def _until_sent(link, n):
    async def until(runner, peer):
        while link.status.channel("data").sent < n:  # noqa: ASYNC110 (resolved in a thread)
            await trio.sleep(0.01)
    return until


async def test_small_files_are_read_a_batch_per_hop_and_each_file_once(tmp_path, monkeypatch,
                                                                     no_fresh):
    link = _link(tmp_path)
    n = 150
    payloads = {f"m{i:03d}.bin": os.urandom(4096) for i in range(n)}
    for name, data in payloads.items():
        drop(link, "data", name, data)
    scan_sync(link)
    reads = _count_calls(monkeypatch, Outbound, "read_whole")
    opens = _count_calls(monkeypatch, Outbound, "open")
    peer = FakePeer(None)
    runner = await run_against(link, peer, await _until_sent(link, n))
    assert not hasattr(runner, "result"), runner.result
    read = [i.name for (items,) in reads for i in items]
    assert sorted(read) == sorted(payloads)             # every file read exactly once
    per_hop = sender_mod.PREFETCH_FILES
    assert len(reads) <= -(-n // per_hop) + 1, [len(b) for (b,) in reads]
    assert all(sum(i.size for i in b) <= sender_mod.PREFETCH_BYTES for (b,) in reads)
    assert opens == []                                  # no per-file open hop
    got = {peer.names[k]: bytes(peer.bodies[k]) for k in peer.complete}
    assert got == payloads


async def test_small_files_go_out_as_picked_up_without_being_read_again(tmp_path, monkeypatch):
    link = _link(tmp_path)
    n = 150
    payloads = {f"m{i:03d}.bin": os.urandom(4096) for i in range(n)}
    for name, data in payloads.items():
        drop(link, "data", name, data)
    before = FRESH.in_use()
    scan_sync(link)
    assert FRESH.in_use() == before + n * 4096          # kept at pick-up, counted
    reads = _count_calls(monkeypatch, Outbound, "read_whole")
    opens = _count_calls(monkeypatch, Outbound, "open")
    peer = FakePeer(None)
    runner = await run_against(link, peer, await _until_sent(link, n))
    assert not hasattr(runner, "result"), runner.result
    assert reads == [] and opens == []              # no second read, no thread hop
    got = {peer.names[k]: bytes(peer.bodies[k]) for k in peer.complete}
    assert got == payloads
    assert FRESH.in_use() == before                     # all of it given back


async def test_what_pick_up_keeps_is_bounded_for_the_whole_daemon(tmp_path, monkeypatch):
    """Over the budget, the rest is read from the queue as after a restart: every
    file still goes out, each read at most once."""
    monkeypatch.setattr(FRESH, "limit", FRESH.in_use() + 10 * 4096)
    link = _link(tmp_path)
    payloads = {f"m{i:03d}.bin": os.urandom(4096) for i in range(40)}
    for name, data in payloads.items():
        drop(link, "data", name, data)
    scan_sync(link)
    assert FRESH.in_use() == FRESH.limit
    reads = _count_calls(monkeypatch, Outbound, "read_whole")
    peer = FakePeer(None)
    await run_against(link, peer, await _until_sent(link, 40))
    read = sorted(i.name for (items,) in reads for i in items)
    assert read == sorted(payloads)[10:]            # the first ten were kept
    got = {peer.names[k]: bytes(peer.bodies[k]) for k in peer.complete}
    assert got == payloads


async def test_a_small_file_changed_after_its_claim_goes_as_claimed_and_is_logged(tmp_path):
    """Same size, mtime put back: only its ctime says so. The peer gets the content
    the SHA-256 was taken over at pick-up; the change is logged (CONTRACT §3)."""
    link = _link(tmp_path)
    for name in ("a.bin", "b.bin", "c.bin"):
        drop(link, "data", name, name[0].encode() * 100)
    scan_sync(link)
    item = next(i for i in link.outbound["data"].pending() if i.name == "b.bin")
    _overwrite_keeping_mtime(item.path, b"X" * 100)
    peer = FakePeer(None)
    with structlog.testing.capture_logs() as logs:
        await run_against(link, peer, await _until_sent(link, 3))
    got = {peer.names[k]: bytes(peer.bodies[k]) for k in peer.complete}
    assert got == {"a.bin": b"a" * 100, "b.bin": b"b" * 100, "c.bin": b"c" * 100}
    assert [e["name"] for e in logs if e["event"] == "message_changed"] == ["b.bin"]
    assert not (link.layout.failed_dir("data") / "b.bin").exists()


async def test_acks_resolve_with_their_receipts_in_one_hop_per_batch(tmp_path, monkeypatch):
    link = _link(tmp_path)
    n = 40
    for i in range(n):
        drop(link, "data", f"m{i:03d}.bin", os.urandom(1000))
    scan_sync(link)
    hops = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):
        hops.append(getattr(fn, "__qualname__", repr(fn)))
        return await real(fn, *args, **kwargs)
    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    resolves = _count_calls(monkeypatch, Outbound, "resolve")
    await run_against(link, FakePeer(None), await _until_sent(link, n))
    # the receipts are stored inside the resolving hop, never in a hop of their own
    assert not any("_store_receipts" in h for h in hops), hops
    assert sum(len(seqs) for (seqs, *_rest) in resolves) == n
    assert len(resolves) == sum("resolve" in h for h in hops)


async def test_a_small_file_changed_after_pick_up_is_failed_before_it_is_sent(tmp_path,
                                                                             no_fresh):
    """Same size, mtime put back: only the content differs from the claim. The batch
    read checks the SHA-256, so nothing of it goes on the wire; the files around it
    are sent."""
    link = _link(tmp_path)
    drop(link, "data", "a.bin", b"a" * 100)
    drop(link, "data", "b.bin", b"b" * 100)
    drop(link, "data", "c.bin", b"c" * 100)
    scan_sync(link)
    item = next(i for i in link.outbound["data"].pending() if i.name == "b.bin")
    _overwrite_keeping_mtime(item.path, b"X" * 100)
    peer = FakePeer(None)

    async def until(runner, peer):
        stats = link.status.channel("data")
        while stats.sent < 2 or stats.failed < 1:  # noqa: ASYNC110 (resolved in a thread)
            await trio.sleep(0.01)
    await run_against(link, peer, until)
    assert sorted(peer.names[k] for k in peer.complete) == ["a.bin", "c.bin"]
    assert "b.bin" not in [f.name for _t, f in peer.of(F.Msg)]
    reason = (link.layout.failed_dir("data") / "b.bin.reason").read_text()
    assert "SHA-256" in reason, reason


async def test_a_big_file_ends_a_batch_and_is_streamed_in_order(tmp_path, monkeypatch,
                                                                no_fresh):
    link = _link(tmp_path)
    monkeypatch.setattr(sender_mod, "PREFETCH_BYTES", 3000)
    sizes = [1000, 1000, 1000, 1000, 300_000, 1000]
    for i, size in enumerate(sizes):
        drop(link, "data", f"m{i}.bin", os.urandom(size))
    scan_sync(link)
    reads = _count_calls(monkeypatch, Outbound, "read_whole")
    opens = _count_calls(monkeypatch, Outbound, "open")
    peer = FakePeer(None)
    await run_against(link, peer, await _until_sent(link, len(sizes)))
    assert [[i.name for i in b] for (b,) in reads] == \
        [["m0.bin", "m1.bin", "m2.bin"], ["m3.bin"], ["m5.bin"]]    # bounded in bytes
    assert [i.name for (i,) in opens] == ["m4.bin"]
    assert [peer.names[k] for k in sorted(peer.complete)] == [f"m{i}.bin" for i in
                                                               range(len(sizes))]


async def test_small_messages_share_their_tls_writes(tmp_path, monkeypatch):
    """One flush for a run of small messages, not one per message."""
    link = _link(tmp_path)
    n = 200
    for i in range(n):
        drop(link, "data", f"m{i:03d}.bin", os.urandom(500))
    scan_sync(link)
    writes = []
    real = S.Session.data_to_send

    def counting(self, now):
        data = real(self, now)
        if data and self.node == "alpha":       # our side's writes, not the fake peer's
            writes.append(len(data))
        return data
    monkeypatch.setattr(S.Session, "data_to_send", counting)
    await run_against(link, FakePeer(None), await _until_sent(link, n))
    assert len(writes) <= n // 4, len(writes)


async def test_the_receiver_checks_its_folders_once_per_batch(tmp_path, monkeypatch):
    ca = trustme.CA()
    a = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")]), "alpha")
    n = 120
    for i in range(n):
        drop(a, "data", f"m{i:03d}.bin", os.urandom(700))
    scan_sync(a)
    begins, checks = [], []
    real_begin, real_check = Inbound.begin, SpoolLayout.check

    def counting_begin(self, *args, **kwargs):
        begins.append(args[0])
        return real_begin(self, *args, **kwargs)

    def counting_check(self, *folders):
        if self.peer == "alpha":                # bravo's spool of what alpha sends
            checks.append(folders)
        return real_check(self, *folders)
    monkeypatch.setattr(Inbound, "begin", counting_begin)
    monkeypatch.setattr(SpoolLayout, "check", counting_check)
    left, right = trio.testing.memory_stream_pair()
    ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
    a.take_slot(ra), b.take_slot(rb)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            while a.outbound["data"].pending():  # noqa: ASYNC110 (acked = durable at bravo)
                await trio.sleep(0.01)
            await ra.close("done")
            nursery.cancel_scope.cancel()
    assert sorted(begins) == list(range(1, n + 1))
    tmp = b.layout.tmp_dir()
    per_message = sum(1 for folders in checks if folders == (tmp,))
    assert per_message <= n // 4, (per_message, n)
    assert len(os.listdir(b.layout.in_dir("data"))) == n


async def test_a_write_never_holds_one_channels_messages_behind_anothers(tmp_path, monkeypatch):
    """Coalescing is per run of one channel: turning to another channel (a priority
    file among bulk ones) flushes first, so no write carries a message of one
    channel queued before a step of another."""
    ca = trustme.CA()
    link = make_link(node_config(tmp_path, ca, "alpha", [peer_config(
        "bravo", (("data", 0), ("alerts", 10)))]), "bravo")
    for i in range(40):
        drop(link, "data", f"d{i:02d}.bin", os.urandom(500))
        drop(link, "alerts", f"a{i:02d}.bin", os.urandom(300))
    scan_sync(link)
    writes = []
    real = S.Session.data_to_send

    def recording(self, now):
        data = real(self, now)
        if data and self.node == "alpha":
            writes.append(data)
        return data
    monkeypatch.setattr(S.Session, "data_to_send", recording)
    await run_against(link, FakePeer(None, channels=("data", "alerts")),
                      await _until_sent(link, 40))
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    mixed = []
    for data in writes:
        decoder.feed(data)
        channels = []
        while (frame := decoder.next_frame()) is not None:
            if isinstance(frame, (F.Msg, F.Data)) and frame.ch not in channels:
                channels.append(frame.ch)
        if len(channels) > 1:
            mixed.append(channels)
    assert mixed == []
    assert len(writes) < 80                     # still fewer writes than messages


def test_an_outbound_collected_inside_the_budgets_lock_does_not_hang_its_thread(tmp_path):
    """The full suite hung: a claim allocated under FRESH.lock, the allocation ran the
    garbage collector, which finalized an old Outbound, whose finalizer waited for the
    lock that its own thread held."""
    link = _link(tmp_path)
    drop(link, "data", "a.bin", b"a" * 100)
    scan_sync(link)
    before = FRESH.in_use()
    out = link.outbound.pop("data")
    link.spools.pop("data")
    assert out.has_fresh(1)
    del link
    done = threading.Event()

    def collect_under_the_lock():
        nonlocal out
        with FRESH.lock:
            del out                     # the last reference: its finalizer runs here
            gc.collect()
        done.set()
    worker = threading.Thread(target=collect_under_the_lock, daemon=True)
    worker.start()
    assert done.wait(10), "the finalizer waited for the lock its thread held"
    assert FRESH.in_use() == before - 100           # given back all the same
