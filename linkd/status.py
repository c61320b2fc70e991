"""Live status: a board of plain data, and an HTTP/1.1 server for it on a UNIX socket.

Theory of operation
-------------------
`StatusBoard` is plain data with no knowledge of sessions, spools or time
sources: the daemon mutates it (peer states, counters) from its own tasks, and
the server only reads it. Because trio is single-threaded and the board is
never touched from worker threads, no locking is needed; `document()` and
`metrics()` build a fresh snapshot on every request.

`serve_status` binds an AF_UNIX stream socket (CONTRACT §6):

* An existing path is checked first: a socket that answers `connect()` belongs
  to a live daemon and we refuse to start; a socket that refuses is stale and
  is unlinked; anything else is left alone and we refuse to start.
* The bind runs under umask 0177, synchronously (no checkpoint, so no other
  trio task runs meanwhile), so the socket is born 0600; it is then widened to
  exactly 0660 (CONTRACT §5). There is no moment when others may connect.
* Each connection is served by its own task speaking h11, with keep-alive.
  Reading a request (and writing its answer) has a deadline, so an idle or
  stuck client is dropped instead of piling up. Malformed HTTP gets a 400 and a
  close; no client behaviour can raise out of the server.
* On cancellation the listener is closed and the socket file is unlinked, but
  only if it is still the one we bound (same st_dev/st_ino): a successor
  daemon that replaced a file we considered ours keeps its socket.

The client half (`http_get`, `format_status`) is synchronous stdlib code for
`linkctl`, which must not start trio.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.client
import json
import os
import socket
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h11
import structlog
import trio

from .errors import LinkdError

STATES = ("connected", "connecting", "backoff", "waiting")
REQUEST_TIMEOUT = 10.0          # seconds to read one request (also the keep-alive idle limit)
MAX_REQUEST_BYTES = 16384       # request head + body; larger requests get 413 and a close
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = structlog.get_logger("linkd.status")


class StatusSocketError(LinkdError):
    """The status socket cannot be set up. str() is the one line to print."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(when: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC with a "Z"; naive datetimes are taken to be UTC already."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class ChannelStats:
    """Counters of one channel of one peer, since the daemon started (CONTRACT §10).

    `queued`/`queued_bytes` are set by the daemon from the outbound spool; the
    `note_*` helpers count acknowledged (sent) and delivered (received) files.
    """

    name: str
    queued: int = 0
    queued_bytes: int = 0
    sent: int = 0
    sent_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    failed: int = 0
    quarantined: int = 0
    last_sent_at: dt.datetime | None = None
    last_received_at: dt.datetime | None = None

    def note_sent(self, size: int, when: dt.datetime | None = None) -> None:
        self.sent += 1
        self.sent_bytes += size
        self.last_sent_at = when or _utcnow()

    def note_received(self, size: int, when: dt.datetime | None = None) -> None:
        self.received += 1
        self.received_bytes += size
        self.last_received_at = when or _utcnow()

    def document(self) -> dict[str, Any]:
        return {"name": self.name, "queued": self.queued, "queued_bytes": self.queued_bytes,
                "sent": self.sent, "sent_bytes": self.sent_bytes, "received": self.received,
                "received_bytes": self.received_bytes, "failed": self.failed,
                "quarantined": self.quarantined, "last_sent_at": _iso(self.last_sent_at),
                "last_received_at": _iso(self.last_received_at)}


