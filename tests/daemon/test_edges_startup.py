"""Issue 7 item 9: a big backlog never delays READY, signals, acks or sends.

* Real daemon: 6,000 files waiting in out/ at start. /healthz (READY) answers
  while most of them are still unclaimed, and SIGTERM right then exits 0 at once
  (revision 1 claimed the whole backlog before READY and before reading signals).
* In memory: while pick-up is stuck hashing a file (a slow disk), the channel's
  earlier file is still sent and acknowledged: hashing never holds the channel's
  lock that acks and sends need.
"""

import threading
import time

import trio
import trio.testing
import trustme
from memlink import FakePeer, drop, make_link, node_config, peer_config, scan_sync
from procs import entries, make_pair, stop_all

from linkd.net.connection import SessionRunner


def test_ready_and_sigterm_do_not_wait_for_the_backlog(tmp_path):
    a, b = make_pair(tmp_path, start=False)
    try:
        out = a.out_dir("bravo", "data")
        out.mkdir(parents=True)
        for i in range(6000):
            (out / f"f{i:05d}.txt").write_bytes(b"x" * 100)
        t0 = time.monotonic()
        a.start()                                   # waits for /healthz
        ready_after = time.monotonic() - t0
        left = len(entries(out))
        assert left > 3000, f"READY came only after {6000 - left} of 6000 files were claimed"
        t1 = time.monotonic()
        assert a.stop() == 0
        assert time.monotonic() - t1 < 10
        print(f"READY after {ready_after:.2f}s with {left} of 6000 files still in out/")
    finally:
        stop_all(a, b)


async def test_hashing_a_file_never_holds_back_acks_or_sends(tmp_path):
    ca = trustme.CA()
    link = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")
    drop(link, "data", "first.txt", b"first")
    scan_sync(link)
    drop(link, "data", "huge.bin", b"h" * 1000)
    outbound = link.outbound["data"]
    real_examine = outbound.examine
    release = threading.Event()
    hashing = threading.Event()

    def slow_examine(*args, **kwargs):
        hashing.set()
        release.wait(30)                            # a very slow disk
        return real_examine(*args, **kwargs)
    outbound.examine = slow_examine
    left, right = trio.testing.memory_stream_pair()
    peer = FakePeer(right)
    runner = SessionRunner(link, left, remote="memory", dialed_by_us=True, tls_info=None)
    link.take_slot(runner)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.run)
                nursery.start_soon(runner.run)
                await nursery.start(link.pickup)
                while not hashing.is_set():  # noqa: ASYNC110 (a worker thread)
                    await trio.sleep(0.01)
                while link.status.channel("data").sent < 1:  # noqa: ASYNC110 (spool threads)
                    await trio.sleep(0.01)
                assert not release.is_set()
                release.set()
                nursery.cancel_scope.cancel()
    finally:
        release.set()
    assert [peer.names[k] for k in peer.complete] == ["first.txt"]
