"""linkd.status: the board's JSON and metrics, the UNIX-socket server, the client side."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
import trio

from linkd.cli.status_cmd import run_metrics, run_status
from linkd.status import (
    StatusBoard,
    StatusSocketError,
    format_status,
    http_get,
    serve_status,
)

UTC = dt.UTC
T0 = dt.datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
COUNTERS = ("queued", "queued_bytes", "sent", "sent_bytes", "received", "received_bytes",
            "failed", "quarantined")


def parse_time(value: object) -> dt.datetime:
    assert isinstance(value, str), value
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() is not None, value
    return parsed


def make_board() -> StatusBoard:
    board = StatusBoard("alpha", "0.1.0", started_at=T0)
    board.add_peer("bravo", ["alerts", "data"], "connecting")
    board.add_peer("charlie", ["x"], "waiting")
    return board


def connect_bravo(board: StatusBoard) -> None:
    board.peers["bravo"].set_state(
        "connected", remote="127.0.0.1:7443", now=T0 + dt.timedelta(seconds=5),
        tls={"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
             "group": "X25519MLKEM768", "post_quantum": True,
             "peer_subject": "CN=bravo", "peer_not_after": T0 + dt.timedelta(days=800)})


# --------------------------------------------------------------------------- document


def check_peer(peer: dict, *, connected: bool) -> None:
    """The acceptance suite's checks (test_status.check_peer), mirrored."""
    assert {"name", "state", "since", "remote", "rtt_ms", "reconnects", "tls",
            "channels"} <= set(peer)
    assert peer["state"] in {"connected", "connecting", "backoff", "waiting"}
    parse_time(peer["since"])
    assert isinstance(peer["reconnects"], int)
    assert peer["rtt_ms"] is None or isinstance(peer["rtt_ms"], (int, float))
    if connected:
        assert peer["state"] == "connected" and peer["remote"].startswith("127.0.0.1:")
        assert peer["tls"]["version"] == "TLSv1.3"
        for key in ("cipher", "peer_subject", "peer_not_after"):
            assert isinstance(peer["tls"][key], str) and peer["tls"][key]
        parse_time(peer["tls"]["peer_not_after"])
    else:
        assert peer["state"] != "connected" and peer["tls"] is None and peer["remote"] is None
    for channel in peer["channels"]:
        assert isinstance(channel["name"], str)
        for key in COUNTERS:
            assert type(channel[key]) is int and channel[key] >= 0, (key, channel)
        assert "last_sent_at" in channel and "last_received_at" in channel
        for key in ("last_sent_at", "last_received_at"):
            if channel[key] is not None:
                parse_time(channel[key])


def test_document_of_a_fresh_board_has_every_field_with_nulls() -> None:
    doc = json.loads(json.dumps(make_board().document()))
    assert (doc["node"], doc["version"]) == ("alpha", "0.1.0")
    assert parse_time(doc["started_at"]) == T0
    assert doc["started_at"].endswith("Z")
    assert [p["name"] for p in doc["peers"]] == ["bravo", "charlie"]
    for peer in doc["peers"]:
        check_peer(peer, connected=False)
        assert peer["rtt_ms"] is None and peer["last_error"] is None
        for channel in peer["channels"]:
            assert channel["last_sent_at"] is None and channel["last_received_at"] is None
    assert [c["name"] for c in doc["peers"][0]["channels"]] == ["alerts", "data"]


def test_connected_peer_and_counters() -> None:
    board = make_board()
    connect_bravo(board)
    bravo = board.peers["bravo"]
    bravo.rtt_ms = 0.4
    data = bravo.channel("data")
    data.queued, data.queued_bytes = 2, 300
    data.note_sent(1000, T0 + dt.timedelta(seconds=9))
    data.note_sent(24)
    data.note_received(900)
    doc = json.loads(json.dumps(board.document()))
    peer = doc["peers"][0]
    check_peer(peer, connected=True)
    assert parse_time(peer["since"]) == T0 + dt.timedelta(seconds=5)
    assert peer["rtt_ms"] == 0.4
    assert parse_time(peer["tls"]["peer_not_after"]) == T0 + dt.timedelta(days=800)
    ch = peer["channels"][1]
    assert (ch["queued"], ch["queued_bytes"], ch["sent"], ch["sent_bytes"],
            ch["received"], ch["received_bytes"]) == (2, 300, 2, 1024, 1, 900)
    assert abs(parse_time(ch["last_sent_at"]) - dt.datetime.now(UTC)) < dt.timedelta(minutes=1)
    parse_time(ch["last_received_at"])


