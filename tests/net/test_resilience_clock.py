"""Heartbeats and reconnection in virtual time (trio.testing.MockClock, autojump).

A real SessionRunner (real spool on tmp_path) talks over
`trio.testing.memory_stream_pair` to a FakePeer driven by our own sans-IO
Session; the real `dial_loop` dials through an injected `open_stream` that
models an unreachable network. Hours of virtual time pass in milliseconds.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import logging
import os
import time
from collections.abc import Mapping

import pytest
import structlog
import trio
import trio.lowlevel
import trio.testing
import trustme
from memlink import (
    FakePeer,
    Throttled,
    drop,
    make_link,
    node_config,
    peer_config,
    ping_bytes,
    scan_sync,
)

from linkd.config import Config, LinkConfig
from linkd.net import supervisor
from linkd.net.admission import Gate
from linkd.net.connection import PING_LEAD, RTT_REFRESH, SessionRunner, ping_grid
from linkd.net.peer import PeerLink
from linkd.net.tls import TLSContexts, make_contexts
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.proto.framing import CHUNK_SIZE
from linkd.status import StatusBoard


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(autouse=True)
def quiet_logs():
    """The runner logs through structlog's default (stdout, debug level): keep the
    24 h dial loops' thousands of connect_failed lines out of failure reports."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    yield
    structlog.configure(**old)


pytestmark = pytest.mark.usefixtures("inline_threads")     # exact virtual time


def alpha_link(tmp_path, ca, **link_kw):
    cfg = node_config(tmp_path, ca, "alpha", [peer_config("bravo")], LinkConfig(**link_kw))
    return make_link(cfg, "bravo")


def runner_for(link, stream):
    runner = SessionRunner(link, stream, remote="memory", dialed_by_us=True, tls_info=None)
    link.take_slot(runner)      # as run_session does: pick-up wakes the active sender
    return runner


# -- heartbeats --------------------------------------------------------------------------------


async def test_silent_peer_is_declared_dead_after_heartbeat_timeout(tmp_path, ca, autojump_clock):
    link = alpha_link(tmp_path, ca, heartbeat_interval=1.0, heartbeat_timeout=5.0)
    left, right = trio.testing.memory_stream_pair()
    peer = FakePeer(right, silent=True)       # says hello, then nothing, ever
    runner = runner_for(link, left)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        await trio.lowlevel.checkpoint()
        start = trio.current_time()
        reason, error = await runner.run()
        ended = trio.current_time()
        nursery.cancel_scope.cancel()
    assert error and reason.startswith("heartbeat timeout"), reason
    assert 5.0 <= ended - start <= 5.05, ended - start
    # While it waited it pinged once per second of send-idleness (it dialled: a
    # listener would have pinged first, PING_LEAD, and its pongs kept it busy) ...
    ping_times = [t - start for t, _ in peer.of(F.Ping)]
    assert [round(t, 2) for t in ping_times] == [1.0, 2.0, 3.0, 4.0]
    # ... and it said why it left (best effort).
    byes = peer.of(F.Bye)
    assert byes and "heartbeat timeout" in byes[-1][1].reason
    assert link.status.state == "connected"   # the runner sets connected; the supervisor resets


def _record_pings(monkeypatch):
    """(session heartbeat id, virtual time) of every ping made; timer firings per session."""
    pings: list[tuple[int, float]] = []
    fired: collections.Counter[int] = collections.Counter()
    make_ping, handle_timer = S.Heartbeat.make_ping, S.Session.handle_timer

    def recorded(self, now):
        pings.append((id(self), now))
        return make_ping(self, now)

    def counted(self, now):
        fired[id(self.heartbeat)] += 1
        return handle_timer(self, now)
    monkeypatch.setattr(S.Heartbeat, "make_ping", recorded)
    monkeypatch.setattr(S.Session, "handle_timer", counted)
    return pings, fired


