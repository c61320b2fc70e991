"""`linkctl demo`: two linkd nodes on 127.0.0.1 exchanging sample traffic.

Makes a throwaway link CA and two node certificates, writes two configs
(`interpol` listens, `europol` dials it), starts both daemons as child
processes, drops sample files both ways, and prints a live line per second
from both status sockets. Stops both daemons cleanly (SIGTERM) on Ctrl-C or
after --seconds, prints a summary, and removes its temporary folder.
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
from ..status import http_get

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


def _line(doc: dict[str, Any] | None, name: str) -> str:
    if doc is None:
        return f"{name}: starting"
    parts = []
    for peer in doc.get("peers", []):
        sent = sum(c["sent"] for c in peer["channels"])
        received = sum(c["received"] for c in peer["channels"])
        queued = sum(c["queued"] for c in peer["channels"])
        rtt = f"{peer['rtt_ms']:.1f}ms" if peer.get("rtt_ms") is not None else "-"
        parts.append(f"{name}->{peer['name']} {peer['state']:<10} sent {sent:>3} "
                     f"received {received:>3} queued {queued:>2} rtt {rtt}")
    return "; ".join(parts)


def run_demo(seconds: float | None, keep_dir: Path | None) -> int:
    temp = None
    if keep_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="linkd-demo-")
        root = Path(temp.name)
    else:
        root = keep_dir.resolve()
        root.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
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
        print(f"linkd demo in {root}: interpol listens on 127.0.0.1:{port}, europol dials it")
        print("Ctrl-C stops both nodes." if seconds is None else
              f"Stopping after {seconds:g} s.")
        for name in NODES:
            log = open(root / name / "linkd.log", "ab")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "linkd.cli.linkd_main", "-c", str(configs[name]),
                 "--log-format", "json"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True))
            log.close()
        socks = {n: root / n / "state" / "status.sock" for n in NODES}
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
                print(" | ".join(_line(docs[n], n) for n in NODES), flush=True)
                time.sleep(1.0 if seconds is None else min(1.0, max(0.05, seconds / 5)))
        except KeyboardInterrupt:
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
        print(f"stopped: interpol received {delivered['interpol']} file(s), europol received "
              f"{delivered['europol']} file(s); exit codes {codes}")
        return 0 if all(c == 0 for c in codes) else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if temp is not None:
            temp.cleanup()
