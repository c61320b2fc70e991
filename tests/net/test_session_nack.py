"""Two real PeerLinks over a memory stream: a checksum mismatch is nacked, the pipelined
messages behind it are discarded and resent, and every file arrives exactly once, in order.

The sender's file opens are slowed so that the nack reliably arrives while the sender is
waiting on one: the message it was about to start must not go out carrying the rewind
flag past the nacked message.
"""

import os
import time

import trio
import trio.testing
import trustme
from memlink import drop, make_link, node_config, peer_config, scan_sync

from linkd.net.connection import SessionRunner


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

    left, right = trio.testing.memory_stream_pair()
    ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
    a.take_slot(ra), b.take_slot(rb)
    in_dir = b.layout.in_dir("data")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            while outbound.pending():  # noqa: ASYNC110 (acknowledged = durable in bravo's in/)
                await trio.sleep(0.01)
            await ra.close("done")
            nursery.cancel_scope.cancel()

    assert corrupted, "the fault was never injected"
    delivered = {p.name: p.read_bytes() for p in in_dir.iterdir()}
    assert delivered == payloads                 # exactly once, byte-identical
    assert outbound.pending() == [] and outbound.acked == len(payloads)
    assert b.status.channel("data").quarantined == 1
    assert b.status.channel("data").received == len(payloads)
    assert a.status.channel("data").sent == len(payloads)
    assert inbound.committed == len(payloads)