@dataclasses.dataclass
class PeerStatus:
    """One configured peer. The daemon increments `reconnects` and sets `rtt_ms` itself."""

    name: str
    state: str                              # one of STATES
    since: dt.datetime
    remote: str | None = None               # "IP:PORT" while connected
    rtt_ms: float | None = None             # None until the first pong of a session
    reconnects: int = 0
    last_error: str | None = None
    tls: dict[str, Any] | None = None       # version, cipher, peer_subject, peer_not_after
    next_attempt_at: dt.datetime | None = None
    channels: dict[str, ChannelStats] = dataclasses.field(default_factory=dict)

    def set_state(self, state: str, *, remote: str | None = None,
                  tls: dict[str, Any] | None = None, error: str | None = None,
                  now: dt.datetime | None = None,
                  next_attempt_at: dt.datetime | None = None) -> None:
        """Move to `state`. `since` changes only with the state. Anything but
        "connected" forgets remote, tls and rtt; `error` (if given) is kept in
        `last_error` across states; `next_attempt_at` is kept only in "backoff"."""
        if state not in STATES:
            raise ValueError(f"unknown peer state {state!r}")
        if state != self.state:
            self.state, self.since = state, now or _utcnow()
        if state == "connected":
            self.remote = remote if remote is not None else self.remote
            self.tls = tls if tls is not None else self.tls
        else:
            self.remote = self.tls = self.rtt_ms = None
        self.next_attempt_at = next_attempt_at if state == "backoff" else None
        if error is not None:
            self.last_error = error

    def channel(self, name: str) -> ChannelStats:
        """The channel's stats, created (empty) if new."""
        if name not in self.channels:
            self.channels[name] = ChannelStats(name)
        return self.channels[name]

    def document(self) -> dict[str, Any]:
        tls = None if self.tls is None else {
            k: _iso(v) if isinstance(v, dt.datetime) else v for k, v in self.tls.items()}
        rtt = None if self.rtt_ms is None else round(float(self.rtt_ms), 3)
        return {"name": self.name, "state": self.state, "since": _iso(self.since),
                "remote": self.remote, "rtt_ms": rtt, "reconnects": self.reconnects,
                "tls": tls, "last_error": self.last_error,
                "next_attempt_at": _iso(self.next_attempt_at),
                "channels": [c.document() for c in self.channels.values()]}


class StatusBoard:
    """Everything /status and /metrics report. Peers keep insertion (config) order."""

    def __init__(self, node: str, version: str, started_at: dt.datetime | None = None):
        self.node = node
        self.version = version
        self.started_at = started_at or _utcnow()
        self.peers: dict[str, PeerStatus] = {}

    def add_peer(self, name: str, channels: Iterable[str], state: str) -> PeerStatus:
        """Register a peer (or, if known, keep its counters and sync its channels)."""
        peer = self.peers.get(name)
        if peer is None:
            if state not in STATES:
                raise ValueError(f"unknown peer state {state!r}")
            peer = self.peers[name] = PeerStatus(name, state, _utcnow())
        else:
            peer.set_state(state)
        self.sync_channels(name, channels)
        return peer

    def remove_peer(self, name: str) -> None:
        self.peers.pop(name, None)

    def sync_channels(self, peer: str, channels: Iterable[str]) -> None:
        """After a reload: keep counters of kept channels, add new, drop removed;
        order follows `channels`."""
        p = self.peers[peer]
        p.channels = {n: p.channels.get(n) or ChannelStats(n) for n in channels}

    def document(self) -> dict[str, Any]:
        """The JSON document of GET /status (CONTRACT §6, §10)."""
        return {"node": self.node, "version": self.version,
                "started_at": _iso(self.started_at),
                "peers": [p.document() for p in self.peers.values()]}

    def metrics(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str,
                   samples: Iterable[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels(labels)} {_number(value)}")

        peers = list(self.peers.values())
        chans = [({"peer": p.name, "channel": c.name}, c)
                 for p in peers for c in p.channels.values()]
        family("linkd_info", "gauge", "linkd build and node; the value is always 1.",
               [({"node": self.node, "version": self.version}, 1)])
        family("linkd_start_time_seconds", "gauge", "Start time of the daemon, Unix seconds.",
               [({}, self.started_at.timestamp())])
        family("linkd_peer_up", "gauge", "1 when a session with the peer is up.",
               [({"peer": p.name}, p.state == "connected") for p in peers])
        family("linkd_peer_state", "gauge", "1 for the peer's current link state.",
               [({"peer": p.name, "state": s}, p.state == s) for p in peers for s in STATES])
        family("linkd_peer_reconnects_total", "counter", "Sessions re-established.",
               [({"peer": p.name}, p.reconnects) for p in peers])
        family("linkd_peer_rtt_seconds", "gauge", "Last measured round-trip time.",
               [({"peer": p.name}, p.rtt_ms / 1000) for p in peers if p.rtt_ms is not None])
        for suffix, attr, kind, text in (
                ("queued_messages", "queued", "gauge", "Files waiting or unacknowledged."),
                ("queued_bytes", "queued_bytes", "gauge", "Bytes of the queued files."),
                ("sent_messages_total", "sent", "counter", "Files the peer acknowledged."),
                ("sent_bytes_total", "sent_bytes", "counter", "Bytes of acknowledged files."),
                ("received_messages_total", "received", "counter", "Files delivered to in/."),
                ("received_bytes_total", "received_bytes", "counter", "Bytes delivered."),
                ("failed_messages_total", "failed", "counter", "Outbound files refused."),
                ("quarantined_messages_total", "quarantined", "counter",
                 "Inbound files quarantined.")):
            family(f"linkd_channel_{suffix}", kind, text,
                   [(labels, getattr(c, attr)) for labels, c in chans])
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):  # bool included
        return str(int(value))
    return repr(float(value))


