"""Issue 13: the sender keeps only a window of the queue loaded. Two real
PeerLinks over a memory stream, the window shrunk to 8 items: a queue of 40
files claimed before a restart (so after recovery most of it is in the compact
index, unread) is sent in full, in order, each file once, the window refilled
as acknowledgements make room; a sender that depended on the whole queue being
loaded would stop after the first window.
"""

import json
import os

import trio
import trio.testing
import trustme
from memlink import drop, make_link, node_config, peer_config, scan_sync

from linkd.net.connection import SessionRunner
from linkd.spool import Outbound


async def test_a_queue_longer_than_the_window_is_sent_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(Outbound, "WINDOW", 8)
    monkeypatch.setattr(Outbound, "CHECKPOINT_EVERY", 8)
    ca = trustme.CA()
    cfg_a = node_config(tmp_path, ca, "alpha", [peer_config("bravo")])
    first = make_link(cfg_a, "bravo")
    payloads = {f"m{i:02d}.bin": os.urandom(100 + i) for i in range(40)}
    for name, data in payloads.items():
        drop(first, "data", name, data)
    scan_sync(first)
    assert len(first.outbound["data"]._pending) == 8

    a = make_link(cfg_a, "bravo")                   # a restart: recovery, window of 8
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")]), "alpha")
    outbound = a.outbound["data"]
    assert a.status.channel("data").queued == 0     # (not refreshed by make_link)
    a.refresh_queued()
    assert a.status.channel("data").queued == 40
    left, right = trio.testing.memory_stream_pair()
    ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
    a.take_slot(ra), b.take_slot(rb)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            while outbound.queue_stats()[0]:    # noqa: ASYNC110 (acked = durable in in/)
                assert len(outbound._pending) <= 8
                await trio.sleep(0.01)
            await ra.close("done")
            nursery.cancel_scope.cancel()

    in_dir = b.layout.in_dir("data")
    assert {p.name: p.read_bytes() for p in in_dir.iterdir()} == payloads
    journal = b.layout.journal_file("data").read_text()
    order = [json.loads(line)["name"] for line in journal.splitlines()]
    assert order == sorted(payloads)               # pick-up order
    assert a.status.channel("data").sent == 40 and outbound.acked == 40
