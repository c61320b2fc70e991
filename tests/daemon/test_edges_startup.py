"""Issue 7 item 9: a big backlog never delays READY, signals, acks or sends.

* Real daemon: 6,000 files waiting in out/ at start. /healthz (READY) answers
  while most of them are still unclaimed, and SIGTERM right then exits 0 at once
  (revision 1 claimed the whole backlog before READY and before reading signals).
* In memory: while pick-up is stuck hashing a file (a slow disk), the channel's
  earlier file is still sent and acknowledged: hashing never holds the channel's
  lock that acks and sends need.
* Issue 13: with 10,000 files already queued, READY comes before the queue's
  claim records are read (counted in /proc/<pid>/io, not timed), the counts are
  right from the first STATUS= line on, `linkctl queue` lists them all, and
  SIGTERM then exits 0.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import trio
import trio.testing
import trustme
from memlink import FakePeer, drop, make_link, node_config, peer_config, scan_sync
from procs import entries, make_pair, stop_all
from spoolkit import FaultyFS

from linkd.cli.status_client import _UnixHTTPConnection
from linkd.net.connection import SessionRunner
from linkd.spool import Outbound, SpoolLayout


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


def read_calls(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("syscr:"))


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_ready_comes_before_the_queue_is_read(tmp_path):
    n = 10_000
    a, b = make_pair(tmp_path, start=False)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        # the queue a previous run left: claimed through Outbound (fsyncs skipped)
        layout = SpoolLayout(a.spool, a.state, "bravo")
        layout.create(["data"], False)
        out = layout.out_dir("data")
        for i in range(n):
            (out / f"q{i:05d}").write_bytes(b"%05d" % i)
            os.utime(out / f"q{i:05d}", ns=(i, i))
        ob = Outbound(layout, "data", 1 << 20, False, fs=FaultyFS(sync=False))
        ob.recover()
        assert len(ob.scan()[0]) == n
        sock.bind(str(sock_path))
        sock.settimeout(120)
        a.env["NOTIFY_SOCKET"] = str(sock_path)
        a.start(wait=False)
        assert a.proc is not None
        while b"READY=1" not in sock.recv(4096):
            pass
        reads = read_calls(a.proc.pid)
        # Revision 2 read all 10,000 records (two read calls each) before READY; now
        # the window (Outbound.WINDOW) and the claims since the last checkpoint.
        assert reads < n, f"{reads} read calls before READY with {n} files queued"
        # the first STATUS= line after READY counts the queue (it said 0 until the
        # first pick-up round had refreshed the counts)
        line = ""
        while "queued" not in line:
            line = sock.recv(4096).decode()
        assert f", {n} queued" in line, line
        channel = a.status()["peers"][0]["channels"][0]
        assert channel["queued"] == n
        peak_before = peak_rss_kib(a.proc.pid)
        listing = subprocess.run([sys.executable, "-m", "linkd.cli.linkctl_main", "-s",
                                  str(a.socket), "queue", "--json"],
                                 capture_output=True, text=True, timeout=60)
        queue = json.loads(listing.stdout)
        # streamed, a few hundred entries at a time: the daemon's peak memory does not
        # grow with the queue (it grew 11 MiB here before, 162 MB with 100,000 queued)
        grown = peak_rss_kib(a.proc.pid) - peak_before
        assert grown < 4096, f"the daemon's peak RSS grew {grown} KiB listing {n} files"
        conn = _UnixHTTPConnection(a.socket, 30)
        conn.request("GET", "/queue")
        response = conn.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert len(json.loads(response.read())) == n
        conn.close()
        assert [e["seq"] for e in queue] == list(range(1, n + 1))
        assert [e["name"] for e in queue[:2]] == ["q00000", "q00001"]
        t1 = time.monotonic()
        assert a.stop() == 0
        assert time.monotonic() - t1 < 10
        print(f"{reads} read calls before READY with {n} queued")
    finally:
        sock.close()
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
