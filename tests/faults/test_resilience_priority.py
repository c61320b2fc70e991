"""Priorities across channels with real daemons: a big low-priority transfer does not
hold back small high-priority messages (CONTRACT §4.4), and memory stays bounded.

Latency here is pick-up-to-delivery: from the moment the test renamed the file
into out/alerts/ to the receiver's `message_delivered` timestamp (same machine,
same clock). bench/bench_priority.py measures the same thing with inotify.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

import pytest
from procs import assert_exactly_once, proc_rss_bytes, wait_for

CHANNELS = [{"name": "bulk", "priority": 0}, {"name": "alerts", "priority": 10}]


def partial_bytes(d, peer: str) -> int:
    tmp = d.spool / peer / "tmp"
    return sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class RssSampler(threading.Thread):
    def __init__(self, *pids: int) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for pid in self.pids:
                try:
                    self.peak[pid] = max(self.peak[pid], proc_rss_bytes(pid))
                except OSError:
                    pass


@pytest.mark.parametrize("mib", [200, pytest.param(500, marks=pytest.mark.slow)])
def test_small_high_priority_files_overtake_a_big_transfer(pair, mib):
    a, b = pair(channels=CHANNELS)
    big = os.urandom(mib << 20)
    rss = RssSampler(a.proc.pid, b.proc.pid)
    rss.start()
    a.drop("bravo", "bulk", "big.bin", big)
    wait_for(lambda: partial_bytes(b, "alpha") > 0, 60, interval=0.002)
    dropped: dict[str, float] = {}
    alerts: dict[str, bytes] = {}
    i = 0
    while "big.bin" not in b.inbound("alpha", "bulk") and i < 500:
        name = f"alert{i:04d}.txt"
        alerts[name] = os.urandom(2000)
        a.drop("bravo", "alerts", name, alerts[name])
        dropped[name] = time.time()
        i += 1
        time.sleep(0.02)
    wait_for(lambda: len(b.inbound("alpha", "alerts")) == len(alerts)
             and "big.bin" in b.inbound("alpha", "bulk"), 120, interval=0.1)
    rss.stop.set()
    rss.join()
    assert_exactly_once(b, "alpha", "alerts", alerts)
    assert_exactly_once(b, "alpha", "bulk", {"big.bin": big})
    delivered = {e["name"]: dt.datetime.fromisoformat(e["timestamp"]).timestamp()
                 for e in b.events("message_delivered")}
    bulk_done = delivered["big.bin"]
    during = [n for n in alerts if delivered[n] < bulk_done]
    lat = [delivered[n] - dropped[n] for n in during]
    assert len(during) >= 20, f"only {len(during)} alerts went while the bulk file streamed"
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    print(f"\n{len(during)} alerts during a {mib} MiB bulk transfer: pick-up-to-delivery p50 "
          f"{p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms; "
          f"peak RSS alpha {rss.peak[a.proc.pid] >> 20} MiB, "
          f"bravo {rss.peak[b.proc.pid] >> 20} MiB")
    assert p99 < 1.0
    # Bounded memory: neither side holds the file (or more than its credit windows).
    for pid in (a.proc.pid, b.proc.pid):
        assert rss.peak[pid] < 160 << 20, rss.peak


def test_picking_up_a_big_file_does_not_delay_another_channels_pick_up(pair):
    """Claiming hashes the whole file (about 1 s for 1 GiB): a small file dropped on
    another channel meanwhile must not wait for that hash."""
    a, b = pair(channels=CHANNELS)
    out = a.out_dir("bravo", "bulk")
    with open(out / ".big.bin", "wb") as f:
        f.truncate(1 << 30)                      # sparse: cheap to make, full cost to hash
    os.rename(out / ".big.bin", out / "big.bin")
    time.sleep(0.02)                             # the bulk claim is under way
    t0 = time.monotonic()
    a.drop("bravo", "alerts", "urgent.txt", b"now")
    wait_for(lambda: "urgent.txt" in b.inbound("alpha", "alerts"), 30, interval=0.002)
    took = time.monotonic() - t0
    bulk_started = partial_bytes(b, "alpha") > 0 or "big.bin" in b.inbound("alpha", "bulk")
    print(f"\nalert dropped 20 ms after a 1 GiB bulk file: delivered after {took * 1000:.0f} ms "
          f"(bulk already streaming: {bulk_started})")
    assert took < 0.4