async def test_an_idle_link_carries_one_ping_and_one_pong_per_interval(
        tmp_path, ca, autojump_clock, monkeypatch):
    """Idle hub cost (issue 13): the listener pings ahead of the interval (PING_LEAD, on
    its grid), so the dialler's pongs always keep it from being send-idle and it never
    pings for itself, nor does its timer wake; it measures its RTT with a ping sent
    along with a pong every RTT_REFRESH seconds."""
    lk = LinkConfig(heartbeat_interval=5.0, heartbeat_timeout=15.0)
    a = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")], lk), "bravo")
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")], lk), "alpha")
    pings, fired = _record_pings(monkeypatch)
    left, right = trio.testing.memory_stream_pair()
    ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
    a.take_slot(ra), b.take_slot(rb)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ra.run)
        nursery.start_soon(rb.run)
        await ra.opened.wait()
        await rb.opened.wait()
        await trio.sleep(60)
        assert ra.session is not None and rb.session is not None
        dialler, listener = id(ra.session.heartbeat), id(rb.session.heartbeat)
        assert ra.session.heartbeat.rtt is not None        # both sides know their RTT
        assert rb.session.heartbeat.rtt is not None
        nursery.cancel_scope.cancel()
    grid = ping_grid(5.0)
    listener_times = [t for who, t in pings if who == listener]
    dialler_times = [t for who, t in pings if who == dialler]
    assert 60 / (5 * PING_LEAD) - 1 <= len(listener_times) <= 60 / (5 * PING_LEAD - grid) + 1
    assert all(abs(t / grid - round(t / grid)) < 1e-6 for t in listener_times)   # on grid
    assert 1 <= len(dialler_times) <= 60 / RTT_REFRESH + 1      # RTT refreshes only
    assert fired[dialler] == 0                      # never send-idle: no timer wake
    assert fired[listener] <= len(listener_times) + 1


async def test_a_hubs_idle_peers_are_pinged_together(tmp_path, ca, autojump_clock,
                                                      monkeypatch):
    """A listener's sessions ping on one shared grid: a hub with many idle peers wakes
    once per grid step for all the pings due in it, not once per peer. Eight peers
    connected at staggered times: ~100 pings in a minute, at no more than one instant
    per grid step (without the grid, each ping had an instant of its own)."""
    lk = LinkConfig(heartbeat_interval=5.0, heartbeat_timeout=15.0)
    pings, _fired = _record_pings(monkeypatch)
    runners = []
    for i in range(8):
        a = make_link(node_config(tmp_path / f"a{i}", ca, "alpha", [peer_config("bravo")], lk),
                      "bravo")
        b = make_link(node_config(tmp_path / f"b{i}", ca, "bravo", [peer_config("alpha")], lk),
                      "alpha")
        left, right = trio.testing.memory_stream_pair()
        ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
        rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
        a.take_slot(ra), b.take_slot(rb)
        runners.append((ra, rb))
    async with trio.open_nursery() as nursery:
        for ra, rb in runners:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            await rb.opened.wait()
            await trio.sleep(0.37)                  # not in step with each other
        start = trio.current_time()
        await trio.sleep(60)
        listeners = {id(rb.session.heartbeat) for _ra, rb in runners}
        nursery.cancel_scope.cancel()
    times = [t for who, t in pings if who in listeners and t >= start]
    assert len(times) >= 8 * 12
    assert len({round(t, 6) for t in times}) <= 60 / ping_grid(5.0) + 1


async def test_peer_silent_before_its_hello_is_dropped_at_the_handshake_timeout(
        tmp_path, ca, autojump_clock):
    link = alpha_link(tmp_path, ca, handshake_timeout=10.0)
    left, right = trio.testing.memory_stream_pair()
    runner = runner_for(link, left)
    start = trio.current_time()
    reason, error = await runner.run()          # nobody ever writes on `right`
    assert error and "handshake timeout" in reason
    assert trio.current_time() - start == pytest.approx(10.0, abs=0.01)
    assert not runner.was_open and link.sessions_opened == 0
    del right


async def test_a_live_peer_keeps_the_session_up_for_hours_and_rtt_is_reported(
        tmp_path, ca, autojump_clock):
    link = alpha_link(tmp_path, ca, heartbeat_interval=5.0, heartbeat_timeout=15.0)
    left, right = trio.testing.memory_stream_pair()
    # 40 ms each way, so the ping round trip takes 80 ms of virtual time.
    peer = FakePeer(Throttled(right, rate=1e12, delay=0.04))
    runner = runner_for(link, Throttled(left, rate=1e12, delay=0.04))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        result = []

        async def run():
            result.append(await runner.run())
        nursery.start_soon(run)
        await runner.opened.wait()
        await trio.sleep(3 * 3600)
        assert runner.session.state.value == "open"
        assert link.status.rtt_ms == pytest.approx(80.0, abs=1.0)
        pings = len(peer.of(F.Ping))
        # One ping per 5 s of idleness (each "sent" resets the idle timer; the fake
        # peer never pings first, as a listener would).
        every = 5.0
        assert 3 * 3600 / (every + 0.1) <= pings <= 3 * 3600 / every + 1
        await runner.close("test over")
    assert result == [("test over", False)]
    assert peer.of(F.Bye)[-1][1].reason == "test over"