def test_set_state_rules() -> None:
    board = make_board()
    connect_bravo(board)
    bravo = board.peers["bravo"]
    bravo.rtt_ms = 3.0
    since = bravo.since
    bravo.set_state("connected", now=T0 + dt.timedelta(hours=1))   # no change of state
    assert bravo.since == since and bravo.remote == "127.0.0.1:7443" and bravo.tls
    retry = T0 + dt.timedelta(minutes=1)
    bravo.set_state("backoff", error="heartbeat timeout", now=T0 + dt.timedelta(seconds=30),
                    next_attempt_at=retry)
    assert (bravo.remote, bravo.tls, bravo.rtt_ms) == (None, None, None)
    assert bravo.since == T0 + dt.timedelta(seconds=30)
    assert bravo.last_error == "heartbeat timeout" and bravo.next_attempt_at == retry
    bravo.set_state("connecting")
    assert bravo.last_error == "heartbeat timeout" and bravo.next_attempt_at is None
    check_peer(board.document()["peers"][0], connected=False)
    with pytest.raises(ValueError):
        bravo.set_state("sleeping")
    with pytest.raises(ValueError):
        board.add_peer("delta", [], "up")


def test_sync_channels_keeps_counters_and_follows_the_new_order() -> None:
    board = make_board()
    board.peers["bravo"].channel("data").note_sent(5)
    board.sync_channels("bravo", ["new", "data"])
    assert list(board.peers["bravo"].channels) == ["new", "data"]
    assert board.peers["bravo"].channels["data"].sent == 1
    again = board.add_peer("bravo", ["data"], "connecting")
    assert again.channels["data"].sent == 1 and list(again.channels) == ["data"]
    board.remove_peer("bravo")
    board.remove_peer("nobody")
    assert list(board.peers) == ["charlie"]


def test_naive_datetimes_are_taken_as_utc() -> None:
    board = StatusBoard("n", "1", started_at=dt.datetime(2026, 1, 2, 3, 4, 5))
    assert board.document()["started_at"] == "2026-01-02T03:04:05.000Z"


