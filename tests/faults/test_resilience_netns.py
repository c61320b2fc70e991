"""Network faults between two real daemons in two network namespaces (root, nft).

alpha runs in namespace A and dials bravo in namespace B across a veth pair
(10.231.N.1 <-> 10.231.N.2, addresses that exist only inside those namespaces).
Faults are nft rules in B's own ruleset (tests/support/netns.py):

* partition: DROP every packet both ways for 20 s (60 s in the slow variant), in
  the middle of a 256 MiB transfer, with small files flowing both ways;
* TCP reset: A's segments are refused with `reject with tcp reset` (A's socket is
  reset at once, B's is left stale until a new session from A replaces it);
* quick flaps (12 in CI, 30 with -m slow): partitions of 0.1-1.5 s and resets in
  random order, 0.3-1 s apart.

Each checks exactly-once delivery both ways and prints the time to recover.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from netns import NetnsPair, unavailable
from procs import Daemon, assert_exactly_once, free_port, make_pki, stop_all, wait_for
from traffic import Traffic

pytestmark = pytest.mark.root

CHANNELS = [{"name": "bulk"}, {"name": "msgs", "priority": 10}]


@pytest.fixture
def ns_pair(tmp_path):
    why = unavailable()
    if why:
        pytest.skip(why)
    made: list[Daemon] = []
    nets: list[NetnsPair] = []

    def factory(link=None):
        net = NetnsPair().setup()
        nets.append(net)
        pki_dir = make_pki(tmp_path / "pki", ["alpha", "bravo"])
        b = Daemon(tmp_path, "bravo", pki_dir, port=free_port(), link=link)
        a = Daemon(tmp_path, "alpha", pki_dir, link=link)
        b.listen_address = net.addr_b
        a.wrap, b.wrap = net.wrap(net.a), net.wrap(net.b)
        a.add_peer("bravo", CHANNELS, connect=f"{net.addr_b}:{b.port}")
        b.add_peer("alpha", CHANNELS)
        made.extend([a, b])
        b.start()
        a.start()
        a.wait_state("bravo")
        b.wait_state("alpha")
        return a, b, net

    yield factory
    stop_all(*made)            # processes first: a namespace lives as long as its processes
    for net in nets:
        net.teardown()


def partial_bytes(d: Daemon, peer: str) -> int:
    tmp = d.spool / peer / "tmp"
    return sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0


def since(t0: float) -> float:
    return time.monotonic() - t0


def check_all(a: Daemon, b: Daemon, traffic: Traffic, bulk: dict[str, bytes],
              timeout: float = 90) -> float:
    """Wait until everything arrived; check exactly once both ways; return the wait."""
    t0 = time.monotonic()
    to_b = traffic.expected(a, "bravo", "msgs")
    to_a = traffic.expected(b, "alpha", "msgs")
    wait_for(lambda: len(b.inbound("alpha", "msgs")) >= len(to_b)
             and len(a.inbound("bravo", "msgs")) >= len(to_a)
             and len(b.inbound("alpha", "bulk")) >= len(bulk), timeout, interval=0.1,
             message=lambda: f"msgs {len(b.inbound('alpha', 'msgs'))}/{len(to_b)} and "
                             f"{len(a.inbound('bravo', 'msgs'))}/{len(to_a)}, bulk "
                             f"{len(b.inbound('alpha', 'bulk'))}/{len(bulk)}\n{a.tail(15)}")
    took = since(t0)
    assert_exactly_once(b, "alpha", "msgs", to_b)
    assert_exactly_once(a, "bravo", "msgs", to_a)
    assert_exactly_once(b, "alpha", "bulk", bulk)
    return took


@pytest.mark.parametrize("seconds", [10, pytest.param(60, marks=pytest.mark.slow)])
def test_partition_in_the_middle_of_a_transfer(ns_pair, seconds):
    a, b, net = ns_pair(link={"handshake_timeout": 3.0})
    big = os.urandom(256 << 20)
    with Traffic([(a, "bravo", "msgs"), (b, "alpha", "msgs")], interval=0.1) as traffic:
        time.sleep(0.5)
        a.drop("bravo", "bulk", "big.bin", big)
        wait_for(lambda: partial_bytes(b, "alpha") > 0, 60, interval=0.002,
                 message="the big transfer never started")
        net.partition()
        cut = time.monotonic()
        assert "big.bin" not in b.inbound("alpha", "bulk"), "too late: transfer complete"
        wait_for(lambda: a.peer_state("bravo") != "connected", 10)
        detect_a = since(cut)
        wait_for(lambda: b.peer_state("alpha") != "connected", 10)
        detect_b = since(cut)
        time.sleep(max(0.0, seconds - since(cut)))
        net.heal()
        healed = time.monotonic()
        wait_for(lambda: a.peer_state("bravo") == "connected"
                 and b.peer_state("alpha") == "connected", 60, interval=0.01,
                 message=lambda: a.tail(10))
        relink = since(healed)
        time.sleep(0.5)
    drain = check_all(a, b, traffic, {"big.bin": big})
    print(f"\n{seconds}s partition: detected by alpha after {detect_a:.2f}s, bravo "
          f"{detect_b:.2f}s; link back {relink:.2f}s after healing; "
          f"{traffic.count} small files + 256 MiB drained {drain:.2f}s later")
    assert detect_a < 2.0 + 1.5 and detect_b < 2.0 + 1.5
    # Redials during the partition time out after handshake_timeout (3 s) and back off
    # (reconnect_max 1 s), so the link returns within about one attempt of the heal.
    assert relink < 3.0 + 1.0 + 1.0


def test_tcp_reset_mid_transfer(ns_pair):
    a, b, net = ns_pair(link={"handshake_timeout": 3.0})
    big = os.urandom(128 << 20)
    with Traffic([(a, "bravo", "msgs"), (b, "alpha", "msgs")], interval=0.05) as traffic:
        a.drop("bravo", "bulk", "big.bin", big)
        wait_for(lambda: partial_bytes(b, "alpha") > 0, 60, interval=0.002)
        net.reset_from_a()
        cut = time.monotonic()
        wait_for(lambda: a.peer_state("bravo") != "connected", 10)
        detect = since(cut)
        time.sleep(1.0)                  # alpha's redials are reset too ("refused")
        assert "reset" in (a.status()["peers"][0]["last_error"] or "") or \
            "refused" in (a.status()["peers"][0]["last_error"] or "")
        net.heal()
        healed = time.monotonic()
        wait_for(lambda: a.peer_state("bravo") == "connected"
                 and b.peer_state("alpha") == "connected", 30, interval=0.01)
        relink = since(healed)
        time.sleep(0.5)
    drain = check_all(a, b, traffic, {"big.bin": big})
    print(f"\nTCP reset: alpha noticed after {detect * 1000:.0f} ms; link back "
          f"{relink:.2f}s after the rule went; drained {drain:.2f}s later")
    assert detect < 1.0
    assert relink < 2.0


@pytest.mark.parametrize("flaps", [8, pytest.param(30, marks=pytest.mark.slow)])
def test_quick_flaps(ns_pair, flaps):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    a, b, net = ns_pair(link={"handshake_timeout": 2.0, "heartbeat_interval": 0.25,
                              "heartbeat_timeout": 1.0, "reconnect_min": 0.1,
                              "reconnect_max": 0.5})
    bulk = {f"bulk{i}.bin": os.urandom(16 << 20) for i in range(4)}
    for name, data in bulk.items():
        a.drop("bravo", "bulk", name, data)
    kinds = []
    with Traffic([(a, "bravo", "msgs"), (b, "alpha", "msgs")], interval=0.05) as traffic:
        for _ in range(flaps):
            if rng.random() < 0.3:
                kinds.append("reset")
                net.reset_from_a()
                time.sleep(rng.uniform(0.1, 0.5))
            else:
                kinds.append("drop")
                net.partition()
                time.sleep(rng.uniform(0.1, 1.5))
            net.heal()
            time.sleep(rng.uniform(0.3, 1.0))
        healed = time.monotonic()
        wait_for(lambda: a.peer_state("bravo") == "connected"
                 and b.peer_state("alpha") == "connected", 30, interval=0.01)
        relink = since(healed)
        time.sleep(0.5)
    drain = check_all(a, b, traffic, bulk)
    sessions = a.status()["peers"][0]["reconnects"] + 1
    print(f"\n{flaps} flaps (seed {seed}: {kinds.count('drop')} partitions, "
          f"{kinds.count('reset')} resets): {sessions} sessions; link back {relink:.2f}s "
          f"after the last; {traffic.count} small files + 64 MiB drained {drain:.2f}s later")
    assert relink < 2.0 + 0.5 + 1.0
    assert sessions >= 2
