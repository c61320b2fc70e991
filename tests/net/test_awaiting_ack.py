"""Messages sent whole that the peer has not acknowledged (issue 13's closing note:
/status showed only the message being sent, so a connected peer that stored nothing
and said nothing looked like an idle link with a queue). /status `awaiting_ack`,
the metrics, `linkctl status` and `linkctl check` show them, and the log says
`ack_overdue` once a message has waited ACK_OVERDUE seconds for its ack."""

from __future__ import annotations

import datetime as dt
import os

import pytest
import structlog
import trio
import trustme
from memlink import (
    FAR,
    FakePeer,
    drop,
    make_link,
    node_config,
    peer_config,
    scan_sync,
)
from net.test_ack_evidence import run_against

from linkd.cli.ops_cmd import evaluate
from linkd.cli.status_client import format_status
from linkd.metrics import render_metrics
from linkd.net.sender import ACK_OVERDUE, SenderMixin
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.spool import outbound_items
from linkd.status.board import StatusBoard

pytestmark = pytest.mark.usefixtures("inline_threads")     # exact virtual time


MiB = 1 << 20


def two_files(tmp_path):
    link = make_link(node_config(tmp_path, trustme.CA(), "alpha",
                                 [peer_config("bravo", ("data",))]), "bravo")
    drop(link, "data", "a.txt", b"a" * 1000)
    drop(link, "data", "b.txt", b"b" * 3000)
    scan_sync(link)
    return link


async def test_a_peer_that_never_acknowledges_shows_and_is_logged(tmp_path, autojump_clock):
    link = two_files(tmp_path)
    peer = FakePeer(None, ack=False)
    seen = {}

    async def until(runner, peer):
        while len(peer.complete) < 2:  # noqa: ASYNC110 (the peer's side)
            await trio.sleep(0.01)
        seen["early"] = link.status.channel("data").document()
        await trio.sleep(ACK_OVERDUE + 15)
        seen["late"] = link.status.channel("data").document()
        seen["metrics"] = render_metrics(board).decode()
        seen["status"] = format_status({"node": "alpha", "peers": [link.status.document()]})
    board = StatusBoard("alpha", "test")
    board.peers["bravo"] = link.status
    with structlog.testing.capture_logs() as logs:
        await run_against(link, peer, until)

    early, late = seen["early"], seen["late"]
    assert (early["awaiting_ack"], early["awaiting_ack_bytes"]) == (2, 4000)
    assert early["oldest_unacked_age_s"] < 5
    assert (late["awaiting_ack"], late["awaiting_ack_bytes"]) == (2, 4000)
    assert late["oldest_unacked_age_s"] >= ACK_OVERDUE
    assert late["queued"] == 2 and late["sent"] == 0     # still queued: nothing was lost
    assert 'linkd_channel_awaiting_ack_messages{channel="data",peer="bravo"} 2.0' \
        in seen["metrics"]
    assert "linkd_channel_oldest_unacked_age_seconds{" in seen["metrics"]
    assert "data: 2 sent (3.9 KiB), awaiting the peer's acknowledgement, the oldest for " \
        "1m" in seen["status"], seen["status"]
    overdue = [e for e in logs if e["event"] == "ack_overdue"]
    assert len(overdue) == 1, overdue          # once per message, not every 10 s
    assert (overdue[0]["seq"], overdue[0]["name"], overdue[0]["awaiting"]) == (1, "a.txt", 2)
    assert overdue[0]["log_level"] == "warning" and "not acknowledged" in overdue[0]["reason"]
    # without a session there is nothing awaiting an ack (the next session resends)
    after = link.status.channel("data").document()
    assert (after["awaiting_ack"], after["oldest_unacked_age_s"]) == (0, None)


async def test_acks_that_come_after_ack_overdue_are_logged(tmp_path, autojump_clock):
    link = two_files(tmp_path)
    peer = FakePeer(None, ack=False)

    async def until(runner, peer):
        while len(peer.complete) < 2:  # noqa: ASYNC110 (the peer's side)
            await trio.sleep(0.01)
        await trio.sleep(ACK_OVERDUE + 15)
        peer.ack = True                 # its storage is back: it acknowledges both
        for seq in (1, 2):
            peer._done("data", seq, trio.current_time())
        await peer.flush()
        while link.status.channel("data").sent < 2:  # noqa: ASYNC110 (resolved in a thread)
            await trio.sleep(0.01)
    with structlog.testing.capture_logs() as logs:
        await run_against(link, peer, until)
    events = [e["event"] for e in logs if e["event"] in ("ack_overdue", "ack_resumed")]
    assert events == ["ack_overdue", "ack_resumed"]
    [resumed] = [e for e in logs if e["event"] == "ack_resumed"]
    assert resumed["seq"] == 1 and resumed["waited_s"] >= ACK_OVERDUE + 15


