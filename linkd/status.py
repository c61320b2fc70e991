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
* The bind runs under umask 0117, synchronously (no checkpoint, so no other
  trio task runs meanwhile), so the socket is born 0660 (CONTRACT §5) and is
  never chmod'ed: there is no moment when others may connect. Reading
  endpoints serve the group; POST /pause, /resume, /retry and /reconnect serve
  only root and the daemon's own uid, checked with SO_PEERCRED.
* `[status] metrics_listen` serves GET /metrics (only) over TCP for Prometheus;
  the exposition is written by prometheus_client from a collector over the
  board, plus its standard process_* collector.
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
import struct
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import h11
import structlog
import trio

from .errors import (
    StatusSocketError,  # noqa: F401 (re-exported)
)
from .net.admission import serve_listener

STATES = ("connected", "connecting", "backoff", "waiting")
REQUEST_TIMEOUT = 10.0          # seconds to read one request (also the keep-alive idle limit)
MAX_REQUEST_BYTES = 16384       # request head + body; larger requests get 413 and a close
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = structlog.get_logger("linkd.status")




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
    `failed` is the number of files in failed/<channel>/ now (recounted from the
    folder, so it survives a restart). `paused`, `held`, `in_flight` and
    `oldest_queued_age_s` are filled by the sender (None: nothing to say).
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
    paused: bool = False
    held: str | None = None                     # why the channel's files wait, e.g. not offered
    in_flight: dict[str, Any] | None = None     # {name, seq, size, sent_bytes}
    oldest_queued_age_s: float | None = None

    def note_sent(self, size: int, when: dt.datetime | None = None) -> None:
        self.sent += 1
        self.sent_bytes += size
        self.last_sent_at = when or _utcnow()

    def note_received(self, size: int, when: dt.datetime | None = None) -> None:
        self.received += 1
        self.received_bytes += size
        self.last_received_at = when or _utcnow()

    def document(self) -> dict[str, Any]:
        age = self.oldest_queued_age_s
        return {"name": self.name, "queued": self.queued, "queued_bytes": self.queued_bytes,
                "sent": self.sent, "sent_bytes": self.sent_bytes, "received": self.received,
                "received_bytes": self.received_bytes, "failed": self.failed,
                "quarantined": self.quarantined, "last_sent_at": _iso(self.last_sent_at),
                "last_received_at": _iso(self.last_received_at),
                "oldest_queued_age_s": None if age is None else round(float(age), 3),
                "paused": self.paused, "held": self.held,
                "in_flight": None if self.in_flight is None else dict(self.in_flight)}


