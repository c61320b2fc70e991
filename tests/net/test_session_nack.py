"""Two real PeerLinks over a memory stream: a checksum mismatch is nacked, the pipelined
messages behind it are discarded and resent, and every file arrives exactly once, in order.
The second test pins the inbound worker's half of the discard-until-rewind rule.

The sender's file opens are slowed so that the nack reliably arrives while the sender is
waiting on one: the message it was about to start must not go out carrying the rewind
flag past the nacked message.
"""

import hashlib
import os
import threading
import time

import trio
import trio.lowlevel
import trio.testing
import trustme
from memlink import drop, make_link, node_config, peer_config, run_pair, scan_sync

from linkd.net.connection import SessionRunner
from linkd.proto import session as S


async def test_a_nacked_message_is_resent_and_nothing_behind_it_is_lost(tmp_path, monkeypatch):
    ca = trustme.CA()
    a = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")]), "alpha")
    payloads = {f"m{i:02d}.bin": os.urandom(1000 + i) for i in range(20)}
    for name, data in payloads.items():
        drop(a, "data", name, data)
    scan_sync(a)

    inbound = b.inbound["data"]
    real_write = inbound.write
    corrupted = []

    def corrupting_write(data):
        if not corrupted:                        # the first chunk of the first message
            corrupted.append(True)
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return real_write(data)
    inbound.write = corrupting_write

    outbound = a.outbound["data"]
    real_open, real_read = outbound.open, outbound.read_whole

    def slow_open(item):
        time.sleep(0.01)
        return real_open(item)

    def slow_read(items):
        time.sleep(0.01)
        return real_read(items)
    outbound.open, outbound.read_whole = slow_open, slow_read
    # one small file per read hop, so that the nack can arrive during any of them
    monkeypatch.setattr("linkd.net.sender.PREFETCH_FILES", 1)

    in_dir = b.layout.in_dir("data")
    await run_pair(a, b)

    assert corrupted, "the fault was never injected"
    delivered = {p.name: p.read_bytes() for p in in_dir.iterdir()}
    assert delivered == payloads                 # exactly once, byte-identical
    assert outbound.pending() == [] and outbound.acked == len(payloads)
    assert b.status.channel("data").quarantined == 1
    assert b.status.channel("data").received == len(payloads)
    assert a.status.channel("data").sent == len(payloads)
    assert inbound.committed == len(payloads)


async def test_events_queued_before_the_nack_are_discarded_by_the_inbound_worker(tmp_path):
    """The receiving session discards a channel's frames only from the moment the worker's
    nack reaches it; events of later messages already queued for the worker by then
    (the sender pipelines) must be discarded by the worker too, until the sender's
    rewind. Here the worker is held in its first thread hop until the events of the
    third message are queued, so messages 2 and 3 are always behind the nack of 1: were
    they written, they would be committed before 1, which would arrive out of order."""
    ca = trustme.CA()
    a = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")]), "alpha")
    names = [f"m{i:02d}.bin" for i in range(5)]
    payloads = {name: os.urandom(1000 + i) for i, name in enumerate(names)}
    for name in names:
        drop(a, "data", name, payloads[name])
    scan_sync(a)

    inbound = b.inbound["data"]
    real_write, real_begin = inbound.write, inbound.begin
    corrupted = []
    third_queued = threading.Event()    # the events of message 3 are in the worker's queue
    held = []

    def corrupting_write(data):
        if not corrupted:                        # the first chunk of the first message
            corrupted.append(True)
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return real_write(data)

    def held_begin(seq, *args, **kwargs):
        if not held:                             # the worker's first hop: wait (a thread)
            held.append(third_queued.wait(timeout=30))
        return real_begin(seq, *args, **kwargs)
    inbound.write, inbound.begin = corrupting_write, held_begin

    left, right = trio.testing.memory_stream_pair()
    ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
    real_dispatch = rb._dispatch

    def dispatch(events):
        real_dispatch(events)
        if any(isinstance(ev, S.MessageComplete) and ev.seq == 3 for ev in events):
            third_queued.set()
    rb._dispatch = dispatch
    a.take_slot(ra), b.take_slot(rb)
    outbound = a.outbound["data"]
    with trio.fail_after(30):      # without the worker's rule: stuck on a stale nack
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            while outbound.pending():  # noqa: ASYNC110 (acknowledged = durable in bravo's in/)
                await trio.sleep(0.01)
            await ra.close("done")
            nursery.cancel_scope.cancel()

    assert held == [True], "the worker was not held until message 3 was queued"
    assert corrupted and b.status.channel("data").quarantined == 1
    # every file exactly once, byte-identical, and committed in the order it was queued
    delivered = {p.name: p.read_bytes() for p in b.layout.in_dir("data").iterdir()}
    assert delivered == payloads
    assert inbound.committed == len(names)
    assert [inbound.lookup(seq)["sent_name"] for seq in range(1, len(names) + 1)] == names
    assert outbound.pending() == [] and outbound.acked == len(names)


async def test_a_batch_that_fails_after_a_refusal_still_nacks_the_oldest(tmp_path,
                                                                         monkeypatch):
    """Found by review: message 5 completes and message 6 starts in one batch while the
    audit log has failed. 6 is refused (a busy nack, which starts discarding and
    forgets 5 as unacknowledged), then 5's commit fails (its audit line cannot be made
    durable) and the batch's nacks are lost with it. The worker must still nack 5 --
    it sent nothing, and the channel waited for ever."""
    from linkd.evidence import audit as A

    async def inline(fn, *args, **kwargs):
        await trio.lowlevel.checkpoint()
        return fn(*args)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    ca = trustme.CA()
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")]), "alpha")
    log = A.AuditLog(tmp_path / "audit", "bravo", None)
    log.open()
    A.install(log)
    try:
        runner = SessionRunner(b, trio.testing.MemorySendStream(), remote="a",
                               dialed_by_us=False, tls_info=None)
        runner.session = S.Session(node="bravo", peer="alpha", now=0.0,
                                   channels=runner.hello_channels())
        nacks: list[tuple[str, int, str]] = []
        monkeypatch.setattr(runner.session, "send_nack",
                            lambda ch, seq, reason, *rest: nacks.append((ch, seq, reason)))
        monkeypatch.setattr(runner.session, "send_ack", lambda *a, **k: None)
        monkeypatch.setattr(runner.session, "grant", lambda *a, **k: None)
        send, receive = trio.open_memory_channel[S.MessageEvent](100)
        runner.inbound_qs = {"data": (send, receive)}
        b.inbound["data"].recover()
        body = b"x" * 10
        sha = hashlib.sha256(body).digest()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner._inbound_worker, receive)
            send.send_nowait(S.MessageStart("data", 5, "five", 10, sha, 0))
            await trio.testing.wait_all_tasks_blocked()
            log.failed = OSError(28, "No space left on device")
            for ev in (S.MessageData("data", 5, 0, body), S.MessageComplete("data", 5),
                       S.MessageStart("data", 6, "six", 10, sha, 0)):
                send.send_nowait(ev)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    finally:
        A.install(None)
        log.close()
    assert [(ch, seq) for ch, seq, _ in nacks] == [("data", 5)], nacks
    assert "receiver cannot store it now" in nacks[0][2]