async def test_an_ack_resolved_while_the_next_message_turns_overdue_is_logged(
        tmp_path, autojump_clock):
    # review: the watch found the next message overdue while the first one's ack was
    # being resolved (a thread hop), took the channel's one overdue slot, and the
    # first message's ack_resumed was never logged
    link = two_files(tmp_path)
    peer = FakePeer(None, ack=False)
    spool = link.spools["data"]
    resolve = spool.resolve

    async def slow_resolve(*args, **kwargs):
        await trio.sleep(15)            # past the watch's next look (ACK_WATCH_INTERVAL)
        return await resolve(*args, **kwargs)
    spool.resolve = slow_resolve

    async def until(runner, peer):
        while len(peer.complete) < 2:  # noqa: ASYNC110 (the peer's side)
            await trio.sleep(0.01)
        await trio.sleep(ACK_OVERDUE + 5)
        peer.ack = True
        peer._done("data", 1, trio.current_time())
        await peer.flush()
        await trio.sleep(40)
        peer._done("data", 2, trio.current_time())
        await peer.flush()
        while link.status.channel("data").sent < 2:  # noqa: ASYNC110 (resolved in a thread)
            await trio.sleep(0.01)
    with structlog.testing.capture_logs() as logs:
        await run_against(link, peer, until)
    events = [(e["event"], e["seq"]) for e in logs
              if e["event"] in ("ack_overdue", "ack_resumed")]
    assert events == [("ack_overdue", 1), ("ack_overdue", 2), ("ack_resumed", 1),
                      ("ack_resumed", 2)], events
    assert link.ack_overdue == {}


async def test_an_ack_that_comes_in_the_next_session_is_logged_too(tmp_path, autojump_clock):
    # the advice of ack_overdue is a new session (linkctl reconnect --force): the
    # peer, asked what it holds, answers for the overdue file there
    link = two_files(tmp_path)

    async def overdue(runner, peer):
        while len(peer.complete) < 2:  # noqa: ASYNC110 (the peer's side)
            await trio.sleep(0.01)
        await trio.sleep(ACK_OVERDUE + 15)
    with structlog.testing.capture_logs() as logs:
        await run_against(link, FakePeer(None, ack=False), overdue)
        holds = {("data", 1): b"a" * 1000, ("data", 2): b"b" * 3000}

        async def resolved(runner, peer):
            while link.status.channel("data").sent < 2:  # noqa: ASYNC110 (in a thread)
                await trio.sleep(0.01)
        await run_against(link, FakePeer(None, committed=2, holds=holds), resolved)
    events = [e["event"] for e in logs if e["event"] in ("ack_overdue", "ack_resumed")]
    assert events == ["ack_overdue", "ack_resumed"]


async def test_acknowledged_messages_do_not_await(tmp_path, autojump_clock):
    link = two_files(tmp_path)
    peer = FakePeer(None)
    seen = {}

    async def until(runner, peer):
        while link.status.channel("data").sent < 2:  # noqa: ASYNC110 (resolved in a thread)
            await trio.sleep(0.01)
        seen["doc"] = link.status.channel("data").document()
        await trio.sleep(ACK_OVERDUE + 15)
    with structlog.testing.capture_logs() as logs:
        await run_against(link, peer, until)
    assert (seen["doc"]["awaiting_ack"], seen["doc"]["oldest_unacked_age_s"]) == (0, None)
    assert not [e for e in logs if e["event"] == "ack_overdue"]


async def sent_whole(link, peer, frame):
    """Run until the peer got a frame of type `frame`, then a little more; return the
    channel's /status document then."""
    seen = {}

    async def until(runner, peer):
        while not peer.of(frame):  # noqa: ASYNC110 (the peer's side)
            await trio.sleep(0.01)
        await trio.sleep(1)
        seen["doc"] = link.status.channel("data").document()
    await run_against(link, peer, until)
    return seen["doc"]


async def test_a_big_file_awaits_its_ack_once_its_late_sha256_is_sent(
        tmp_path, autojump_clock, monkeypatch):
    monkeypatch.setattr(outbound_items, "LATE_HASH", 1 * MiB)
    link = make_link(node_config(tmp_path, trustme.CA(), "alpha",
                                 [peer_config("bravo", ("data",))]), "bravo")
    drop(link, "data", "big.bin", os.urandom(2 * MiB))
    scan_sync(link)
    assert link.outbound["data"].pending()[0].sha256 == ""      # hashed late
    doc = await sent_whole(link, FakePeer(None, ack=False), F.Sum)
    assert (doc["awaiting_ack"], doc["awaiting_ack_bytes"], doc["in_flight"]) == \
        (1, 2 * MiB, None)


