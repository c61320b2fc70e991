"""`linkctl status [--json]` and `linkctl metrics`: read the daemon's status socket.

Theory of operation: one synchronous HTTP GET over the UNIX socket (no trio),
then print. Every way of "no daemon answers" (no socket file, refused,
timeout, permission denied, garbage reply) becomes exactly one line on stderr
naming the socket and the likely fix, and exit status 1 — never a traceback.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import sys
from pathlib import Path

from .safe import printable, printable_lines, safe_doc
from .status_client import format_status, http_get

_HINT = "is the daemon running? check `systemctl status linkd`"


def _fail(line: str) -> int:
    print(f"linkctl: {line}", file=sys.stderr)
    return 1


def _denied(socket_path: Path) -> str:
    """Permission denied on the socket: name the group that may read it."""
    try:
        import grp
        group = f"the {grp.getgrgid(os.stat(socket_path).st_gid).gr_name} group"
    except (OSError, KeyError):
        group = "the socket's group"
    return f"permission denied on {socket_path} (run as root or as a member of {group})"


def _get(socket_path: Path, url_path: str) -> bytes | int:
    """The body of a 200 answer, or 1 after printing the one-line reason."""
    try:
        code, body = http_get(socket_path, url_path)
    except PermissionError:
        return _fail(_denied(socket_path))
    except (TimeoutError, http.client.HTTPException, ConnectionResetError) as exc:
        reason = "no answer in time" if isinstance(exc, TimeoutError) else "no valid answer"
        return _fail(f"no linkd answers on {socket_path}: {reason} ({_HINT})")
    except OSError as exc:
        if exc.errno == errno.EACCES:
            return _fail(_denied(socket_path))
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        return _fail(f"no linkd answers on {socket_path}: {reason} ({_HINT})")
    if code != 200:
        first = body.decode("utf-8", "replace").strip().splitlines()[:1]
        return _fail(f"linkd on {socket_path} answered {url_path} with HTTP {code}"
                     + (f": {printable(first[0][:200])}" if first else ""))
    return body


def _emit(text: str) -> int:
    """Print to stdout; a reader that went away (`| head`) is not an error. Every
    line is made printable (safe.py): the last guard against a peer's escape codes."""
    text = printable_lines(text)
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def run_status(socket_path: Path, as_json: bool) -> int:
    """Print the status table (or the /status JSON, pretty, keys as served)."""
    body = _get(socket_path, "/status")
    if isinstance(body, int):
        return body
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except ValueError:
        return _fail(f"linkd on {socket_path} sent a /status that is not a JSON object")
    return _emit(json.dumps(doc, indent=2) if as_json else format_status(safe_doc(doc)))


def run_metrics(socket_path: Path) -> int:
    """Print the Prometheus text of /metrics."""
    body = _get(socket_path, "/metrics")
    if isinstance(body, int):
        return body
    return _emit(body.decode("utf-8", "replace"))