async def test_a_ping_flood_is_answered_and_does_not_starve_data(tmp_path, ca, autojump_clock):
    link = alpha_link(tmp_path, ca, heartbeat_interval=1.0, heartbeat_timeout=5.0)
    payload = os.urandom(8 << 20)
    drop(link, "data", "big.bin", payload)
    scan_sync(link)
    left, right = trio.testing.memory_stream_pair()
    peer = FakePeer(right)
    runner = runner_for(link, left)
    cap = 400_000
    sent = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        nursery.start_soon(runner.run)
        await runner.opened.wait()
        while ("data", 1) not in peer.complete and sent < cap:
            await peer.send_raw(ping_bytes(sent + 1, 250))
            sent += 250
            await trio.lowlevel.checkpoint()       # no virtual time passes during the flood
        flood_pings = sent
        await trio.sleep(1)
        assert peer.sha("data", 1) == hashlib.sha256(payload).hexdigest()
        answered = {f.id for _, f in peer.of(F.Pong)}
        assert answered >= set(range(1, flood_pings + 1))
        assert runner.session.state.value == "open"
        await runner.close("done")
        nursery.cancel_scope.cancel()
    # 8 MiB is 32 chunks; the flood was answered all along, yet the data went through.
    print(f"\n8 MiB delivered while answering {flood_pings} pings")
    assert flood_pings < cap
    assert link.status.channels["data"].sent == 1