@dataclasses.dataclass
class PeerStatus:
    """One configured peer. The daemon increments `reconnects` and sets `rtt_ms` itself.

    An *outage* runs from the moment the peer is not connected until the next
    link_up: `down_since` and `attempts` (dials) cover all of it, whatever the
    state changes in between; `last_error` is the outage's latest error and is
    forgotten at link_up (CONTRACT §6).
    """

    name: str
    state: str                              # one of STATES
    since: dt.datetime
    remote: str | None = None               # "IP:PORT" while connected
    rtt_ms: float | None = None             # None until the first pong of a session
    reconnects: int = 0
    last_error: str | None = None
    tls: dict[str, Any] | None = None       # version, cipher, group, peer_subject, peer_not_after
    next_attempt_at: dt.datetime | None = None
    channels: dict[str, ChannelStats] = dataclasses.field(default_factory=dict)
    down_since: dt.datetime | None = None
    attempts: int = 0
    last_error_at: dt.datetime | None = None
    paused: bool = False
    cert_not_after: dt.datetime | str | None = None  # the peer's certificate, last seen
    quarantined: int = 0                    # files in quarantine/ now

    def __post_init__(self) -> None:
        if self.state != "connected" and self.down_since is None:
            self.down_since = self.since

    def set_state(self, state: str, *, remote: str | None = None,
                  tls: dict[str, Any] | None = None, error: str | None = None,
                  now: dt.datetime | None = None,
                  next_attempt_at: dt.datetime | None = None) -> None:
        """Move to `state`. `since` changes only with the state. Anything but
        "connected" forgets remote, tls and rtt; `error` (if given) is kept in
        `last_error` until the link is up again; `next_attempt_at` is kept only
        in "backoff". "connected" ends the outage (down_since, attempts, last_error)."""
        if state not in STATES:
            raise ValueError(f"unknown peer state {state!r}")
        when = now or _utcnow()
        if state != self.state:
            self.state, self.since = state, when
        if state == "connected":
            self.remote = remote if remote is not None else self.remote
            self.tls = tls if tls is not None else self.tls
            if self.tls and self.tls.get("peer_not_after"):
                self.cert_not_after = self.tls["peer_not_after"]
            self.down_since = self.last_error = self.last_error_at = None
            self.attempts = 0
        else:
            self.remote = self.tls = self.rtt_ms = None
            if self.down_since is None:
                self.down_since = when
        self.next_attempt_at = next_attempt_at if state == "backoff" else None
        if error is not None:
            self.note_error(error, when)

    def note_error(self, error: str, now: dt.datetime | None = None) -> None:
        """Record the outage's latest error (ignored while connected)."""
        if self.state != "connected":
            self.last_error, self.last_error_at = error, now or _utcnow()

    def channel(self, name: str) -> ChannelStats:
        """The channel's stats, created (empty) if new."""
        if name not in self.channels:
            self.channels[name] = ChannelStats(name)
        return self.channels[name]

    def document(self) -> dict[str, Any]:
        tls = None if self.tls is None else {
            k: _iso(v) if isinstance(v, dt.datetime) else v for k, v in self.tls.items()}
        rtt = None if self.rtt_ms is None else round(float(self.rtt_ms), 3)
        cert = self.cert_not_after
        return {"name": self.name, "state": self.state, "since": _iso(self.since),
                "remote": self.remote, "rtt_ms": rtt, "reconnects": self.reconnects,
                "down_since": _iso(self.down_since), "attempts": self.attempts,
                "last_error": self.last_error, "last_error_at": _iso(self.last_error_at),
                "paused": self.paused,
                "cert_not_after": _iso(cert) if isinstance(cert, dt.datetime) else cert,
                "quarantined": self.quarantined,
                "tls": tls, "next_attempt_at": _iso(self.next_attempt_at),
                "channels": [c.document() for c in self.channels.values()]}


class StatusBoard:
    """Everything /status and /metrics report. Peers keep insertion (config) order."""

    def __init__(self, node: str, version: str, started_at: dt.datetime | None = None):
        self.node = node
        self.version = version
        self.started_at = started_at or _utcnow()
        self.peers: dict[str, PeerStatus] = {}
        self.cert_not_after: dt.datetime | None = None     # our own certificate
        self.crl_next_update: dt.datetime | None = None    # [tls].crl, when configured
        self.connect_failures: dict[tuple[str, str], int] = {}   # (peer, reason) -> count
        self.tls_refusals: dict[str, int] = {}                   # reason -> count

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

    def note_connect_failure(self, peer: str, reason: str) -> None:
        key = (peer, reason)
        self.connect_failures[key] = self.connect_failures.get(key, 0) + 1

    def note_tls_refusal(self, reason: str) -> None:
        self.tls_refusals[reason] = self.tls_refusals.get(reason, 0) + 1

    def document(self) -> dict[str, Any]:
        """The JSON document of GET /status (CONTRACT §6, §10)."""
        return {"node": self.node, "version": self.version,
                "started_at": _iso(self.started_at),
                "peers": [p.document() for p in self.peers.values()],
                "tls": {"cert_not_after": _iso(self.cert_not_after),
                        "crl_next_update": _iso(self.crl_next_update)}}

    def metrics(self) -> str:
        """Prometheus text exposition format 0.0.4 of the board (no process_* metrics)."""
        from .metrics import board_exposition
        return board_exposition(self)


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
            old = os.umask(0o117)      # born 0660: never a moment wider (CONTRACT §5)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
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


