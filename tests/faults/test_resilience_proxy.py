"""Latency and mid-frame cuts through our own user-space TCP proxy (tests/support/tcpproxy.py).

alpha dials bravo through the proxy. With 200 ms added each way the link must come
up, stay up (heartbeats are not fooled by a long round trip), report the RTT and
deliver exactly once. With the proxy resetting the connection after a random
number of bytes (so inside a TLS record and a frame, in either direction) over
and over during a transfer, every file still arrives exactly once, and each time
the link comes back promptly.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import pytest
from procs import assert_exactly_once, make_pair, stop_all, wait_for
from tcpproxy import DelayProxy
from traffic import Traffic

CHANNELS = [{"name": "bulk"}, {"name": "msgs", "priority": 10}]


@pytest.fixture
def proxied(tmp_path):
    made = []

    def factory(delay: float, link=None):
        a, b = make_pair(tmp_path, channels=CHANNELS, link=link, start=False)
        proxy = DelayProxy(b.port, delay=delay)
        a.peers[0]["connect"] = proxy.address
        made.append((a, b, proxy))
        b.start()
        a.start()
        a.wait_state("bravo")
        b.wait_state("alpha")
        return a, b, proxy

    yield factory
    for a, b, proxy in made:
        stop_all(a, b)
        proxy.close()


def test_200ms_each_way(proxied):
    a, b, proxy = proxied(0.2, link={"handshake_timeout": 10.0})
    big = os.urandom(16 << 20)
    t0 = time.monotonic()
    a.drop("bravo", "bulk", "big.bin", big)
    with Traffic([(a, "bravo", "msgs"), (b, "alpha", "msgs")], interval=0.05) as traffic:
        time.sleep(3.0)
    to_b, to_a = traffic.expected(a, "bravo", "msgs"), traffic.expected(b, "alpha", "msgs")
    wait_for(lambda: len(b.inbound("alpha", "msgs")) == len(to_b)
             and len(a.inbound("bravo", "msgs")) == len(to_a)
             and "big.bin" in b.inbound("alpha", "bulk"), 60, interval=0.1)
    took = time.monotonic() - t0
    assert_exactly_once(b, "alpha", "msgs", to_b)
    assert_exactly_once(a, "bravo", "msgs", to_a)
    assert_exactly_once(b, "alpha", "bulk", {"big.bin": big})
    # Idle now: pings go out every heartbeat_interval and measure the 400 ms round trip.
    rtt = wait_for(lambda: a.status()["peers"][0]["rtt_ms"], 10)
    time.sleep(1.5)
    rtt = a.status()["peers"][0]["rtt_ms"]
    print(f"\n200 ms each way: {len(to_b) + len(to_a)} small files and 16 MiB in {took:.1f}s;"
          f" rtt_ms {rtt}")
    assert 390 <= rtt <= 700
    assert not a.events("link_down") and not b.events("link_down")
    assert proxy.connections == 1


@pytest.mark.parametrize("cuts", [8, pytest.param(24, marks=pytest.mark.slow)])
def test_mid_frame_cuts_in_both_directions(proxied, cuts):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    a, b, proxy = proxied(0.002, link={"handshake_timeout": 3.0})
    bulk = {}
    recoveries = []
    with Traffic([(a, "bravo", "msgs"), (b, "alpha", "msgs")], interval=0.03) as traffic:
        for i in range(cuts):
            wait_for(lambda: a.peer_state("bravo") == "connected", 30)
            time.sleep(rng.uniform(0.0, 0.2))
            if i % 3 == 2:
                proxy.cut_after("down", rng.randrange(1, 40_000))   # acks, credit, msgs
            else:
                proxy.cut_after("up", rng.randrange(1, 8 << 20))    # bulk data and msgs
            name = f"bulk{i:02d}.bin"
            bulk[name] = os.urandom(8 << 20)      # so that an "up" cut lands inside bulk data
            a.drop("bravo", "bulk", name, bulk[name])
            wait_for(lambda: not proxy.pending_cut(), 30,
                     message=lambda i=i: f"cut {i} never happened: {proxy.bytes} {proxy._cut}\n"
                                     f"{a.tail(8)}\n{b.tail(8)}")
            cut = time.monotonic()
            wait_for(lambda: a.peer_state("bravo") != "connected", 5, interval=0.005)
            wait_for(lambda: a.peer_state("bravo") == "connected", 30, interval=0.005)
            recoveries.append(time.monotonic() - cut)
    to_b, to_a = traffic.expected(a, "bravo", "msgs"), traffic.expected(b, "alpha", "msgs")
    wait_for(lambda: len(b.inbound("alpha", "msgs")) == len(to_b)
             and len(a.inbound("bravo", "msgs")) == len(to_a)
             and len(b.inbound("alpha", "bulk")) == len(bulk), 60, interval=0.1)
    assert_exactly_once(b, "alpha", "msgs", to_b)
    assert_exactly_once(a, "bravo", "msgs", to_a)
    assert_exactly_once(b, "alpha", "bulk", bulk)
    print(f"\n{proxy.cuts} mid-stream cuts (seed {seed}): link back after median "
          f"{statistics.median(recoveries) * 1000:.0f} ms, max {max(recoveries) * 1000:.0f} ms; "
          f"{traffic.count} small files and 96 MiB exactly once")
    assert proxy.cuts == cuts
    assert max(recoveries) < 3.0
