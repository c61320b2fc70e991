"""The client half of the status socket, for `linkctl` (synchronous stdlib code:
linkctl must not start trio): `http_get`/`http_request` over the UNIX socket and
`format_status`, the human table of `linkctl status`."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
from pathlib import Path
from typing import Any

from ..errors import (
    StatusSocketError,  # noqa: F401 (re-exported)
)

# --------------------------------------------------------------------------- client


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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
        if p.get("priority_held_s"):
            held = float(p["priority_held_s"])
            lines.append(f"  lower priorities held back {held:.1f}s" if held < 60 else
                         f"  lower priorities held back {_span(held)}")
            lines[-1] += " in all, behind higher ones in flight ([link] priority_hold)"
        rows = [["CHANNEL", "QUEUED", "SENT", "RECEIVED", "FAILED", "QUARANTINED",
                 "LAST SENT", "LAST RECEIVED"]]
        for c in p.get("channels") or []:
            flags = " (paused)" if c.get("paused") else ""
            # (the whole reason is under the table: a long one made it hundreds of
            # columns wide)
            flags += " (held)" if c.get("held") else ""
            rows.append([str(c.get("name")) + flags,
                         f"{c.get('queued', 0)} ({human_bytes(c.get('queued_bytes', 0))})",
                         f"{c.get('sent', 0)} ({human_bytes(c.get('sent_bytes', 0))})",
                         f"{c.get('received', 0)} ({human_bytes(c.get('received_bytes', 0))})",
                         str(c.get("failed", 0)), str(c.get("quarantined", 0)),
                         _ago(c.get("last_sent_at"), now), _ago(c.get("last_received_at"), now)])
        lines += _table(rows, "  ") if len(rows) > 1 else ["  no channels"]
        lines += _transfers(p.get("channels") or [])
    return "\n".join(lines) + "\n"


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else 0.0


def _transfers(channels: list[dict[str, Any]]) -> list[str]:
    """Under a peer's channel table: why a channel cannot store what it receives,
    the message each channel is sending, and the messages sent whole that the peer
    has not acknowledged yet (a peer that stores nothing and says nothing shows here
    first)."""
    lines = []
    for c in channels:
        if c.get("held") and not c.get("paused"):
            lines.append(f"  {c.get('name')}: held: {c['held']}")
        if c.get("inbound_error"):
            # this side cannot store what the peer sends (a full disk...): the
            # operator who must fix it reads this table, not the peer's
            lines.append(f"  {c.get('name')}: CANNOT STORE what the peer sends: "
                         f"{c['inbound_error']}")
        flight = c.get("in_flight")
        if isinstance(flight, dict):
            done = human_bytes(int(_number(flight.get("sent_bytes"))))
            size = human_bytes(int(_number(flight.get("size"))))
            lines.append(f"  {c.get('name')}: sending {flight.get('name')} (seq "
                         f"{flight.get('seq')}), {done} of {size}")
        count = int(_number(c.get("awaiting_ack")))
        if count:
            age = _number(c.get("oldest_unacked_age_s"))
            lines.append(f"  {c.get('name')}: {count} sent "
                         f"({human_bytes(int(_number(c.get('awaiting_ack_bytes'))))}), awaiting "
                         f"the peer's acknowledgement, the oldest for "
                         + (f"{age:.1f}s" if age < 60 else _span(age)))
    return lines