async def test_heartbeats_are_not_starved_by_bulk_data(tmp_path, ca, autojump_clock):
    """A 24 MiB file on a 4 MiB/s link: pongs wait at most about one chunk."""
    rate = 4 << 20
    link = alpha_link(tmp_path, ca, heartbeat_interval=0.5, heartbeat_timeout=1.0)
    payload = os.urandom(24 << 20)
    drop(link, "data", "bulk.bin", payload)
    scan_sync(link)
    left, right = trio.testing.memory_stream_pair()
    peer = FakePeer(right)
    runner = runner_for(link, Throttled(left, rate=rate))
    pinged: dict[int, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        nursery.start_soon(runner.run)
        await runner.opened.wait()
        start = trio.current_time()
        n = 0
        while ("data", 1) not in peer.complete:
            n += 1
            pinged[n] = trio.current_time()
            await peer.send_raw(ping_bytes(n, 1))
            await trio.sleep(0.1)
        took = trio.current_time() - start
        await trio.sleep(0.5)
        assert runner.session.state.value == "open"   # never timed out meanwhile
        await runner.close("done")
        nursery.cancel_scope.cancel()
    assert peer.sha("data", 1) == hashlib.sha256(payload).hexdigest()
    pongs = {f.id: t for t, f in peer.of(F.Pong)}
    waits = [pongs[i] - pinged[i] for i in pinged if i in pongs]
    chunk_time = CHUNK_SIZE / rate
    print(f"\n24 MiB at 4 MiB/s took {took:.2f}s virtual; {len(waits)} pongs, "
          f"worst wait {max(waits) * 1000:.0f} ms (one chunk = {chunk_time * 1000:.0f} ms)")
    assert len(waits) >= len(pinged) - 1 and len(waits) > 40
    assert max(waits) <= 1.5 * chunk_time
    assert took < 24 / 4 * 1.1     # and the pings cost next to nothing


async def test_a_peer_that_freezes_mid_transfer_is_declared_dead(tmp_path, ca, autojump_clock):
    """The peer stops reading (SIGSTOP, a partition) while we stream: our send blocks
    for good. The heartbeat deadline must fire all the same (nothing may wait for
    that send), within heartbeat_timeout of the last thing we received."""
    link = alpha_link(tmp_path, ca, heartbeat_interval=0.5, heartbeat_timeout=2.0)
    drop(link, "data", "bulk.bin", os.urandom(32 << 20))
    scan_sync(link)
    left, right = trio.testing.lockstep_stream_pair()     # no buffering at all
    peer = FakePeer(right)
    runner = runner_for(link, Throttled(left, rate=8 << 20))
    result = []
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            peer_scope = trio.CancelScope()

            async def peer_until_frozen():
                with peer_scope:
                    await peer.run()

            async def run():
                result.append(await runner.run())
                result.append(trio.current_time())
            nursery.start_soon(peer_until_frozen)
            nursery.start_soon(run)
            await runner.opened.wait()
            await trio.sleep(1.0)                        # mid-transfer (8 MiB of 32 MiB)
            assert peer.bodies and ("data", 1) not in peer.complete
            peer_scope.cancel()                          # frozen: reads and writes nothing
            last_heard = max(t for t, _ in peer.frames)  # what it last answered to
            await peer.closed.wait()
    (reason, error), ended = result
    assert error and reason.startswith("heartbeat timeout"), reason
    assert ended - last_heard <= 2.0 + 0.1, ended - last_heard


async def test_both_sides_streaming_at_once_never_deadlock(tmp_path, ca, autojump_clock):
    """Two real runners send each other 3 x 12 MiB over an unbuffered link.

    Each side's send blocks until the other reads; if reading ever waited for
    our own send, both would wait for each other forever.
    """
    channels = ("c0", "c1", "c2")
    a_cfg = node_config(tmp_path, ca, "alpha", [peer_config("bravo", channels)],
                        LinkConfig(heartbeat_interval=0.5, heartbeat_timeout=2.0))
    b_cfg = node_config(tmp_path, ca, "bravo", [peer_config("alpha", channels)],
                        LinkConfig(heartbeat_interval=0.5, heartbeat_timeout=2.0))
    a, b = make_link(a_cfg, "bravo"), make_link(b_cfg, "alpha")
    payloads = {}
    for ch in channels:
        payloads[ch] = os.urandom(12 << 20)
        drop(a, ch, "a.bin", payloads[ch])
        drop(b, ch, "b.bin", payloads[ch][::-1])
    scan_sync(a), scan_sync(b)
    left, right = trio.testing.lockstep_stream_pair()
    ra = SessionRunner(a, Throttled(left, rate=32 << 20), remote="b", dialed_by_us=True,
                       tls_info=None)
    rb = SessionRunner(b, Throttled(right, rate=32 << 20), remote="a", dialed_by_us=False,
                       tls_info=None)
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            while not all(a.status.channels[c].sent == b.status.channels[c].sent == 1
                          for c in channels):
                assert ra.reason is None and rb.reason is None, (ra.reason, rb.reason)
                await trio.sleep(0.1)
            took = trio.current_time()
            await ra.close("done")
            nursery.cancel_scope.cancel()
    for ch in channels:
        assert (b.layout.in_dir(ch) / "a.bin").read_bytes() == payloads[ch]
        assert (a.layout.in_dir(ch) / "b.bin").read_bytes() == payloads[ch][::-1]
    print(f"\n2 x 36 MiB crossed an unbuffered 32 MiB/s link in {took:.2f}s virtual")


# -- priorities, fairness, credit --------------------------------------------------------------


async def test_higher_priority_goes_first_and_lower_still_gets_a_share(
        tmp_path, ca, autojump_clock):
    cfg = node_config(tmp_path, ca, "alpha", [peer_config("bravo", (("alerts", 10), ("bulk", 0)))])
    link = make_link(cfg, "bravo")
    drop(link, "bulk", "big.bin", os.urandom(16 << 20))            # 64 chunks, queued first
    alerts = {f"a{i:03d}": os.urandom(CHUNK_SIZE) for i in range(100)}   # one chunk each
    for name, data in alerts.items():
        drop(link, "alerts", name, data)
    scan_sync(link)
    left, right = trio.testing.memory_stream_pair()
    peer = FakePeer(right, channels=("alerts", "bulk"), credit=64 << 20)
    runner = runner_for(link, left)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        nursery.start_soon(runner.run)
        while len(peer.complete) < 101:  # noqa: ASYNC110 (polling a test double)
            await trio.sleep(0.01)
        await runner.close("done")
        nursery.cancel_scope.cancel()
    # Turns are data chunks: a one-chunk alert goes out as msg + data in one turn.
    order = [f.ch for _, f in peer.frames if isinstance(f, F.Data)]
    last_alert = max(i for i, ch in enumerate(order) if ch == "alerts")
    busy = order[:last_alert + 1]          # while alerts had something to send
    share = busy.count("bulk") / len(busy)
    runs = "".join("b" if ch == "bulk" else "a" for ch in busy).split("a")
    print(f"\nwhile 100 alerts went out, bulk got {busy.count('bulk')} of {len(busy)} turns "
          f"({share:.1%}); longest bulk run {max(len(r) for r in runs)}")
    assert order[0] == "alerts"                       # the higher priority starts
    alert_turns = len(busy) - busy.count("bulk")
    # starvation_limit 16: bulk gets one turn after every 16 alert turns at most
    assert alert_turns // 17 <= busy.count("bulk") <= alert_turns // 16 + 1, share
    assert max(len(r) for r in runs) == 1             # an alert waits at most one chunk
    assert order.index("bulk") < last_alert < len(order) - 1    # bulk finishes last
    for i, name in enumerate(alerts, start=1):
        assert bytes(peer.bodies[("alerts", i)]) == alerts[name]


async def test_a_channel_without_credit_does_not_block_another(tmp_path, ca, autojump_clock):
    """The receiver is slow on "bulk" (grants nothing back); "alerts" flows regardless,
    and the sender never has more than the granted 4 MiB of bulk on the wire."""
    cfg = node_config(tmp_path, ca, "alpha", [peer_config("bravo", ("alerts", "bulk"))])
    link = make_link(cfg, "bravo")
    big = os.urandom(32 << 20)
    drop(link, "bulk", "big.bin", big)
    scan_sync(link)
    left, right = trio.testing.memory_stream_pair()
    peer = FakePeer(right, channels=("alerts", "bulk"), withhold=frozenset({"bulk"}))
    runner = runner_for(link, left)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        nursery.start_soon(runner.run)
        await runner.opened.wait()
        await trio.sleep(1)
        assert len(peer.bodies[("bulk", 1)]) == 4 << 20   # exactly the initial credit
        for i in range(50):
            drop(link, "alerts", f"a{i:02d}", b"x" * 3000)
            await link.scan_now()
            await trio.sleep(0.1)
        await trio.sleep(1)
        assert sum(1 for ch, _ in peer.complete if ch == "alerts") == 50, (
            [(t, f.__class__.__name__, getattr(f, "ch", "")) for t, f in peer.frames[-20:]],
            link.outbound["alerts"].pending()[:3], runner.out["alerts"])
        assert len(peer.bodies[("bulk", 1)]) == 4 << 20   # still stuck, and nothing more sent
        assert runner.session.pending_output < CHUNK_SIZE + 4096
        await peer.release("bulk")
        while ("bulk", 1) not in peer.complete:  # noqa: ASYNC110 (polling a test double)
            await trio.sleep(0.1)
        await runner.close("done")
        nursery.cancel_scope.cancel()
    assert bytes(peer.bodies[("bulk", 1)]) == big


# -- reconnection: the real dial_loop against an unreachable network ------------------------------


class FakeDaemon:
    """The little of the daemon the supervisor uses (`supervisor.Host`): the config,
    the TLS contexts, a logger and the links; no status board, no admission gate."""

    def __init__(self, cfg: Config, link: PeerLink) -> None:
        self.cfg = cfg
        self.tls: TLSContexts = make_contexts(cfg)
        self.log = link.log
        self.links: Mapping[str, PeerLink] = {link.name: link}
        self.board: StatusBoard | None = None
        self.gate: Gate | None = None


def fake_daemon_and_link(tmp_path, ca, **link_kw):
    lcfg = LinkConfig(**link_kw)
    cfg = node_config(tmp_path, ca, "alpha", [peer_config("bravo", connect=("127.0.0.1", 9))],
                      lcfg)
    link = make_link(cfg, "bravo")
    return FakeDaemon(cfg, link), link


def check_backoff(gaps, lo, hi, attempt_cost=0.0):
    """Every gap is attempt_cost + a delay in [ceiling/2, ceiling] with a doubling ceiling."""
    for i, gap in enumerate(gaps):
        delay = gap - attempt_cost
        ceiling = min(hi, lo * 2 ** min(i, 60))
        assert ceiling / 2 - 1e-6 <= delay <= ceiling + 1e-6, (i, delay, ceiling)
        assert lo / 2 - 1e-6 <= delay <= hi + 1e-6


@pytest.mark.parametrize("lo,hi", [(1.0, 60.0), (0.5, 30.0)])
async def test_refused_dials_back_off_with_jitter_all_day(tmp_path, ca, autojump_clock, lo, hi):
    daemon, link = fake_daemon_and_link(tmp_path, ca, reconnect_min=lo, reconnect_max=hi)
    attempts: list[float] = []
    states: list[str] = []

    async def refused(host, port):
        attempts.append(trio.current_time())
        states.append(link.status.state)
        raise OSError(errno.ECONNREFUSED, "Connection refused")

    day = 24 * 3600
    real = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: supervisor.dial_loop(daemon, link, open_stream=refused))
        await trio.sleep(day)
        assert link.status.state == "backoff"
        assert "Connection refused" in link.status.last_error
        assert link.status.next_attempt_at is not None
        nursery.cancel_scope.cancel()
    real = time.perf_counter() - real
    t0 = attempts[0]
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    print(f"\n[{lo}, {hi}]: {len(attempts)} attempts in 24 h virtual, {real:.2f}s real; "
          f"first gaps {[round(g, 2) for g in gaps[:8]]}")
    assert real < 5.0      # (about 0.2 s here; generous for a loaded CI machine)
    check_backoff(gaps, lo, hi)
    # Never gives up: attempts go on all day, never more than `hi` apart.
    assert attempts[-1] > t0 + day - hi
    assert day / hi <= len(attempts) <= day / (hi / 2) + 20
    assert set(states) == {"connecting"}