# --------------------------------------------------------------------------- metrics

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_metrics(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """A strict little parser of the text format: (types by family, samples)."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in types
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        labels: dict[str, str] = {}
        rest = m.group(2) or ""
        while rest:
            lm = LABEL.match(rest)
            assert lm, f"bad labels in {line!r}"
            raw = lm.group(2)
            labels[lm.group(1)] = re.sub(r'\\(.)', lambda x: "\n" if x[1] == "n" else x[1], raw)
            rest = rest[lm.end():]
        assert m.group(1) in types, f"{m.group(1)} has no TYPE line"
        samples.append((m.group(1), labels, float(m.group(3))))
    return types, samples


def test_metrics_parse_with_linkd_names_and_values() -> None:
    board = make_board()
    connect_bravo(board)
    board.peers["bravo"].rtt_ms = 2.5
    board.peers["bravo"].reconnects = 3
    board.peers["bravo"].priority_held_s = 1.25
    board.peers["bravo"].channel("data").note_sent(100)
    types, samples = parse_metrics(board.metrics())
    assert all(name.startswith("linkd_") for name in types)
    got = {(n, tuple(sorted(lb.items()))): v for n, lb, v in samples}

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("linkd_info", node="alpha", version="0.1.0") == 1
    assert value("linkd_start_time_seconds") == T0.timestamp()
    assert value("linkd_audit_log_failed") == 0
    board.audit_problem = lambda: "the audit log ... cannot be written"
    assert ("linkd_audit_log_failed", {}, 1.0) in parse_metrics(board.metrics())[1]
    assert value("linkd_peer_up", peer="bravo") == 1
    assert value("linkd_peer_up", peer="charlie") == 0
    assert value("linkd_peer_state", peer="bravo", state="connected") == 1
    assert value("linkd_peer_state", peer="bravo", state="backoff") == 0
    assert value("linkd_peer_state", peer="charlie", state="waiting") == 1
    assert value("linkd_peer_reconnects_total", peer="bravo") == 3
    assert value("linkd_peer_priority_held_seconds_total", peer="bravo") == 1.25
    assert value("linkd_peer_priority_held_seconds_total", peer="charlie") == 0
    assert value("linkd_peer_rtt_seconds", peer="bravo") == 0.0025
    assert ("linkd_peer_rtt_seconds", (("peer", "charlie"),)) not in got   # unknown: omitted
    assert value("linkd_channel_sent_messages_total", peer="bravo", channel="data") == 1
    assert value("linkd_channel_sent_bytes_total", peer="bravo", channel="data") == 100
    for family in ("queued_messages", "queued_bytes", "received_messages_total",
                   "received_bytes_total", "failed_files",
                   "quarantined_messages_total"):
        assert value(f"linkd_channel_{family}", peer="charlie", channel="x") == 0
    assert types["linkd_channel_sent_messages_total"] == "counter"
    assert types["linkd_channel_queued_bytes"] == "gauge"
    assert value("linkd_channel_inbound_failing", peer="bravo", channel="data") == 0
    board.peers["bravo"].channel("data").inbound_error = "[Errno 28] No space left"
    assert ("linkd_channel_inbound_failing", {"peer": "bravo", "channel": "data"}, 1.0) \
        in parse_metrics(board.metrics())[1]
    board.peers["bravo"].channel("data").note_received(10)     # stored again
    assert ("linkd_channel_inbound_failing", {"peer": "bravo", "channel": "data"}, 0.0) \
        in parse_metrics(board.metrics())[1]


def test_the_oldest_queued_age_is_read_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # operator trial: it was the age when the queue last changed, frozen after that
    import linkd.status.board as board_mod
    board = make_board()
    connect_bravo(board)
    data = board.peers["bravo"].channel("data")
    now = [1_000_000.0]
    monkeypatch.setattr(board_mod.time, "time", lambda: now[0])
    data.oldest_queued_at = now[0] - 2
    assert data.document()["oldest_queued_age_s"] == 2
    now[0] += 600                   # nothing moved since (a paused channel, a link down)
    assert data.document()["oldest_queued_age_s"] == 602
    assert ("linkd_channel_oldest_queued_age_seconds", {"peer": "bravo", "channel": "data"},
            602.0) in parse_metrics(board.metrics())[1]
    data.oldest_queued_at = None
    assert data.document()["oldest_queued_age_s"] is None


def test_metrics_escape_label_values() -> None:
    weird = 'a"b\\c\nd'
    board = StatusBoard("n", weird)
    board.add_peer("p", ["c"], "waiting")
    text = board.metrics()
    assert 'version="a\\"b\\\\c\\nd"' in text
    _, samples = parse_metrics(text)
    assert ("linkd_info", {"node": "n", "version": weird}, 1.0) in samples


# --------------------------------------------------------------------------- formatting


def test_format_status_names_peers_states_and_channels() -> None:
    board = make_board()
    connect_bravo(board)
    board.peers["bravo"].rtt_ms = 0.4
    board.peers["bravo"].channel("data").note_sent(4096, T0 + dt.timedelta(seconds=50))
    board.peers["charlie"].set_state("backoff", error="connection refused")
    text = format_status(json.loads(json.dumps(board.document())),
                         now=T0 + dt.timedelta(minutes=1, seconds=2))
    assert "alpha" in text and "0.1.0" in text and "up 1m 2s" in text
    assert re.search(r"^bravo\s+connected \(57s\)\s+127\.0\.0\.1:7443\s+0\.4 ms\s+0\s+-$",
                     text, re.M), text
    assert "connection refused" in text
    assert re.search(r"^\s+data\s+0 \(0 B\)\s+1 \(4\.0 KiB\)\s+0 \(0 B\)\s+0\s+0\s+12s ago\s+-$",
                     text, re.M), text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("PEER"))
    row = next(line for line in lines if line.startswith("bravo"))
    assert row.index("127.0.0.1") == header.index("REMOTE")      # aligned columns
    assert "TLS_AES_256_GCM_SHA384 X25519MLKEM768, peer CN=bravo" in text, text
    assert "held back" not in text                  # no hold yet: no line
    board.peers["bravo"].priority_held_s = 75.5
    text = format_status(json.loads(json.dumps(board.document())),
                         now=T0 + dt.timedelta(minutes=1, seconds=2))
    assert "  lower priorities held back 1m 15s in all" in text, text
    board.peers["bravo"].priority_held_s = 0.4        # under a minute: tenths
    text = format_status(json.loads(json.dumps(board.document())))
    assert "  lower priorities held back 0.4s in all" in text, text


def test_format_status_shows_a_channel_that_cannot_store() -> None:
    # operator trial: a full disk on the receiving side showed in its /status JSON,
    # check and metrics, but its own status table looked normal
    board = make_board()
    connect_bravo(board)
    board.peers["bravo"].channel("data").inbound_error = \
        "writing seq 3 on bravo/data failed: No space left on device"
    text = format_status(json.loads(json.dumps(board.document())), now=T0)
    assert "  data: CANNOT STORE what the peer sends: writing seq 3 on bravo/data failed: " \
           "No space left on device" in text, text
    board.peers["bravo"].channel("data").note_received(10)    # it stores again
    assert "CANNOT STORE" not in format_status(json.loads(json.dumps(board.document())),
                                               now=T0)


def test_format_status_puts_a_held_reason_under_the_table() -> None:
    # second operator trial: a long held reason, in the channel column, made the
    # table hundreds of columns wide
    board = make_board()
    connect_bravo(board)
    reason = "bravo cannot store it now: " + "No space left on device; " * 8
    board.peers["bravo"].channel("data").held = reason
    text = format_status(json.loads(json.dumps(board.document())), now=T0)
    assert f"  data: held: {reason}" in text, text
    table = [line for line in text.splitlines() if line.lstrip().startswith("data (held)")]
    assert table and len(table[0]) < 120, text


def test_format_status_copes_with_no_peers_and_odd_values() -> None:
    assert "no peers" in format_status({"node": "n", "version": "1", "peers": []})
    assert "bravo" in format_status({"peers": [{"name": "bravo", "channels": None}]})


# --------------------------------------------------------------------------- the server


@pytest.fixture
def sock_path() -> Iterator[Path]:
    """A short socket path: pytest's tmp_path can exceed the 107-byte AF_UNIX limit."""
    folder = Path(tempfile.mkdtemp(prefix="lst", dir="/tmp"))
    yield folder / "run" / "status.sock"
    shutil.rmtree(folder)


def present(path: Path) -> bool:
    return os.path.lexists(path)


async def get(path: Path, url: str) -> tuple[int, bytes]:
    return await trio.to_thread.run_sync(http_get, path, url)


async def raw_exchange(path: Path, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        while data:
            data = data[await sock.send(data):]
        chunks = []
        while chunk := await sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def without_process(text: str) -> str:
    """The exposition without prometheus_client's process_* families (they change)."""
    return "".join(line + "\n" for line in text.splitlines()
                   if "process_" not in line.split("{")[0].split(" ")[0 if line[0] != "#" else 2]
                   ) if text else text


async def test_server_answers_healthz_status_metrics(sock_path: Path) -> None:
    board = make_board()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, board, sock_path)
        assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
        assert await get(sock_path, "/healthz") == (200, b"ok\n")
        code, body = await get(sock_path, "/status")
        assert code == 200 and json.loads(body) == json.loads(json.dumps(board.document()))
        board.peers["bravo"].channel("data").note_received(7)      # live, not a snapshot
        code, body = await get(sock_path, "/status?pretty=0")
        assert json.loads(body)["peers"][0]["channels"][1]["received"] == 1
        code, body = await get(sock_path, "/metrics")
        assert code == 200 and without_process(body.decode()) == board.metrics()
        assert "process_open_fds" in body.decode()      # prometheus_client's own collector
        assert (await get(sock_path, "/nope"))[0] == 404
        nursery.cancel_scope.cancel()


async def test_content_types_405_and_keep_alive(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, make_board(), sock_path)
        stream = await trio.open_unix_socket(str(sock_path))
        client = h11.Connection(h11.CLIENT)

        async def ask(method: str, target: str, body: bytes = b"") -> tuple[h11.Response, bytes]:
            headers = [("Host", "linkd"), ("Content-Length", str(len(body)))]
            await stream.send_all(client.send(h11.Request(method=method, target=target,
                                                          headers=headers))
                                  + client.send(h11.Data(data=body))
                                  + client.send(h11.EndOfMessage()))
            response, data = None, b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert response is not None
                    client.start_next_cycle()     # fails unless the connection stays open
                    return response, data

        status, _ = await ask("GET", "/status")
        assert status.status_code == 200
        assert dict(status.headers)[b"content-type"] == b"application/json"
        metrics, _ = await ask("GET", "/metrics")
        assert dict(metrics.headers)[b"content-type"].startswith(b"text/plain; version=0.0.4")
        post, _ = await ask("POST", "/status", b"x=1")
        assert post.status_code == 405 and dict(post.headers)[b"allow"] == b"GET, HEAD"
        health, body = await ask("GET", "/healthz")
        assert (health.status_code, body) == (200, b"ok\n")
        head, body = await ask("HEAD", "/healthz")
        assert (head.status_code, body) == (200, b"")
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_garbage_gets_400_and_the_server_keeps_serving(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, make_board(), sock_path)
        answer = await raw_exchange(sock_path, b"\x00\x01 garbage \xff\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        answer = await raw_exchange(sock_path, b"GET /healthz HTTP/1.1\r\n\r\n")  # no Host
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        big = b"GET /status HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
        answer = await raw_exchange(sock_path, big)
        assert answer.split(b" ")[1] in (b"413", b"431"), answer[:100]
        assert await get(sock_path, "/healthz") == (200, b"ok\n")
        nursery.cancel_scope.cancel()


async def test_an_idle_client_is_dropped_after_the_request_timeout(
        sock_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, make_board(), sock_path)
        start = trio.current_time()
        assert await raw_exchange(sock_path, b"GET /hea") == b""     # never finished
        assert 10 <= trio.current_time() - start < 11
        nursery.cancel_scope.cancel()


async def test_socket_mode_and_removal_on_cancel(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, make_board(), sock_path)
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        nursery.cancel_scope.cancel()
    assert not present(sock_path)


async def test_a_replaced_socket_is_not_removed_on_cancel(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, make_board(), sock_path)
        os.unlink(sock_path)
        successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        successor.bind(str(sock_path))
        nursery.cancel_scope.cancel()
    assert present(sock_path)
    successor.close()


async def test_a_stale_socket_is_replaced(sock_path: Path) -> None:
    os.mkdir(sock_path.parent)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()                         # the file stays, nobody listens
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, make_board(), sock_path)
        assert await get(sock_path, "/healthz") == (200, b"ok\n")
        nursery.cancel_scope.cancel()


async def test_a_live_socket_is_refused(sock_path: Path) -> None:
    os.mkdir(sock_path.parent)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(sock_path))
    live.listen(1)
    with live, pytest.raises(StatusSocketError) as info:
        await serve_status(make_board(), sock_path)
    assert str(info.value) == (f"status socket {sock_path} is in use by another linkd: "
                               f"stop it first")
    assert present(sock_path)


