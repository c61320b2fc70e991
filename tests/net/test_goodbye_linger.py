"""A goodbye lingers until the peer closes its end (an operator's restart trial: the
dialler's SIGTERM left the listener an unclean link_down "connection reset by peer"
in 4 restarts of 30). The stopping side closed its socket right after writing its
goodbye, with the peer's bytes unread; the kernel then sends a reset, and a reset
makes the peer's kernel drop what it had not read yet, the goodbye with it. Now
SessionRunner.close() reads on (dropping what comes) until the peer, told goodbye,
closes its end, for at most LINGER seconds; and a stopping daemon says goodbye
before it cancels the dial loop its session runs in."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import structlog
import trio
import trio.testing
import trustme
from memlink import (
    FakePeer,
    drop,
    make_link,
    node_config,
    peer_config,
    scan_sync,
)
from net.test_ack_evidence import run_against

from linkd.daemon import close_side_by_side
from linkd.net import supervisor
from linkd.net.connection import GOODBYE_SEND, LINGER, SessionRunner
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.proto.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

pytestmark = pytest.mark.usefixtures("inline_threads")     # exact virtual time


def a_link(tmp_path):
    link = make_link(node_config(tmp_path, trustme.CA(), "alpha",
                                 [peer_config("bravo", ("data",))]), "bravo")
    drop(link, "data", "a.txt", b"a")
    scan_sync(link)
    return link


def a_case(tmp_path):
    """A link with a file to send, a fake peer, and where a test notes what it saw."""
    seen: dict[str, float | bool] = {}
    return a_link(tmp_path), FakePeer(None), seen


async def until_connected(link):
    while link.status.channel("data").sent < 1:  # noqa: ASYNC110 (resolved in a thread)
        await trio.sleep(0.01)


@contextlib.asynccontextmanager
async def saying_goodbye(runner, peer, seen):
    """runner.close() going on in the background (seen["closed_at"]: when it returned),
    entered once the peer has our goodbye."""
    async with trio.open_nursery() as nursery:
        async def close():
            await runner.close("shutdown: peer is shutting down")
            seen["closed_at"] = trio.current_time()
        nursery.start_soon(close)
        while not peer.of(F.Bye):  # noqa: ASYNC110 (the peer's side)
            await trio.sleep(0.001)
        yield


async def test_a_goodbye_reads_on_until_the_peer_closes_its_end(tmp_path, autojump_clock):
    link, peer, seen = a_case(tmp_path)

    async def until(runner, peer):
        await until_connected(link)
        async with saying_goodbye(runner, peer, seen):
            await trio.sleep(LINGER / 2)
            # told goodbye, the peer still has bytes on the way: they are read
            seen["reading"] = not runner.reader_done.is_set()
            await peer.send_raw(b"\0" * 1000)
            await trio.sleep(0.01)
            seen["still_reading"] = not runner.reader_done.is_set()
            seen["peer_closed_at"] = trio.current_time()
            await peer.stream.aclose()
    runner = await run_against(link, peer, until)
    assert seen["reading"] and seen["still_reading"]
    # it ended as soon as the peer closed, not at the linger's limit
    assert 0 <= seen["closed_at"] - seen["peer_closed_at"] < 0.1, seen
    assert runner.reason == "shutdown: peer is shutting down" and not runner.error


async def test_a_goodbye_ends_when_the_peer_says_goodbye_too(tmp_path, autojump_clock):
    # both daemons stopping at once: each lingered a full LINGER for the other's close
    link, peer, seen = a_case(tmp_path)

    async def until(runner, peer):
        await until_connected(link)
        async with saying_goodbye(runner, peer, seen):
            await trio.sleep(LINGER / 4)
            seen["still_reading"] = not runner.reader_done.is_set()
            seen["bye_at"] = trio.current_time()
            # the peer's own goodbye, after ours; it keeps its end open (lingering)
            await peer.send_raw(encode_frame(F.Bye("shutdown: peer is shutting down")))
    runner = await run_against(link, peer, until)
    assert seen["still_reading"]
    assert 0 <= seen["closed_at"] - seen["bye_at"] < 0.1, seen
    assert runner.reason == "shutdown: peer is shutting down" and not runner.error


async def test_a_peer_that_never_closes_its_end_holds_a_goodbye_linger_seconds(
        tmp_path, autojump_clock):
    link, peer, seen = a_case(tmp_path)

    async def until(runner, peer):
        await until_connected(link)
        start = trio.current_time()
        await runner.close("shutdown: peer is shutting down")
        seen["took"] = trio.current_time() - start
    await run_against(link, peer, until)
    assert LINGER <= seen["took"] < LINGER + 0.5, seen


async def test_a_second_close_does_not_cut_the_first_short(tmp_path, autojump_clock):
    # e.g. a shutdown while a reload's goodbye lingers (review of the linger)
    link, peer, seen = a_case(tmp_path)

    async def until(runner, peer):
        await until_connected(link)
        async with trio.open_nursery() as nursery:
            for name in ("first", "second"):
                async def close(name=name):
                    await runner.close("shutdown: peer is shutting down")
                    seen[name] = trio.current_time()
                nursery.start_soon(close)
                await trio.sleep(LINGER / 4)
            seen["peer_closed_at"] = trio.current_time()
            await peer.stream.aclose()
    await run_against(link, peer, until)
    assert seen["first"] >= seen["peer_closed_at"] and seen["second"] >= seen["peer_closed_at"]


async def test_a_goodbye_whose_close_was_cancelled_still_ends_at_the_peers_close(
        tmp_path, autojump_clock):
    link = a_link(tmp_path)
    peer = FakePeer(None)

    async def until(runner, peer):
        await until_connected(link)
        with trio.move_on_after(LINGER / 2):
            await runner.close("shutdown: peer is shutting down")
        await peer.stream.aclose()
        await trio.sleep_forever()      # run_against returns once the session has ended
    runner = await run_against(link, peer, until)
    assert runner.result == ("shutdown: peer is shutting down", False)


async def test_a_goodbye_whose_close_was_cancelled_ends_even_if_the_peer_never_closes(
        tmp_path, autojump_clock):
    # review: once CLOSED a session has no heartbeat, and only the peer's close ended
    # it; a peer that never closes (partitioned, hung) kept the slot for ever
    link, peer, seen = a_case(tmp_path)

    async def until(runner, peer):
        await until_connected(link)
        seen["start"] = trio.current_time()
        with trio.move_on_after(LINGER / 2):
            await runner.close("shutdown: peer is shutting down")
        await trio.sleep_forever()      # run_against returns once the session has ended
    runner = await run_against(link, peer, until)
    assert runner.result == ("shutdown: peer is shutting down", False)
    assert trio.current_time() - seen["start"] <= GOODBYE_SEND + LINGER + 0.1


async def test_sessions_are_closed_side_by_side(autojump_clock):
    # a reload or a stop with many peers: each goodbye may linger up to LINGER
    class Lingering:
        async def close(self, reason, error=False):
            await trio.sleep(LINGER)
    start = trio.current_time()
    await close_side_by_side([(Lingering(), "reload: test") for _ in range(20)])
    assert trio.current_time() - start == pytest.approx(LINGER)


async def test_a_session_asking_for_its_slot_while_the_daemon_stops_is_refused(
        tmp_path, autojump_clock):
    # its handshake was under way when the goodbyes were said: taking the slot, it
    # would get none (the stop waited STOP_GRACE for it, then cut it)
    link = a_link(tmp_path)
    left, right = trio.testing.memory_stream_pair()
    runner = SessionRunner(link, left, remote="memory", dialed_by_us=False, tls_info=None)
    seen: dict[str, float] = {}

    async def refused():
        await supervisor.run_session(stopping_daemon(link), link, runner)
        seen["refused_at"] = trio.current_time()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refused)
            got = await right.receive_some(1 << 16)
            # the refusal reads on until the dialler closes (its hello, sent right
            # after TLS, left unread would make the close a reset that can drop the
            # goodbye), for at most LINGER
            await right.send_all(b"a hello")
            await trio.sleep(LINGER / 2)
            seen["closed_at"] = trio.current_time()
            await right.aclose()
    assert link.active is None
    assert F.Bye("shutdown: peer is shutting down") in decode_all(got)
    assert 0 <= seen["refused_at"] - seen["closed_at"] < 0.1, seen


async def test_a_refusal_by_a_stopping_peer_is_no_fault(tmp_path):
    # the dialler, told "shutdown:" before its hello, logged a warning and showed an
    # error in /status for what is a plain restart of the peer
    link = a_link(tmp_path)

    class Refused:
        remote, dialed_by_us, was_open, preread = "memory", True, False, b""
        reported = trio.Event()

        async def run(self):
            return "refused by the peer: shutdown: peer is shutting down", True
    daemon = stopping_daemon(link)
    daemon.stopping = False
    with structlog.testing.capture_logs() as logs:
        await supervisor.run_session(daemon, link, Refused())
    [failed] = [e for e in logs if e["event"] == "session_failed"]
    assert failed["log_level"] == "info"
    assert link.status.document()["last_error"] is None


async def test_a_session_replacing_another_while_the_daemon_stops_is_refused(tmp_path):
    # review: it waited for the session it replaces to close, and the stop began
    # meanwhile (the stop closed that session too): it took the slot after the goodbyes
    link = a_link(tmp_path)
    daemon = stopping_daemon(link)
    daemon.stopping = False

    class Existing:
        remote, dialed_by_us = "memory", False

        async def close(self, reason, error=False):
            daemon.stopping = True      # SIGTERM while this goodbye lingers
            link.release_slot(self)
    existing = Existing()
    link.take_slot(existing)
    left, right = trio.testing.memory_stream_pair()
    runner = SessionRunner(link, left, remote="memory", dialed_by_us=False, tls_info=None)
    hello = S.Session(node="bravo", peer="alpha", now=0,
                      channels=[F.ChannelHello(name="data", max=1 << 20, credit=1 << 20)])
    await right.send_all(hello.data_to_send(0))

    with trio.fail_after(10):
        await supervisor.run_session(daemon, link, runner)
        got = await right.receive_some(1 << 16)
    assert link.active is None and link.sessions_opened == 0
    assert F.Bye("shutdown: peer is shutting down") in decode_all(got)


def stopping_daemon(link):
    """The daemon as the supervisor sees it (supervisor.Host), once it is stopping."""
    return SimpleNamespace(cfg=link.cfg, links={link.name: link}, board=None, gate=None,
                           stopping=True)


def decode_all(data):
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    decoder.feed(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


async def test_a_stopping_daemon_does_not_redial(tmp_path, autojump_clock):
    # its goodbye ends the session while the dial loop still runs (its scope is
    # cancelled after the goodbyes): it must not dial the peer again meanwhile
    link = make_link(node_config(tmp_path, trustme.CA(), "alpha",
                                 [peer_config("bravo", ("data",), ("127.0.0.1", 9))]),
                     "bravo")
    dials = []

    async def open_stream(host, port):
        dials.append(trio.current_time())
        raise OSError("unreachable")

    with trio.move_on_after(60) as waited:
        await supervisor.dial_loop(stopping_daemon(link), link, open_stream=open_stream)
    assert dials == [] and not waited.cancelled_caught      # it returned at once