async def test_reloaded_reconnect_bounds_apply_from_the_next_attempt(tmp_path, ca,
                                                                     autojump_clock):
    # The backoff was built once per dial loop: a SIGHUP lowering reconnect_max from
    # 60 s to 2 s went on waiting up to a minute between dials until a restart.
    daemon, link = fake_daemon_and_link(tmp_path, ca, reconnect_min=1.0, reconnect_max=60.0)
    attempts: list[float] = []

    async def refused(host, port):
        attempts.append(trio.current_time())
        raise OSError(errno.ECONNREFUSED, "Connection refused")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: supervisor.dial_loop(daemon, link, open_stream=refused))
        await trio.sleep(600)                   # at the 60 s ceiling by now
        daemon.cfg = dataclasses.replace(daemon.cfg, link=dataclasses.replace(
            daemon.cfg.link, reconnect_min=0.5, reconnect_max=2.0))
        reloaded = trio.current_time()
        await trio.sleep(600)
        nursery.cancel_scope.cancel()
    after = [t for t in attempts if t > reloaded]
    gaps = [b - a for a, b in zip(after, after[1:], strict=False)]
    assert after[0] - reloaded <= 60.0 + 1e-6   # the wait under way ends as planned
    assert gaps and max(gaps) <= 2.0 + 1e-6, gaps[:5]


