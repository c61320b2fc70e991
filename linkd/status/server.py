"""The status server: HTTP/1.1 over the UNIX status socket (and /metrics over TCP).

Theory of operation
-------------------
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
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import struct
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import h11
import structlog
import trio

from ..errors import (
    StatusSocketError,  # noqa: F401 (re-exported)
)
from ..net.admission import serve_listener
from .board import *  # noqa: F403
from .board import StatusBoard

REQUEST_TIMEOUT = 10.0          # seconds to read one request (also the keep-alive idle limit)
MAX_REQUEST_BYTES = 16384       # request head + body; larger requests get 413 and a close
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = structlog.get_logger("linkd.status")




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


class Streamed:
    """A JSON answer too big to build at once (GET /queue): sent as it is produced,
    with chunked transfer encoding, so the daemon's memory does not grow with it."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks


Body = bytes | Streamed
Route = tuple[int, str, Body, bool]
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
            with trio.move_on_after(REQUEST_TIMEOUT) as deadline:
                got = await _read_request(conn, stream)
                if got is None:
                    return
                request, body_in = got
                if metrics_only:
                    status, ctype, body, close = _route_metrics(board, request)
                else:
                    status, ctype, body, close = await _route(board, request, body_in,
                                                              control, privileged(uid))
                headers = [("Content-Type", ctype), ("Cache-Control", "no-store")]
                if isinstance(body, bytes):
                    headers.append(("Content-Length", str(len(body))))
                if close:
                    headers.append(("Connection", "close"))
                if status == 405:
                    target = request.target.split(b"?", 1)[0]
                    headers.append(("Allow", "POST" if target in WRITE_PATHS else "GET, HEAD"))
                data = conn.send(h11.Response(status_code=status, headers=headers,
                                              reason=http.client.responses.get(status, "")))
                if isinstance(body, Streamed):
                    # (without a length h11 chunks it, or closes after it for HTTP/1.0)
                    await stream.send_all(data)
                    data = b""
                    if request.method != b"HEAD":
                        async for chunk in body.chunks:
                            # a long answer may take longer than one request's time;
                            # each piece gets it (a client that stops reading is cut)
                            deadline.deadline = trio.current_time() + REQUEST_TIMEOUT
                            await stream.send_all(conn.send(h11.Data(data=chunk)))
                elif request.method != b"HEAD":
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
    from ..metrics import render_metrics as render
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
        if isinstance(answer, Streamed):
            return status, "application/json", answer, False
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


