"""`linkctl demo`: two linkd nodes on 127.0.0.1 exchanging sample traffic.

Makes a throwaway link CA and two node certificates, writes two configs
(`interpol` listens, `europol` dials it), starts both daemons as child
processes, drops sample files both ways, and prints a live line per second
from both status sockets. Stops both daemons cleanly (SIGTERM) on Ctrl-C,
on SIGTERM or SIGHUP of the demo itself, or after --seconds, prints a summary,
and removes its temporary folder (`--dir` keeps everything, logs included).
The daemons also get SIGTERM from the kernel if the demo dies without
cleaning up (PR_SET_PDEATHSIG), so a demo never leaves orphans. Every line
fits an 80-column terminal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import pki
from .status_client import http_get

NODES = ("interpol", "europol")
CHANNELS = [("alerts", 10), ("cases", 5), ("bulk", 0)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml_config(root: Path, name: str, other: str, port: int, dial: bool) -> Path:
    node_dir = root / name
    node_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "[node]", f'name = "{name}"', 'spool_dir = "spool"', 'state_dir = "state"',
        'status_socket = "state/status.sock"', "",
        "[tls]", f'cert = "../pki/{name}.crt"', f'key = "../pki/{name}.key"',
        'ca = "../pki/ca.crt"', "",
        "[link]", "heartbeat_interval = 1.0", "heartbeat_timeout = 4.0",
        "reconnect_min = 0.2", "reconnect_max = 2.0", "",
    ]
    if not dial:
        lines += ["[listen]", 'address = "127.0.0.1"', f"port = {port}", ""]
    lines += ["[[peer]]", f'name = "{other}"']
    if dial:
        lines.append(f'connect = "127.0.0.1:{port}"')
    for channel, priority in CHANNELS:
        lines += ["", "  [[peer.channel]]", f'  name = "{channel}"', f"  priority = {priority}"]
    path = node_dir / "linkd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _status(sock: Path) -> dict[str, Any] | None:
    try:
        code, body = http_get(sock, "/status", timeout=1.0)
    except OSError:
        return None
    if code != 200:
        return None
    doc: dict[str, Any] = json.loads(body)
    return doc


def _drop(root: Path, node: str, peer: str, channel: str, name: str, data: bytes) -> None:
    out = root / node / "spool" / peer / "out" / channel
    if not out.is_dir():
        return
    temp = out / f".{name}.tmp"
    temp.write_bytes(data)
    os.rename(temp, out / name)


SHORT = {"connected": "up", "connecting": "dial", "backoff": "down", "waiting": "wait"}


def _line(doc: dict[str, Any] | None, name: str) -> str:
    """One node in at most 36 columns: two of them and a separator fit in 80."""
    if doc is None:
        return f"{name:<8} starting".ljust(36)
    parts = []
    for peer in doc.get("peers", []):
        sent = sum(c["sent"] for c in peer["channels"])
        received = sum(c["received"] for c in peer["channels"])
        queued = sum(c["queued"] for c in peer["channels"])
        state = SHORT.get(peer["state"], peer["state"][:4])
        parts.append(f"{name:<8} {state:<4} sent {sent:>3} rcvd {received:>3} q{queued:>3}")
    return "; ".join(parts)[:36].ljust(36)


class _Stop(Exception):
    """SIGTERM or SIGHUP of the demo: stop the daemons as Ctrl-C would."""


def _on_signal(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the demo dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)      # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def run_demo(seconds: float | None, keep_dir: Path | None) -> int:
    temp = None
    if keep_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="linkd-demo-")
        root = Path(temp.name)
    else:
        root = keep_dir.resolve()
        root.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        (root / "pki").mkdir(exist_ok=True)
        if not (root / "pki" / "ca.crt").exists():
            pki.init_ca(root / "pki")
        for name in NODES:
            if not (root / "pki" / f"{name}.crt").exists():
                pki.issue(root / "pki", name)
        port = _free_port()
        configs = {
            "interpol": _toml_config(root, "interpol", "europol", port, dial=False),
            "europol": _toml_config(root, "europol", "interpol", port, dial=True),
        }
        print(f"linkd demo in {root}")
        print(f"interpol listens on 127.0.0.1:{port}, europol dials it.")
        print("Ctrl-C stops both nodes." if seconds is None else
              f"Stopping after {seconds:g} s.")
        for name in NODES:
            log = open(root / name / "linkd.log", "ab")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "linkd.cli.linkd_main", "-c", str(configs[name]),
                 "--log-format", "json"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent))
            log.close()
        socks = {n: root / n / "state" / "status.sock" for n in NODES}
        print("Try, in another terminal:")
        for name in NODES:
            print(f"  linkctl -s {socks[name]} status")
        started = time.monotonic()
        tick = 0
        try:
            while seconds is None or time.monotonic() - started < seconds:
                for proc, name in zip(procs, NODES, strict=True):
                    if proc.poll() is not None:
                        print(f"{name} exited with {proc.returncode}; see "
                              f"{root / name / 'linkd.log'}", file=sys.stderr)
                        return 1
                channel = CHANNELS[tick % len(CHANNELS)][0]
                _drop(root, "interpol", "europol", channel, f"notice-{tick:04d}.txt",
                      f"interpol notice {tick}\n".encode() * 10)
                _drop(root, "europol", "interpol", channel, f"reply-{tick:04d}.txt",
                      f"europol reply {tick}\n".encode() * 10)
                tick += 1
                docs = {n: _status(s) for n, s in socks.items()}
                print(" | ".join(_line(docs[n], n) for n in NODES).rstrip(), flush=True)
                time.sleep(1.0 if seconds is None else min(1.0, max(0.05, seconds / 5)))
        except (KeyboardInterrupt, _Stop):
            print()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(15))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        delivered = {n: sum(1 for _ in (root / n / "spool").glob("*/in/*/*")) for n in NODES}
        print(f"stopped: interpol received {delivered['interpol']} file(s), europol "
              f"{delivered['europol']}; exit codes {codes}")
        if temp is None:
            print(f"kept: logs in {root}/*/linkd.log")
        return 0 if all(c == 0 for c in codes) else 1
    except _Stop:       # before the loop: still stop what was started
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if temp is not None:
            temp.cleanup()