async def test_blackholed_dials_time_out_and_back_off(tmp_path, ca, autojump_clock):
    """SYNs vanish: each attempt costs handshake_timeout, then the backoff delay."""
    daemon, link = fake_daemon_and_link(tmp_path, ca, reconnect_min=1.0, reconnect_max=60.0,
                                        handshake_timeout=10.0)
    attempts: list[float] = []

    async def blackhole(host, port):
        attempts.append(trio.current_time())
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: supervisor.dial_loop(daemon, link, open_stream=blackhole))
        await trio.sleep(6 * 3600)
        assert "timed out" in link.status.last_error
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    check_backoff(gaps, 1.0, 60.0, attempt_cost=10.0)
    assert len(attempts) >= 6 * 3600 / 70


async def test_backoff_resets_only_after_a_stable_session(tmp_path, ca, autojump_clock):
    """Real TLS and a real session over memory streams, opened by the real dial_loop.

    Phase 1: ten refusals (backoff climbs to the cap). Phase 2: a session that
    dies 1 s after its hello (not stable): the backoff keeps climbing. Phase 3:
    a session that lives 60 s (stable): the next delay is back at the floor.
    """
    lo, hi = 0.5, 30.0
    daemon, link = fake_daemon_and_link(tmp_path, ca, reconnect_min=lo, reconnect_max=hi,
                                        heartbeat_interval=1.0, heartbeat_timeout=3.0)
    bravo_cfg = node_config(tmp_path, ca, "bravo", [peer_config("alpha")])
    server_contexts = make_contexts(bravo_cfg)
    plan = ["refuse"] * 10 + [1.0] + ["refuse"] * 2 + [60.0] + ["refuse"] * 3
    attempts: list[tuple[float, object]] = []

    async def serve(stream, lifetime):
        ssl = server_contexts.server_stream(stream, list(bravo_cfg.peers))
        await server_contexts.finish_handshake(ssl)
        peer = FakePeer(ssl)
        with trio.move_on_after(lifetime):
            await peer.run()
        await trio.aclose_forcefully(ssl)       # an abrupt close: a fault, not a goodbye

    async def open_stream(host, port):
        step = plan[len(attempts)] if len(attempts) < len(plan) else "refuse"
        attempts.append((trio.current_time(), step))
        if step == "refuse":
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(serve, theirs, step)
        return ours

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: supervisor.dial_loop(daemon, link, open_stream=open_stream))
        while len(attempts) < len(plan) + 1:  # noqa: ASYNC110 (polling a test double)
            await trio.sleep(0.25)
        nursery.cancel_scope.cancel()
    times = [t for t, _ in attempts]
    # The gap after an attempt that ran a session starts when the session ended.
    # Refusals 0..9: delays climb towards the cap.
    gaps = [b - a for a, b in zip(times[:10], times[1:11], strict=True)]
    check_backoff(gaps, lo, hi)
    # Attempt 10 ran a 1 s session: not stable, so the next delay is still near the cap.
    after_short = times[11] - times[10] - 1.0
    assert after_short >= hi / 2 - 0.1, after_short
    # Attempt 13 ran a 60 s session: stable, so the next delay is back at the floor.
    after_stable = times[14] - times[13] - 60.0
    assert lo / 2 - 0.05 <= after_stable <= lo + 0.05, after_stable
    assert link.sessions_opened == 2 and link.status.reconnects == 1
    assert link.status.last_error and "Connection refused" in link.status.last_error