class Control(Protocol):
    """What the status server asks the daemon for beyond the board (see control.py)."""

    async def handle(self, method: str, path: str, params: dict[str, Any],
                     privileged: bool) -> tuple[int, Any]: ...


Route = tuple[int, str, bytes, bool]
READ_PATHS = (b"/healthz", b"/status", b"/metrics", b"/queue", b"/failed")
WRITE_PATHS = (b"/pause", b"/resume", b"/retry", b"/reconnect")


def peer_uid(stream: trio.SocketStream) -> int | None:
    """The uid of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def privileged(uid: int | None) -> bool:
    """Changing endpoints serve only root and the daemon's own user (CONTRACT §5)."""
    return uid is not None and uid in (0, os.geteuid())


async def serve_status(board: StatusBoard, path: Path, control: Control | None = None, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve /healthz, /status, /metrics, /queue, /failed and the changing endpoints
    (POST /pause, /resume, /retry, /reconnect) on `path` until cancelled."""
    path = Path(path)
    sock = _bind(path)
    st = os.stat(path)
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as nursery:
            # not trio.serve_listeners: it logs EMFILE with a traceback (net/admission.py)
            nursery.start_soon(serve_listener, listener,
                               lambda stream: _connection(board, stream, control), log,
                               "status socket")
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


async def open_metrics_listener(host: str, port: int) -> list[trio.SocketListener]:
    """Bind [status].metrics_listen; StatusSocketError (one line) if it cannot be."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise StatusSocketError(f"cannot listen for metrics on {where} ([status].metrics_listen):"
                                f" {exc.strerror or exc}: choose a free port or address") \
            from None


async def serve_metrics(board: StatusBoard, listeners: list[trio.SocketListener], *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """GET /metrics over TCP for Prometheus; every other path is 404, other methods 405."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(serve_listener, listener,
                               lambda stream: _connection(board, stream, None,
                                                          metrics_only=True),
                               log, "[status].metrics_listen")
        task_status.started()


async def _connection(board: StatusBoard, stream: trio.SocketStream,
                      control: Control | None, metrics_only: bool = False) -> None:
    """One client: requests in turn (keep-alive) until it closes, errs or idles out."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    uid = None if metrics_only else peer_uid(stream)
    try:
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT):
                got = await _read_request(conn, stream)
                if got is None:
                    return
                request, body_in = got
                if metrics_only:
                    status, ctype, body, close = _route_metrics(board, request)
                else:
                    status, ctype, body, close = await _route(board, request, body_in,
                                                              control, privileged(uid))
                headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-store")]
                if close:
                    headers.append(("Connection", "close"))
                if status == 405:
                    target = request.target.split(b"?", 1)[0]
                    headers.append(("Allow", "POST" if target in WRITE_PATHS else "GET, HEAD"))
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


async def _read_request(conn: h11.Connection,
                        stream: trio.SocketStream) -> tuple[h11.Request, bytes] | None:
    """The next request and its body; None once the client has closed."""
    request: h11.Request | None = None
    body = b""
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
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return None if request is None else (request, body)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


TEXT = "text/plain; charset=utf-8"


def _json(status: int, value: Any) -> Route:
    return status, "application/json", json.dumps(value).encode() + b"\n", False


def render_metrics(board: StatusBoard) -> bytes:
    from .metrics import render_metrics as render
    return render(board)


def _route_metrics(board: StatusBoard, request: h11.Request) -> Route:
    if request.target.split(b"?", 1)[0] != b"/metrics":
        return 404, TEXT, b"not found: only /metrics is served here\n", False
    if request.method not in (b"GET", b"HEAD"):
        return 405, TEXT, b"method not allowed\n", False
    try:
        return 200, METRICS_TYPE, render_metrics(board), False
    except Exception:
        log.exception("status_render_failed", path="/metrics")
        return 500, TEXT, b"internal error\n", True