# --------------------------------------------------------------------------- server


def _claim_path(path: Path) -> None:
    """Refuse a live or foreign file at `path`; unlink a stale socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StatusSocketError(f"status socket {path} exists and is not a socket: "
                                f"remove it or set [node].status_socket to another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)          # stale: nobody listens any more
        return
    except OSError as exc:
        if not isinstance(exc, (TimeoutError, BlockingIOError)):
            raise StatusSocketError(f"status socket {path} cannot be checked: "
                                    f"{exc.strerror or exc}") from None
    finally:
        probe.close()
    raise StatusSocketError(f"status socket {path} is in use by another linkd: stop it first")


def _bind(path: Path) -> socket.socket:
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _claim_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o660)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
    except StatusSocketError:
        raise
    except OSError as exc:
        if len(os.fsencode(path)) > 107:
            raise StatusSocketError(f"status socket path {path} is too long for a UNIX socket "
                                    f"(107 bytes at most): set a shorter "
                                    f"[node].status_socket") from None
        raise StatusSocketError(f"cannot create status socket {path}: "
                                f"{exc.strerror or exc}") from None
    return sock


async def serve_status(board: StatusBoard, path: Path, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve /healthz, /status and /metrics on `path` until cancelled."""
    path = Path(path)
    sock = _bind(path)
    st = os.stat(path)
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners,
                                lambda stream: _connection(board, stream), [listener])
            log.info("status_listening", socket=str(path))
            task_status.started()
    finally:
        sock.close()
        try:
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
        except OSError:
            pass


async def _connection(board: StatusBoard, stream: trio.SocketStream) -> None:
    """One client: requests in turn (keep-alive) until it closes, errs or idles out."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT):
                request = await _read_request(conn, stream)
                if request is None:
                    return
                status, ctype, body, close = _route(board, request)
                headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-store")]
                if close:
                    headers.append(("Connection", "close"))
                if status == 405:
                    headers.append(("Allow", "GET, HEAD"))
                data = conn.send(h11.Response(status_code=status, headers=headers,
                                              reason=http.client.responses.get(status, "")))
                if request.method != b"HEAD":
                    data += conn.send(h11.Data(data=body))
                await stream.send_all(data + conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
                continue
            return  # the deadline passed
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _send_error(stream, conn, exc.error_status_hint)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    except Exception:  # a bug must not take the daemon down with it
        log.exception("status_client_error")


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request, its body drained; None once the client has closed."""
    request: h11.Request | None = None
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            size += len(data)
            if size > MAX_REQUEST_BYTES:
                raise h11.RemoteProtocolError("request too large", error_status_hint=413)
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


def _route(board: StatusBoard, request: h11.Request) -> tuple[int, str, bytes, bool]:
    """(status, content type, body, close) for one request."""
    path = request.target.split(b"?", 1)[0]
    if path not in (b"/healthz", b"/status", b"/metrics"):
        return 404, "text/plain; charset=utf-8", b"not found\n", False
    if request.method not in (b"GET", b"HEAD"):
        return 405, "text/plain; charset=utf-8", b"method not allowed\n", False
    if path == b"/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n", False
    try:
        if path == b"/status":
            return 200, "application/json", json.dumps(board.document()).encode() + b"\n", False
        return 200, METRICS_TYPE, board.metrics().encode(), False
    except Exception:
        log.exception("status_render_failed", path=path.decode("ascii", "replace"))
        return 500, "text/plain; charset=utf-8", b"internal error\n", True


