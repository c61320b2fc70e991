"""Real daemons on 127.0.0.1: the post-quantum key exchange end to end.

Two linkd nodes agree on X25519MLKEM768 (and say so in /status); a classical-only
client (Python's `ssl`, OpenSSL 3.0 here) gets in without `require_post_quantum`
and is refused in the handshake, with a logged reason, with it.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from procs import Daemon, make_pki, start_connected, stop_all, wait_for


class PQDaemon(Daemon):
    """A test daemon whose [tls] section sets require_post_quantum."""

    require_post_quantum: bool | None = None

    def write_config(self) -> None:
        super().write_config()
        if self.require_post_quantum is not None:
            text = self.config_path.read_text()
            value = "true" if self.require_post_quantum else "false"
            self.config_path.write_text(
                text.replace("[tls]\n", f"[tls]\nrequire_post_quantum = {value}\n", 1))


def pair(tmp_path: Path, *, a_pq: bool | None = None, b_pq: bool | None = None
         ) -> tuple[PQDaemon, PQDaemon]:
    from procs import free_port
    pki_dir = make_pki(tmp_path / "pki", ["alpha", "bravo"])
    b = PQDaemon(tmp_path, "bravo", pki_dir, port=free_port())
    a = PQDaemon(tmp_path, "alpha", pki_dir)
    a.require_post_quantum, b.require_post_quantum = a_pq, b_pq
    a.add_peer("bravo", [{"name": "data"}], connect=f"127.0.0.1:{b.port}")
    b.add_peer("alpha", [{"name": "data"}])
    return a, b


def peer_tls(d: Daemon, peer: str) -> dict | None:
    for p in d.status()["peers"]:
        if p["name"] == peer:
            return p["tls"]
    return None


@pytest.mark.parametrize("require", [None, True], ids=["default", "require_post_quantum"])
def test_two_linkd_nodes_agree_on_x25519mlkem768(tmp_path, require):
    a, b = pair(tmp_path, a_pq=require, b_pq=require)
    try:
        start_connected(a, b)
        for d, peer in ((a, "bravo"), (b, "alpha")):
            tls = peer_tls(d, peer)
            assert tls is not None, d.status()
            assert tls["version"] == "TLSv1.3"
            assert tls["group"] == "X25519MLKEM768" and tls["post_quantum"] is True, tls
    finally:
        stop_all(a, b)


def classical_client(pki: Path, port: int) -> tuple[bool, bytes, str | None]:
    """Connect to a daemon as alpha with Python's ssl; (handshake ok, first bytes, error)."""
    assert ssl.OPENSSL_VERSION_INFO < (3, 5)      # no ML-KEM: offers X25519 and friends only
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "alpha.crt"), str(pki / "alpha.key"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        try:
            sock = ctx.wrap_socket(raw, server_hostname="bravo")
        except (ssl.SSLError, OSError) as exc:
            return False, b"", repr(exc)
        with sock:
            try:
                return True, sock.recv(4096), None     # bravo's hello frame, if accepted
            except (ssl.SSLError, OSError) as exc:
                return True, b"", repr(exc)
    finally:
        raw.close()


def test_a_classical_only_client_is_accepted_by_default(tmp_path):
    _a, b = pair(tmp_path)
    try:
        b.start()
        ok, data, error = classical_client(b.pki_dir, b.port)
        assert ok and data, error          # handshake done and bravo's hello arrived
        assert not b.events("tls_refused"), b.tail()
    finally:
        stop_all(b)


def test_require_post_quantum_refuses_a_classical_only_client_with_a_reason(tmp_path):
    _a, b = pair(tmp_path, b_pq=True)
    try:
        b.start()
        ok, data, error = classical_client(b.pki_dir, b.port)
        assert not ok and not data, (ok, data, error)     # refused inside the handshake
        assert error is not None and "HANDSHAKE_FAILURE" in error.upper()
        refused = wait_for(lambda: b.events("tls_refused"), 15, message=b.tail)
        reason = refused[0]["reason"]
        assert "post-quantum" in reason and "require_post_quantum = true" in reason, reason
        assert refused[0]["remote"].startswith("127.0.0.1:")
    finally:
        stop_all(b)