async def _route(board: StatusBoard, request: h11.Request, body: bytes,
                 control: Control | None, allowed: bool) -> Route:
    """(status, content type, body, close) for one request."""
    target = request.target.decode("ascii", "replace")
    path, _, query = target.partition("?")
    raw = path.encode()
    if raw not in READ_PATHS + WRITE_PATHS:
        return 404, TEXT, b"not found\n", False
    writing = raw in WRITE_PATHS
    if (request.method != b"POST") if writing else (request.method not in (b"GET", b"HEAD")):
        return 405, TEXT, b"method not allowed\n", False
    if raw == b"/healthz":
        return 200, TEXT, b"ok\n", False
    try:
        if raw == b"/status":
            return _json(200, board.document())
        if raw == b"/metrics":
            return 200, METRICS_TYPE, render_metrics(board), False
        if writing and not allowed:
            return _json(403, {"error": "only root and the daemon's own user may change "
                                        "linkd (SO_PEERCRED)"})
        params: dict[str, Any] = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        if writing and body:
            try:
                doc = json.loads(body)
            except ValueError:
                return _json(400, {"error": "the request body is not JSON"})
            if not isinstance(doc, dict):
                return _json(400, {"error": "the request body is not a JSON object"})
            params.update(doc)
        if control is None:
            if raw in (b"/queue", b"/failed"):
                return _json(200, [])
            return _json(503, {"error": "this server has no control over a daemon"})
        status, answer = await control.handle(request.method.decode(), path, params, allowed)
        return _json(status, answer)
    except Exception:
        log.exception("status_render_failed", path=path)
        return 500, TEXT, b"internal error\n", True


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


def http_request(socket_path: Path, method: str, url_path: str, body: Any = None,
                 timeout: float = 30.0) -> tuple[int, bytes]:
    """`method url_path` over the UNIX socket with an optional JSON body."""
    conn = _UnixHTTPConnection(Path(socket_path), timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Host": "linkd"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, url_path, body=data, headers=headers)
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
            group = tls.get("group") or "?"
            if tls.get("post_quantum") is False:
                group += " (classical, not post-quantum)"
            lines.append(f"  tls {tls.get('version')} {tls.get('cipher')} {group}, peer "
                         f"{tls.get('peer_subject')}, cert until {tls.get('peer_not_after')}")
        if p.get("down_since"):
            line = (f"  down since {p['down_since']} ({_ago(p['down_since'], now)}), "
                    f"{p.get('attempts', 0)} attempts")
            if p.get("last_error"):
                line += f", last error {_ago(p.get('last_error_at'), now)}"
            lines.append(line)
        if p.get("next_attempt_at"):
            lines.append(f"  next attempt at {p['next_attempt_at']}")
        if p.get("paused"):
            lines.append("  PAUSED: nothing is sent to this peer (linkctl resume --peer "
                         f"{p.get('name')})")
        rows = [["CHANNEL", "QUEUED", "SENT", "RECEIVED", "FAILED", "QUARANTINED",
                 "LAST SENT", "LAST RECEIVED"]]
        for c in p.get("channels") or []:
            flags = " (paused)" if c.get("paused") else ""
            flags += f" (held: {c['held']})" if c.get("held") else ""
            rows.append([str(c.get("name")) + flags,
                         f"{c.get('queued', 0)} ({human_bytes(c.get('queued_bytes', 0))})",
                         f"{c.get('sent', 0)} ({human_bytes(c.get('sent_bytes', 0))})",
                         f"{c.get('received', 0)} ({human_bytes(c.get('received_bytes', 0))})",
                         str(c.get("failed", 0)), str(c.get("quarantined", 0)),
                         _ago(c.get("last_sent_at"), now), _ago(c.get("last_received_at"), now)])
        lines += _table(rows, "  ") if len(rows) > 1 else ["  no channels"]
    return "\n".join(lines) + "\n"