# -- a slow channel on the receiving side (real time: real worker threads) -----------------------


@pytest.mark.parametrize("inline_threads", [None])      # keep real threads here
async def test_a_slow_channel_disk_does_not_hold_back_another_channel(tmp_path, ca,
                                                                      inline_threads):
    """bravo's disk work for "bulk" takes 0.3 s per batch (a slow consumer disk); small
    files on "alerts" must still be delivered in milliseconds, not behind that work."""
    channels = ("alerts", "bulk")
    a = make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo", channels)]), "bravo")
    b = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha", channels)]), "alpha")
    slow = b.inbound["bulk"]
    real_write = slow.write

    def slow_write(data):
        time.sleep(0.3)
        return real_write(data)
    slow.write = slow_write
    drop(a, "bulk", "big.bin", os.urandom(32 << 20))
    scan_sync(a)
    left, right = trio.testing.memory_stream_pair()
    ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
    a.take_slot(ra), b.take_slot(rb)
    waits = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            await ra.opened.wait()
            await trio.sleep(0.5)                    # bulk is now crawling
            for i in range(5):
                name = f"alert{i}"
                drop(a, "alerts", name, b"!" * 100)
                t0 = trio.current_time()
                await a.scan_now()
                while not (b.layout.in_dir("alerts") / name).exists():  # noqa: ASYNC110 (polling a test double)
                    await trio.sleep(0.002)
                waits.append(trio.current_time() - t0)
            bulk_done = (b.layout.in_dir("bulk") / "big.bin").exists()
            await ra.close("done")
            nursery.cancel_scope.cancel()
    print(f"\nalerts while bulk's disk crawled: worst {max(waits) * 1000:.0f} ms, "
          f"median {sorted(waits)[len(waits) // 2] * 1000:.0f} ms (bulk finished meanwhile: "
          f"{bulk_done})")
    assert not bulk_done
    assert max(waits) < 0.25
