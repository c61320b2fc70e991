"""A hand-driven protocol peer for real-daemon tests: linkd's own sans-IO Session over
a blocking TLS socket, speaking as `node` with `cert`'s identity (from `source`:
127.0.0.2 is another host on lo), saying and sending whatever a test tells it to,
whatever the hello says."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from linkd.proto import frames as F
from linkd.proto import session as S


class SocketPeer:
    S = S

    def __init__(self, pki_dir: Path, cert: str, node: str, peer: str, port: int,
                 channels: list[str], source: str = "127.0.0.1") -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_cert_chain(str(pki_dir / f"{cert}.crt"), str(pki_dir / f"{cert}.key"))
        ctx.load_verify_locations(cafile=str(pki_dir / "ca.crt"))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                       source_address=(source, 0))
        self.sock = ctx.wrap_socket(raw)
        self.session = S.Session(
            node=node, peer=peer, now=time.monotonic(), heartbeat_interval=60,
            heartbeat_timeout=120,
            channels=[F.ChannelHello(name=c, max=1 << 30, credit=4 << 20) for c in channels])
        self.events: list[Any] = []
        self.flush()

    def flush(self) -> None:
        data = self.session.data_to_send(time.monotonic())
        if data:
            self.sock.sendall(data)

    def pump(self, until: Any, timeout: float = 20) -> Any:
        """Read until `until(events)` is true or the connection ends; the events."""
        deadline = time.monotonic() + timeout
        while not until(self.events):
            if time.monotonic() > deadline:
                raise AssertionError(f"fake peer: timed out; events {self.events}")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                data = b""
            self.events += self.session.receive_data(data, time.monotonic())
            if not data or self.session.state is S.State.CLOSED:
                break
            self.flush()
        return self.events

    def pump_until(self, predicate: Any, timeout: float = 20) -> Any:
        """Read until `predicate(events)` returns something true, and return it; the
        session closing first is a test failure."""
        deadline = time.monotonic() + timeout
        while True:
            found = predicate(self.events)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"fake sender: timed out; events {self.events}")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            self.events += self.session.receive_data(data, time.monotonic())
            self.flush()
            if any(isinstance(e, S.SessionClosed) for e in self.events):
                raise AssertionError(f"session closed: {self.events}")

    def send_file(self, ch: str, seq: int, name: str, data: bytes) -> None:
        digest = hashlib.sha256(data).digest()
        self.session.send_msg(ch, seq, name, len(data), digest, 0)
        for i in range(0, len(data), 256 * 1024):
            self.session.send_data(ch, data[i:i + 256 * 1024])
        self.flush()

    def close(self, goodbye: bool = False) -> None:
        if goodbye:
            try:
                self.session.close("test done")
                self.flush()
            except Exception:  # noqa: BLE001 - best effort: the test is over
                pass
        try:
            self.sock.close()
        except OSError:
            pass


class FakeSender(SocketPeer):
    """Speaks as `node` with its own certificate and says goodbye when closed."""

    def __init__(self, pki_dir: Path, node: str, peer: str, port: int,
                 channels: list[str]) -> None:
        super().__init__(pki_dir, node, node, peer, port, channels)

    def close(self, goodbye: bool = True) -> None:
        super().close(goodbye)