async def test_a_file_in_the_way_and_a_long_path_are_refused(sock_path: Path) -> None:
    os.mkdir(sock_path.parent)
    os.mkdir(sock_path)
    with pytest.raises(StatusSocketError, match="exists and is not a socket"):
        await serve_status(make_board(), sock_path)
    assert stat.S_ISDIR(os.lstat(sock_path).st_mode)
    with pytest.raises(StatusSocketError, match="too long"):
        await serve_status(make_board(), sock_path.parent / ("x" * 120))


# --------------------------------------------------------------------------- linkctl


async def test_linkctl_status_json_and_metrics(sock_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    board = make_board()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, board, sock_path)
        assert await trio.to_thread.run_sync(run_status, sock_path, False) == 0
        out = capsys.readouterr().out
        assert "bravo" in out and "connecting" in out
        assert await trio.to_thread.run_sync(run_status, sock_path, True) == 0
        out = capsys.readouterr().out
        assert json.loads(out) == json.loads(json.dumps(board.document()))
        # the contract's keys, then ours: `audit` (why deliveries are refused, or null)
        assert list(json.loads(out)) == ["node", "version", "started_at", "peers", "tls",
                                         "audit"]
        assert await trio.to_thread.run_sync(run_metrics, sock_path) == 0
        assert without_process(capsys.readouterr().out) == board.metrics()
        nursery.cancel_scope.cancel()