async def _send_error(stream: trio.SocketStream, conn: h11.Connection, code: int) -> None:
    """Answer `code` and close gracefully: stop writing, then swallow what the client
    still sends for a moment, so that closing with unread input does not reset the
    connection before the client has read our answer (a "lingering close")."""
    reason = http.client.responses.get(code, "Error")
    body = f"{code} {reason}\n".encode()
    try:
        with trio.move_on_after(1.0):
            await stream.send_all(
                conn.send(h11.Response(status_code=code, reason=reason, headers=[
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))), ("Connection", "close")]))
                + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            await stream.send_eof()
            swallowed = 0
            while swallowed < (1 << 20) and (data := await stream.receive_some(65536)):
                swallowed += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass


# --------------------------------------------------------------------------- client


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float):
        super().__init__("linkd", timeout=timeout)
        self.socket_path = str(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def http_get(socket_path: Path, url_path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `url_path` over the UNIX socket: (status code, body).

    Raises OSError (FileNotFoundError, ConnectionRefusedError, PermissionError,
    TimeoutError...) or http.client.HTTPException when no daemon answers properly.
    """
    conn = _UnixHTTPConnection(Path(socket_path), timeout)
    try:
        conn.request("GET", url_path, headers={"Host": "linkd"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _parse(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return " ".join(shown) or "0s"


def _ago(value: Any, now: dt.datetime) -> str:
    when = _parse(value) if value else None
    return "-" if when is None else f"{_span((now - when).total_seconds())} ago"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def format_status(doc: dict[str, Any], now: dt.datetime | None = None) -> str:
    """The human table `linkctl status` prints for a /status document."""
    now = now or _utcnow()
    started = _parse(doc.get("started_at"))
    uptime = _span((now - started).total_seconds()) if started else "?"
    lines = [f"node {doc.get('node')}  linkd {doc.get('version')}  up {uptime}"
             f"  (since {doc.get('started_at')})", ""]
    peers = doc.get("peers") or []
    if not peers:
        return "\n".join(lines + ["no peers configured"]) + "\n"
    rows = [["PEER", "STATE", "REMOTE", "RTT", "RECONNECTS", "LAST ERROR"]]
    for p in peers:
        rtt = "-" if p.get("rtt_ms") is None else f"{p['rtt_ms']:.1f} ms"
        state = f"{p.get('state')} ({_ago(p.get('since'), now).replace(' ago', '')})"
        rows.append([str(p.get("name")), state, p.get("remote") or "-", rtt,
                     str(p.get("reconnects", 0)), p.get("last_error") or "-"])
    lines += _table(rows)
    for p in peers:
        lines += ["", f"peer {p.get('name')}:"]
        tls = p.get("tls")
        if tls:
            lines.append(f"  tls {tls.get('version')} {tls.get('cipher')}, peer "
                         f"{tls.get('peer_subject')}, cert until {tls.get('peer_not_after')}")
        if p.get("next_attempt_at"):
            lines.append(f"  next attempt at {p['next_attempt_at']}")
        rows = [["CHANNEL", "QUEUED", "SENT", "RECEIVED", "FAILED", "QUARANTINED",
                 "LAST SENT", "LAST RECEIVED"]]
        for c in p.get("channels") or []:
            rows.append([str(c.get("name")),
                         f"{c.get('queued', 0)} ({human_bytes(c.get('queued_bytes', 0))})",
                         f"{c.get('sent', 0)} ({human_bytes(c.get('sent_bytes', 0))})",
                         f"{c.get('received', 0)} ({human_bytes(c.get('received_bytes', 0))})",
                         str(c.get("failed", 0)), str(c.get("quarantined", 0)),
                         _ago(c.get("last_sent_at"), now), _ago(c.get("last_received_at"), now)])
        lines += _table(rows, "  ") if len(rows) > 1 else ["  no channels"]
    return "\n".join(lines) + "\n"