async def test_a_probe_awaits_its_answer(tmp_path, autojump_clock):
    # the peer says it committed seq 1 already (e.g. our state was restored from a
    # backup): we ask what it holds there, and that waits for its answer too
    link = make_link(node_config(tmp_path, trustme.CA(), "alpha",
                                 [peer_config("bravo", ("data",))]), "bravo")
    drop(link, "data", "a.txt", b"a" * 1000)
    scan_sync(link)
    doc = await sent_whole(link, FakePeer(None, ack=False, committed=1), F.Msg)
    assert (doc["awaiting_ack"], doc["awaiting_ack_bytes"]) == (1, 1000)


async def test_a_resume_with_nothing_left_to_send_awaits_its_ack(tmp_path, autojump_clock):
    # the peer has all of the file checkpointed (its hello's resume is at the end)
    link = make_link(node_config(tmp_path, trustme.CA(), "alpha",
                                 [peer_config("bravo", ("data",))]), "bravo")
    drop(link, "data", "a.txt", b"a" * 1000)
    scan_sync(link)
    peer = FakePeer(None, ack=False)
    peer.session = S.Session(
        node="bravo", peer="alpha", now=trio.current_time(),
        channels=[F.ChannelHello(name="data", max=1 << 40, credit=4 << 20, resume=(1, 1000))],
        heartbeat_interval=FAR, heartbeat_timeout=FAR, handshake_timeout=FAR)
    doc = await sent_whole(link, peer, F.Msg)
    [msg] = [f for _, f in peer.frames if isinstance(f, F.Msg)]
    assert msg.offset == msg.size == 1000                       # no data went out
    assert (doc["awaiting_ack"], doc["awaiting_ack_bytes"]) == (1, 1000)


async def test_an_ack_that_came_is_not_awaited_while_our_disk_applies_it(
        tmp_path, autojump_clock, monkeypatch):
    # acks wait in a queue while an earlier batch is applied (receipts stored,
    # files removed): a slow disk of ours must not be blamed on the peer
    link = two_files(tmp_path)
    monkeypatch.setattr(SenderMixin, "_resolve_acks", hang)
    seen = {}

    async def until(runner, peer):
        while len(peer.complete) < 2:  # noqa: ASYNC110 (the peer's side)
            await trio.sleep(0.01)
        await trio.sleep(ACK_OVERDUE + 15)
        seen["doc"] = link.status.channel("data").document()
    with structlog.testing.capture_logs() as logs:
        await run_against(link, FakePeer(None), until)
    assert (seen["doc"]["awaiting_ack"], seen["doc"]["queued"]) == (0, 2)
    assert not [e for e in logs if e["event"] == "ack_overdue"]


async def hang(self, ch, entries):
    await trio.sleep_forever()


async def test_an_idle_session_does_not_wake_to_watch_acks(
        tmp_path, autojump_clock, monkeypatch):
    # a hub's idle peers: the watch sleeps without a deadline until a message is sent
    link = two_files(tmp_path)
    looks = []
    real = SenderMixin._unacked
    monkeypatch.setattr(SenderMixin, "_unacked",
                        staticmethod(lambda state: looks.append(1) or real(state)))
    seen = {}

    async def until(runner, peer):
        while link.status.channel("data").sent < 2:  # noqa: ASYNC110 (resolved in a thread)
            await trio.sleep(0.01)
        await trio.sleep(ACK_OVERDUE + 1)       # the watch's last deadline passes
        seen["before"] = len(looks)
        await trio.sleep(400)
        seen["after"] = len(looks)
        seen["idle"] = runner.ack_watch_idle
    await run_against(link, FakePeer(None), until)
    assert seen["after"] == seen["before"] and seen["idle"] is True


def test_linkctl_check_warns_of_an_overdue_ack():
    now = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
    doc = {"peers": [{"name": "bravo", "state": "connected", "channels": [
        {"name": "data", "queued": 2, "awaiting_ack": 2, "oldest_unacked_age_s": 75.0}]}]}
    code, line = evaluate(doc, 15.0, None, now)
    assert code == 1 and "bravo/data 2 awaiting the peer's ack, the oldest for 75s" in line, \
        line
    doc["peers"][0]["channels"][0]["oldest_unacked_age_s"] = 3.0
    assert evaluate(doc, 15.0, None, now)[0] == 0


def test_a_held_message_the_peer_holds_in_part_shows_what_it_holds():
    # second operator trial: `linkctl queue` showed SENT 0 B for a held 1 GiB file of
    # which the peer already held 620 MB (its busy nack's resume point)
    from types import SimpleNamespace

    from linkd.net.connection import SessionRunner
    state = SimpleNamespace(current=None, in_flight={}, offset=0, resume=(5, 620 << 20))
    runner = SimpleNamespace(out={"bulk": state})
    assert SessionRunner.progress(runner, "bulk", 5) == (620 << 20, False)
    assert SessionRunner.progress(runner, "bulk", 6) == (0, False)
    state.resume = None
    assert SessionRunner.progress(runner, "bulk", 5) == (0, False)