def test_linkctl_without_a_daemon_prints_one_line(sock_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run_status(sock_path, False) == 1               # no such file
    os.mkdir(sock_path.parent)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    assert run_metrics(sock_path) == 1                     # connection refused
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert lines[0] == (f"linkctl: no linkd answers on {sock_path}: no such file or directory "
                        f"(is the daemon running? check `systemctl status linkd`)")
    assert "connection refused" in lines[1] and str(sock_path) in lines[1]


@pytest.mark.parametrize("error, expected", [
    (PermissionError(13, "Permission denied"),
     "run as root or as a member of the socket's group"),
    (TimeoutError("timed out"), "no answer in time"),
    (OSError("AF_UNIX path too long"), "AF_UNIX path too long"),
])
def test_linkctl_failures_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str],
                                       error: OSError, expected: str) -> None:
    def refuse(*args: object, **kwargs: object) -> tuple[int, bytes]:
        raise error

    monkeypatch.setattr("linkd.cli.status_cmd.http_get", refuse)
    assert run_status(Path("/run/linkd/status.sock"), True) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "/run/linkd/status.sock" in err


def test_linkctl_reports_an_http_error(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("linkd.cli.status_cmd.http_get", lambda *a, **k: (500, b"boom\nmore"))
    assert run_metrics(Path("/s.sock")) == 1
    assert capsys.readouterr().err == ("linkctl: linkd on /s.sock answered /metrics with "
                                       "HTTP 500: boom\n")
