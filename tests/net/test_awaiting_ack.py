"""Messages sent whole that the peer has not acknowledged (issue 13's closing note:
/status showed only the message being sent, so a connected peer that stored nothing
and said nothing looked like an idle link with a queue). /status `awaiting_ack`,
the metrics, `linkctl status` and `linkctl check` show them, and the log says
`ack_overdue` once a message has waited ACK_OVERDUE seconds for its ack."""

from __future__ import annotations

import datetime as dt

import pytest
import structlog
import trio
import trustme
from memlink import FakePeer, drop, make_link, node_config, peer_config, scan_sync
from net.test_ack_evidence import run_against

from linkd.cli.ops_cmd import evaluate
from linkd.cli.status_client import format_status
from linkd.metrics import render_metrics
from linkd.net.sender import ACK_OVERDUE
from linkd.status.board import StatusBoard


@pytest.fixture(autouse=True)
def inline_threads(monkeypatch):
    """Thread hops inline: under autojump_clock, virtual time would otherwise leap
    ahead while a worker thread fsyncs (see net/test_resilience_clock.py)."""
    async def inline(fn, *args, **kwargs):
        await trio.lowlevel.checkpoint_if_cancelled()
        return fn(*args)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)


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


def test_linkctl_check_warns_of_an_overdue_ack():
    now = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
    doc = {"peers": [{"name": "bravo", "state": "connected", "channels": [
        {"name": "data", "queued": 2, "awaiting_ack": 2, "oldest_unacked_age_s": 75.0}]}]}
    code, line = evaluate(doc, 15.0, None, now)
    assert code == 1 and "bravo/data 2 sent, not acknowledged for 75s" in line, line
    doc["peers"][0]["channels"][0]["oldest_unacked_age_s"] = 3.0
    assert evaluate(doc, 15.0, None, now)[0] == 0
