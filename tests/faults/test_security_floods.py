"""Floods against real daemons (issue 8): idle connections under a 1,024-descriptor
limit, refused handshakes that would flood the log. Figures are printed (-s)."""

from __future__ import annotations

import os
import resource
import selectors
import socket
import ssl
import time
from pathlib import Path

from procs import make_pair, proc_rss_bytes, stop_all, wait_for

NOFILE = 1024
FLOOD = 1100


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_own_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


class IdleFlood:
    """Keeps `n` idle TCP connections open to a port, reopening the ones the server
    closes (a sustained flood)."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.sel = selectors.DefaultSelector()
        self.opened = 0
        self.fill()

    def _open(self) -> None:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        self.sel.register(s, selectors.EVENT_READ)
        self.opened += 1

    def fill(self) -> None:
        while len(self.sel.get_map()) < self.n:
            self._open()

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for key, _ in self.sel.select(0.05):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(s)
                    s.close()
            self.fill()

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


def test_idle_connection_flood_under_1024_descriptors(tmp_path: Path) -> None:
    raise_own_nofile(4 * FLOOD)
    a, b = make_pair(tmp_path, start=False)
    b.wrap = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"]
    from procs import start_connected
    start_connected(a, b)
    flood = None
    try:
        assert b.proc is not None
        base_fds = fds_of(b.proc.pid)
        flood = IdleFlood(b.port or 0, FLOOD)
        peak = base_fds
        for i in range(12):
            flood.pump(0.5)
            peak = max(peak, fds_of(b.proc.pid))
            assert b.healthy(), f"/healthz did not answer under the flood\n{b.tail()}"
            a.drop("bravo", "data", f"during-{i}.txt", f"message {i}".encode())
        wait_for(lambda: len(b.inbound("alpha", "data")) == 12, 30, message=b.tail)
        assert not a.events("link_down") and not b.events("link_down"), b.tail()
        text = b.log_path.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        non_json = [ln for ln in text.splitlines() if ln and not ln.startswith("{")]
        assert not non_json, non_json[:5]
        refused = b.events("connection_refused")
        started = b.events("started")[0]
        assert started["nofile"] == NOFILE
        assert peak < base_fds + started["unauthenticated_max"] + 16
        print(f"\nidle flood: {flood.opened} connections opened ({FLOOD} held at once) against "
              f"RLIMIT_NOFILE={NOFILE}; daemon descriptors {base_fds} before, peak {peak}; "
              f"per-source bound {started['unauthenticated_per_source']}, total bound "
              f"{started['unauthenticated_max']}; connection_refused lines {len(refused)}, "
              f"log {len(text)} bytes; RSS {proc_rss_bytes(b.proc.pid) >> 20} MiB")
    finally:
        if flood is not None:
            flood.close()
        stop_all(a, b)


def test_refused_handshakes_do_not_flood_the_log(tmp_path: Path) -> None:
    a, b = make_pair(tmp_path)
    try:
        assert b.proc is not None
        before = b.log_path.stat().st_size
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)       # no client certificate
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        attempts = 0
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", b.port or 0), timeout=2) as raw, \
                        ctx.wrap_socket(raw) as tls:
                    tls.recv(1)
            except OSError:
                pass
            attempts += 1
        a.drop("bravo", "data", "after.txt", b"audit events still get through")
        wait_for(lambda: "after.txt" in b.inbound("alpha", "data"), 20, message=b.tail)
        summary = wait_for(lambda: b.events("log_suppressed"), 20, message=b.tail)
        text = b.log_path.read_bytes()[before:].decode(errors="replace")
        refusals = [ln for ln in text.splitlines() if '"tls_refused"' in ln]
        assert attempts > 100, attempts         # the flood was a flood
        assert len(refusals) <= 20, len(refusals)
        assert len(text.splitlines()) <= 40, text[-3000:]
        counts = summary[0]["counts"]
        assert counts[0]["event"] == "tls_refused" and counts[0]["source"] == "127.0.0.1"
        assert counts[0]["count"] >= attempts - 20 - 5
        assert b.events("message_delivered")
        print(f"\nrefusal flood: {attempts} refused handshakes in 5 s -> {len(refusals)} "
              f"tls_refused lines, {len(text.splitlines())} lines / {len(text)} bytes of log; "
              f"log_suppressed counted {counts[0]['count']}")
    finally:
        stop_all(a, b)
