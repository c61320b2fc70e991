"""`linkctl queue|failed|retry|pause|resume|reconnect|check`: the operator's controls.

Each is one request over the status socket (CONTRACT §1, §6; the changing
endpoints are POSTs that the daemon serves only to root and its own user, see
docs/OPERATIONS.md). Errors are one line on stderr and exit 1; `check` instead
speaks the Nagios-plugin convention: one line on stdout starting with OK,
WARNING, CRITICAL or UNKNOWN, and exit 0, 1, 2 or 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import http.client
import json
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..expiry import CRL_WARN_DAYS, WARN_DAYS
from .safe import printable, safe_doc
from .status_client import _span, _table, http_request, human_bytes
from .status_cmd import _HINT, _emit, _fail

DEFAULT_HEARTBEAT_TIMEOUT = 15.0
# A peer acknowledges a file once it is durable, within milliseconds to seconds: one
# sent this long ago and still unacknowledged means its storage hangs (or it lies).
UNACKED_WARN_S = 60.0


class Unreachable(Exception):
    """No daemon answers; str() is the one line (without the "linkctl: " prefix)."""


def _call(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    try:
        code, raw = http_request(sock, method, path, body)
    except PermissionError:
        raise Unreachable(f"permission denied on {sock} (run as root or as a member of "
                          "the linkd group)") from None
    except (TimeoutError, http.client.HTTPException, ConnectionResetError) as exc:
        reason = "no answer in time" if isinstance(exc, TimeoutError) else "no valid answer"
        raise Unreachable(f"no linkd answers on {sock}: {reason} ({_HINT})") from None
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise Unreachable(f"permission denied on {sock} (run as root or as a member "
                              "of the linkd group)") from None
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise Unreachable(f"no linkd answers on {sock}: {reason} ({_HINT})") from None
    try:
        return code, json.loads(raw) if raw.strip() else None
    except ValueError:
        text = raw.decode("utf-8", "replace").strip().splitlines()[:1]
        return code, {"error": text[0][:200] if text else f"HTTP {code}"}


def _error_of(code: int, doc: Any) -> str:
    if code == 403:
        return ("refused: only root and the daemon's own user may change linkd "
                "(run it with sudo, or as the linkd user)")
    if isinstance(doc, dict) and doc.get("error"):
        return _clean(str(doc["error"]))
    if code == 404:
        return "this linkd does not know that endpoint: is it an older version?"
    return f"the daemon answered HTTP {code}"


_clean = printable      # names and reasons may come from a peer (safe.py)


def _query(**params: str | None) -> str:
    kept = {k: v for k, v in params.items() if v}
    return ("?" + urllib.parse.urlencode(kept)) if kept else ""


def _age(seconds: Any) -> str:
    return _span(float(seconds)) if isinstance(seconds, (int, float)) else "-"


def run(args: argparse.Namespace) -> int:
    from .linkctl_main import load, socket_path
    command = args.command
    try:
        sock = socket_path(args)
    except ConfigError as exc:
        if command == "check":
            return _nagios(3, f"UNKNOWN: {exc}")
        raise
    try:
        if command == "check":
            timeout = DEFAULT_HEARTBEAT_TIMEOUT
            if not args.socket:
                timeout = load(args).link.heartbeat_timeout
            return run_check(sock, timeout, args.max_queue_age)
        if command == "queue":
            return run_queue(sock, args.peer, args.channel, args.json)
        if command == "failed":
            return run_failed(sock, args.peer, args.channel, args.json)
        if command == "retry":
            return run_retry(sock, args.peer, args.channel, args.names, args.all)
        if command in ("pause", "resume"):
            return run_simple(sock, f"/{command}", {"peer": args.peer,
                                                    "channel": args.channel})
        if command == "reconnect":
            body: dict[str, Any] = {"peer": args.peer}
            if args.force:
                body["force"] = True
            return run_simple(sock, "/reconnect", body)
    except Unreachable as exc:
        if command == "check":
            return _nagios(3, f"UNKNOWN: {exc}")
        return _fail(str(exc))
    return 2


def run_simple(sock: Path, path: str, body: dict[str, Any]) -> int:
    code, doc = _call(sock, "POST", path, {k: v for k, v in body.items() if v is not None})
    if code != 200:
        return _fail(_error_of(code, doc))
    return _emit(_clean(str((doc or {}).get("message", "done"))))


def _fetch_list(sock: Path, path: str, peer: str | None, channel: str | None,
                as_json: bool, empty: str) -> list[Any] | int:
    """GET a list endpoint: the entries to print as a table (escaped), or the exit
    code once it was handled (an error, --json, or nothing to show)."""
    code, doc = _call(sock, "GET", path + _query(peer=peer, channel=channel))
    if code != 200 or not isinstance(doc, list):
        return _fail(_error_of(code, doc))
    if as_json:
        return _emit(json.dumps(doc, indent=2))
    if not doc:
        return _emit(empty)
    listed: list[Any] = safe_doc(doc)
    return listed


def run_queue(sock: Path, peer: str | None, channel: str | None, as_json: bool) -> int:
    doc = _fetch_list(sock, "/queue", peer, channel, as_json, "queue empty")
    if isinstance(doc, int):
        return doc
    rows = [["PEER", "CHANNEL", "SEQ", "NAME", "SIZE", "AGE", "SENT", "STATE"]]
    for e in doc:
        state = str(e.get("state"))
        if e.get("reason"):
            state += f" ({e['reason']})"
        seq = e.get("seq")
        rows.append([str(e.get("peer")), str(e.get("channel")), "-" if seq is None else str(seq),
                     _clean(str(e.get("name"))), human_bytes(int(e.get("size") or 0)),
                     _age(e.get("age_s")), human_bytes(int(e.get("sent_bytes") or 0)),
                     _clean(state)])
    return _emit("\n".join(_table(rows)))


def run_failed(sock: Path, peer: str | None, channel: str | None, as_json: bool) -> int:
    doc = _fetch_list(sock, "/failed", peer, channel, as_json, "no failed files")
    if isinstance(doc, int):
        return doc
    rows = [["PEER", "CHANNEL", "NAME", "SIZE", "FAILED AT", "REASON"]]
    for e in doc:
        rows.append([str(e.get("peer")), str(e.get("channel")), _clean(str(e.get("name"))),
                     human_bytes(int(e.get("size") or 0)), str(e.get("failed_at")),
                     _clean(str(e.get("reason") or "-"))])
    return _emit("\n".join(_table(rows)))


def run_retry(sock: Path, peer: str, channel: str | None, names: list[str],
              every: bool) -> int:
    if not names and not every:
        print("linkctl retry: name the files to retry, or pass --all", file=sys.stderr)
        return 2
    if names and every:
        print("linkctl retry: give file names or --all, not both", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"peer": peer, "names": names, "all": every}
    if channel:
        body["channel"] = channel
    code, doc = _call(sock, "POST", "/retry", body)
    if code != 200 or not isinstance(doc, list):
        return _fail(_error_of(code, doc))
    missing = 0
    for r in safe_doc(doc):
        where = f"{r.get('peer')}/{r.get('channel')}/{_clean(str(r.get('name')))}"
        if r.get("retried"):
            print(f"retried {where}: back in out/, queued again")
        else:
            missing += 1
            print(f"linkctl: {where}: {_clean(str(r.get('error')))}", file=sys.stderr)
    if not doc and every:
        print("no failed files to retry")
    sys.stdout.flush()
    return 1 if missing else 0


# --------------------------------------------------------------------------- check


def _nagios(code: int, line: str) -> int:
    print(printable(line), flush=True)
    return code


def _when(value: Any) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _short(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters at a word's end, with an ellipsis (a reason
    cut mid-word, "self-signed certifi", read as a typo)."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" ,;:") + "…"


def evaluate(doc: dict[str, Any], heartbeat_timeout: float, max_queue_age: float | None,
             now: dt.datetime | None = None) -> tuple[int, str]:
    """(Nagios code, line) for a /status document (CONTRACT §1)."""
    now = now or dt.datetime.now(dt.UTC)
    critical: list[str] = []
    warning: list[str] = []
    peers = doc.get("peers") or []
    up = 0
    queued = 0
    for p in peers:
        name = p.get("name")
        if p.get("state") == "connected":
            up += 1
        else:
            since = _when(p.get("down_since")) or _when(p.get("since"))
            down_for = (now - since).total_seconds() if since else float("inf")
            if down_for > heartbeat_timeout:
                what = f"{name} down for {int(down_for)}s"
                if p.get("last_error"):
                    what += f" ({_short(_clean(str(p['last_error'])), 80)})"
                critical.append(what)
        for c in p.get("channels") or []:
            queued += int(c.get("queued") or 0)
            age = c.get("oldest_queued_age_s")
            if max_queue_age is not None and isinstance(age, (int, float)) \
                    and age > max_queue_age:
                critical.append(f"{name}/{c.get('name')} oldest queued file {int(age)}s old")
            if c.get("failed"):
                warning.append(f"{name}/{c.get('name')} {c['failed']} in failed/")
            if c.get("held") and not c.get("paused") and (c.get("queued") or 0) > 0:
                # (a channel the peer lacks, with nothing queued, holds nothing back:
                # the documented order of removing a channel passes through that)
                held = _short(_clean(str(c["held"])), 200)
                warning.append(f"{name}/{c.get('name')} held: {held}")
            unacked = c.get("oldest_unacked_age_s")
            if isinstance(unacked, (int, float)) and unacked > UNACKED_WARN_S:
                warning.append(f"{name}/{c.get('name')} {c.get('awaiting_ack')} awaiting the "
                               f"peer's ack, the oldest for {int(unacked)}s")
            if c.get("inbound_error"):
                warning.append(f"{name}/{c.get('name')} cannot store what arrives: "
                               f"{_short(_clean(str(c['inbound_error'])), 200)}")
        if p.get("quarantined"):
            warning.append(f"{name} {p['quarantined']} in quarantine/")
        for ch, files in sorted((p.get("left_behind") or {}).items()):
            warning.append(f"{name}/{_clean(str(ch))}: {files} file(s) of a channel no "
                           f"longer configured")
    audit = doc.get("audit") or {}
    if audit.get("failed"):
        critical.append(f"deliveries refused: {_short(_clean(str(audit['failed'])), 160)}")
    tls = doc.get("tls") or {}
    dates = [("our certificate", tls.get("cert_not_after"), WARN_DAYS),
             ("CRL", tls.get("crl_next_update"), CRL_WARN_DAYS)]
    dates += [(f"{p.get('name')}'s certificate", p.get("cert_not_after"), WARN_DAYS)
              for p in peers]
    for label, value, horizon in dates:
        when = _when(value)
        if when is None:
            continue
        days = (when - now).total_seconds() / 86400
        if days <= 0:
            critical.append(f"{label} expired {when:%Y-%m-%d}")
        elif days <= horizon:
            warning.append(f"{label} expires {when:%Y-%m-%d}")
    summary = f"{up}/{len(peers)} peers connected, {queued} queued"
    perf = f"peers_up={up};;;0;{len(peers)} queued={queued};;;0"
    if critical:
        return 2, f"CRITICAL: {'; '.join(critical + warning)} | {perf}"
    if warning:
        return 1, f"WARNING: {'; '.join(warning)} ({summary}) | {perf}"
    return 0, f"OK: {summary} | {perf}"


def run_check(sock: Path, heartbeat_timeout: float, max_queue_age: float | None) -> int:
    try:
        code, doc = _call(sock, "GET", "/status")
    except Unreachable as exc:
        return _nagios(3, f"UNKNOWN: {exc}")
    if code != 200 or not isinstance(doc, dict):
        return _nagios(3, f"UNKNOWN: {_error_of(code, doc)}")
    status, line = evaluate(safe_doc(doc), heartbeat_timeout, max_queue_age)
    return _nagios(status, line)
