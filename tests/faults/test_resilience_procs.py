"""Link resilience with real daemons on 127.0.0.1: frozen, killed and restarted peers,
both sides dialling, several peers on one hub, goodbyes, and idleness.

Faults are induced with signals only (SIGSTOP/SIGCONT, SIGKILL, SIGTERM/SIGINT);
everything is observed through the outside contract (/status, spool folders, logs).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from procs import (
    Daemon,
    assert_exactly_once,
    free_port,
    make_mutual_pair,
    make_pki,
    proc_cpu_seconds,
    stop_all,
    wait_for,
)

HB_TIMEOUT = 2.0      # procs.FAST


def elapsed_until(predicate, timeout: float, interval: float = 0.01, message="") -> float:
    start = time.monotonic()
    wait_for(predicate, timeout, interval, message)
    return time.monotonic() - start


def drop_many(d: Daemon, peer: str, ch: str, prefix: str, n: int, size: int = 20_000,
              ) -> dict[str, bytes]:
    files = {f"{prefix}{i:03d}.bin": os.urandom(size) for i in range(n)}
    for name, data in files.items():
        d.drop(peer, ch, name, data)
    return files


def partial_bytes(d: Daemon, peer: str) -> int:
    tmp = d.spool / peer / "tmp"
    return sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0


def link_events(d: Daemon, peer: str, name: str) -> list[dict]:
    return [e for e in d.events(name) if e.get("peer") == peer]


def session_balance(d: Daemon, peer: str) -> tuple[int, int]:
    """(link_up, link_down) for `peer` since the daemon's latest start (logs are appended
    across restarts, and a SIGKILLed daemon logs no link_down)."""
    ups = downs = 0
    for line in d.log_path.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "started":
            ups = downs = 0
        elif e.get("peer") == peer:
            ups += e.get("event") == "link_up"
            downs += e.get("event") == "link_down"
    return ups, downs


# -- a frozen peer ------------------------------------------------------------------------------


def test_sigstopped_peer_is_detected_and_delivery_resumes_exactly_once(pair):
    a, b = pair(link={"handshake_timeout": 3.0})
    before = drop_many(a, "bravo", "data", "before-", 10)
    big = os.urandom(128 << 20)
    a.drop("bravo", "data", "big.bin", big)
    wait_for(lambda: partial_bytes(b, "alpha") > 0, 30, interval=0.005,
             message="the big transfer never started")
    b.signal(signal.SIGSTOP)            # mid-transfer: alpha's send blocks, nothing comes back
    try:
        detect = elapsed_until(lambda: a.peer_state("bravo") != "connected", 10,
                               message=lambda: a.tail())
        during = drop_many(a, "bravo", "data", "during-", 10)
        time.sleep(2.0)                 # alpha's redials reach the kernel, not linkd
        assert a.peer_state("bravo") in ("connecting", "backoff")
    finally:
        b.signal(signal.SIGCONT)
    resumed = time.monotonic()
    wait_for(lambda: a.peer_state("bravo") == "connected", 30, message=lambda: a.tail())
    relink = time.monotonic() - resumed
    expected = {**before, **during, "big.bin": big}
    wait_for(lambda: len(b.inbound("alpha", "data")) == len(expected), 60, interval=0.1,
             message=lambda: f"{len(b.inbound('alpha', 'data'))} of {len(expected)}")
    drained = time.monotonic() - resumed
    print(f"\nSIGSTOP detected after {detect:.2f}s (heartbeat_timeout {HB_TIMEOUT}s); after "
          f"SIGCONT the link was back in {relink:.2f}s and the backlog delivered in "
          f"{drained:.2f}s")
    assert detect <= HB_TIMEOUT + 1.0
    assert_exactly_once(b, "alpha", "data", expected)
    down = link_events(a, "bravo", "link_down")
    assert down and "heartbeat timeout" in down[0]["reason"] and down[0]["clean"] is False
    assert a.status()["peers"][0]["reconnects"] >= 1


# -- killed and restarted -----------------------------------------------------------------------


def test_peer_killed_mid_transfer_and_restarted(pair):
    a, b = pair()
    files = drop_many(a, "bravo", "data", "f-", 30, size=200_000)
    big = os.urandom(64 << 20)
    a.drop("bravo", "data", "big.bin", big)
    files["big.bin"] = big
    wait_for(lambda: partial_bytes(b, "alpha") > 0, 30, interval=0.005)
    since_up = a.status()["peers"][0]["since"]
    b.kill()
    detect = elapsed_until(lambda: a.peer_state("bravo") != "connected", 5)
    since_down = a.status()["peers"][0]["since"]
    assert since_down.endswith("Z") and since_down > since_up
    more = drop_many(a, "bravo", "data", "g-", 10)
    time.sleep(1.0)
    status = a.status()["peers"][0]
    assert status["state"] in ("backoff", "connecting") and status["remote"] is None
    assert status["last_error"]
    restarted = time.monotonic()
    b.start()
    wait_for(lambda: a.peer_state("bravo") == "connected", 30)
    relink = time.monotonic() - restarted
    expected = {**files, **more}
    wait_for(lambda: len(b.inbound("alpha", "data")) == len(expected), 60, interval=0.1)
    print(f"\nkill detected after {detect:.2f}s; link back {relink:.2f}s after the restart")
    assert_exactly_once(b, "alpha", "data", expected, logs_complete=False)
    down = link_events(a, "bravo", "link_down")
    assert down and down[0]["clean"] is False
    st = a.status()["peers"][0]
    assert st["reconnects"] == 1 and st["since"] > since_down and st["remote"]


# -- both sides dial ----------------------------------------------------------------------------


def test_both_sides_dialling_keep_exactly_one_session(tmp_path):
    a, b = make_mutual_pair(tmp_path)
    try:
        to_b = drop_many(a, "bravo", "data", "ab-", 20)
        to_a = drop_many(b, "alpha", "data", "ba-", 20)
        # Several seconds in which both dial loops would redial if they thought the link down.
        for _ in range(30):
            time.sleep(0.1)
            assert a.peer_state("bravo") == "connected" and b.peer_state("alpha") == "connected"
        wait_for(lambda: len(b.inbound("alpha", "data")) == 20, 30)
        wait_for(lambda: len(a.inbound("bravo", "data")) == 20, 30)
        assert_exactly_once(b, "alpha", "data", to_b)
        assert_exactly_once(a, "bravo", "data", to_a)
        for d, p in ((a, "bravo"), (b, "alpha")):
            ups, downs = session_balance(d, p)
            # Both dials may come up before the tie-break; at most one loser each side.
            assert ups <= 2 and ups - downs == 1, (d.name, ups, downs)
        # Both sides report the two ends of one TCP connection (dialled by one of them).
        ra, rb = a.status()["peers"][0]["remote"], b.status()["peers"][0]["remote"]
        assert (ra == f"127.0.0.1:{b.port}") != (rb == f"127.0.0.1:{a.port}"), (ra, rb)

        # Restart each side in turn: every time, one session again and files both ways.
        for victim, other, peer in ((b, a, "alpha"), (a, b, "bravo")):
            victim.kill()
            victim.start()
            other_peer = "bravo" if peer == "alpha" else "alpha"
            wait_for(lambda v=victim, o=other, p=peer, op=other_peer:
                     v.peer_state(p) == "connected" and o.peer_state(op) == "connected", 30)
            time.sleep(1.5)
            more_b = drop_many(a, "bravo", "data", f"ab-{victim.name}-", 5)
            more_a = drop_many(b, "alpha", "data", f"ba-{victim.name}-", 5)
            to_b.update(more_b)
            to_a.update(more_a)
            wait_for(lambda: len(b.inbound("alpha", "data")) == len(to_b), 30)
            wait_for(lambda: len(a.inbound("bravo", "data")) == len(to_a), 30)
            assert a.peer_state("bravo") == "connected" and b.peer_state("alpha") == "connected"
            for d, p in ((victim, peer), (other, other_peer)):
                ups, downs = session_balance(d, p)
                assert ups - downs == 1, (d.name, ups, downs)
        assert_exactly_once(b, "alpha", "data", to_b, logs_complete=False)
        assert_exactly_once(a, "bravo", "data", to_a, logs_complete=False)
    finally:
        stop_all(a, b)


# -- goodbyes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_says_goodbye_and_the_peer_sees_a_clean_close(pair, sig):
    a, b = pair()
    started = time.monotonic()
    assert a.stop(sig, timeout=10) == 0
    took = time.monotonic() - started
    down = wait_for(lambda: link_events(b, "alpha", "link_down"), 5)
    assert down[0]["clean"] is True, down
    assert "shutting down" in down[0]["reason"]
    assert b.peer_state("alpha") == "waiting"
    st = b.status()["peers"][0]
    assert st["last_error"] is None, st          # a goodbye is not an error
    print(f"\n{signal.Signals(sig).name}: exit 0 after {took:.2f}s")
    assert took < 10


def test_shutdown_while_the_peer_is_frozen_mid_transfer_still_exits_promptly(pair):
    """Our send is stuck (the peer reads nothing): the goodbye cannot go out, yet
    SIGTERM still ends the daemon with 0 within 10 s; the file arrives later."""
    a, b = pair()
    big = os.urandom(128 << 20)
    a.drop("bravo", "data", "big.bin", big)
    wait_for(lambda: partial_bytes(b, "alpha") > 0, 30, interval=0.005)
    b.signal(signal.SIGSTOP)
    try:
        time.sleep(0.3)
        started = time.monotonic()
        assert a.stop(signal.SIGTERM, timeout=10) == 0
        took = time.monotonic() - started
    finally:
        b.signal(signal.SIGCONT)
    print(f"\nSIGTERM with a frozen peer: exit 0 after {took:.2f}s")
    assert took < 10
    a.start()
    wait_for(lambda: "big.bin" in b.inbound("alpha", "data"), 60, interval=0.1)
    assert_exactly_once(b, "alpha", "data", {"big.bin": big})


def test_an_abrupt_close_is_a_fault_for_the_peer(pair):
    a, b = pair()
    a.kill()
    down = wait_for(lambda: link_events(b, "alpha", "link_down"), 10)
    assert down[0]["clean"] is False
    assert b.status()["peers"][0]["last_error"]


def test_listener_shutdown_makes_the_dialler_reconnect_promptly(pair):
    """bravo says goodbye on SIGTERM; alpha treats it as normal and redials until it is back."""
    a, b = pair()
    assert b.stop(signal.SIGTERM, timeout=10) == 0
    down = wait_for(lambda: link_events(a, "bravo", "link_down"), 5)
    assert down[0]["clean"] is True
    b.start()
    back = elapsed_until(lambda: a.peer_state("bravo") == "connected", 10)
    print(f"\nlink back {back:.2f}s after the listener restarted")
    assert back < 3.0


# -- several peers on one daemon ----------------------------------------------------------------


def make_hub(tmp_path, link=None):
    """hub listens; spoke1 dials the hub; the hub dials spoke2 (both directions covered)."""
    pki_dir = make_pki(tmp_path / "pki", ["hub", "spoke1", "spoke2"])
    hub = Daemon(tmp_path, "hub", pki_dir, port=free_port(), link=link)
    s1 = Daemon(tmp_path, "spoke1", pki_dir, link=link)
    s2 = Daemon(tmp_path, "spoke2", pki_dir, port=free_port(), link=link)
    chans = [{"name": "data"}]
    hub.add_peer("spoke1", chans)
    hub.add_peer("spoke2", chans, connect=f"127.0.0.1:{s2.port}")
    s1.add_peer("hub", chans, connect=f"127.0.0.1:{hub.port}")
    s2.add_peer("hub", chans)
    return hub, s1, s2


def test_one_peers_trouble_never_stalls_another(tmp_path):
    hub, s1, s2 = make_hub(tmp_path, link={"handshake_timeout": 3.0})
    try:
        for d in (s2, hub, s1):
            d.start()
        hub.wait_state("spoke1")
        hub.wait_state("spoke2")
        st = {p["name"]: p for p in hub.status()["peers"]}
        assert set(st) == {"spoke1", "spoke2"}
        # spoke1 freezes while the hub streams a big file to it, then dies.
        hub.drop("spoke1", "data", "big.bin", os.urandom(128 << 20))
        wait_for(lambda: partial_bytes(s1, "hub") > 0, 30, interval=0.005)
        s1.signal(signal.SIGSTOP)
        sent: dict[str, bytes] = {}
        back: dict[str, bytes] = {}
        lat = []
        deadline = time.monotonic() + 2 * HB_TIMEOUT + 2
        i = 0
        while time.monotonic() < deadline:          # frozen, then declared dead
            name = f"x{i:03d}.bin"
            sent[name] = os.urandom(5000)
            t = time.monotonic()
            hub.drop("spoke2", "data", name, sent[name])
            back[name] = os.urandom(5000)
            s2.drop("hub", "data", name, back[name])
            wait_for(lambda n=name: n in s2.inbound("hub", "data")
                     and n in hub.inbound("spoke2", "data"), 5, interval=0.005)
            lat.append(time.monotonic() - t)
            i += 1
        assert hub.peer_state("spoke1") != "connected"
        s1.kill()
        for j in range(10):
            name = f"y{j:03d}.bin"
            sent[name] = os.urandom(5000)
            hub.drop("spoke2", "data", name, sent[name])
        wait_for(lambda: len(s2.inbound("hub", "data")) == len(sent), 10)
        wait_for(lambda: len(hub.inbound("spoke2", "data")) == len(back), 10)
        assert_exactly_once(s2, "hub", "data", sent)
        assert_exactly_once(hub, "spoke2", "data", back)
        assert hub.peer_state("spoke2") == "connected" and hub.peer_state("spoke1") == "waiting"
        assert not link_events(hub, "spoke2", "link_down")
        lat.sort()
        print(f"\nspoke2 round trips while spoke1 was frozen then dead: {len(lat)}, "
              f"median {lat[len(lat) // 2] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")
        assert lat[-1] < 2.0
        # spoke1 comes back and gets its big file exactly once.
        s1.start()
        wait_for(lambda: "big.bin" in s1.inbound("hub", "data"), 60, interval=0.1)
        assert list(s1.inbound("hub", "data")) == ["big.bin"]
    finally:
        for d in (hub, s1, s2):
            try:
                os.kill(d.proc.pid, signal.SIGCONT)
            except Exception:
                pass
        stop_all(hub, s1, s2)


# -- waiting costs nothing ----------------------------------------------------------------------


def test_no_cpu_while_waiting_for_an_unreachable_peer(tmp_path):
    pki_dir = make_pki(tmp_path / "pki", ["alpha", "bravo"])
    a = Daemon(tmp_path, "alpha", pki_dir, link={"reconnect_min": 0.2, "reconnect_max": 1.0})
    a.add_peer("bravo", [{"name": "data"}], connect=f"127.0.0.1:{free_port()}")   # nobody there
    try:
        a.start()
        wait_for(lambda: a.peer_state("bravo") == "backoff", 10)
        time.sleep(1.0)
        before = proc_cpu_seconds(a.proc.pid)
        time.sleep(5.0)
        used = proc_cpu_seconds(a.proc.pid) - before
        st = a.status()["peers"][0]
        print(f"\nCPU while dialling a closed port for 5 s: {used:.3f}s")
        assert used < 0.25
        assert st["state"] in ("backoff", "connecting") and "refused" in st["last_error"]
    finally:
        stop_all(a)
