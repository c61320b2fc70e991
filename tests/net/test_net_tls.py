"""The TLS policy (linkd.net.tls) over real pyOpenSSL handshakes on trio memory streams.

Who gets in and who does not, and with which key exchange: two linkd nodes agree
on X25519MLKEM768; a classical-only peer (Python's `ssl` here links OpenSSL 3.0,
which has no ML-KEM) gets X25519 unless `require_post_quantum`; every negative
fails closed with the reason that `tls_refused` logs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from memlink import node_config

from linkd.config import ChannelConfig, Config, PeerConfig
from linkd.errors import ConfigError
from linkd.net.tls import (
    HYBRID_GROUP,
    PeerIdentity,
    TLSContexts,
    TLSRefused,
    identify,
    make_contexts,
    tls_info,
)
from linkd.net.tls_stream import TLSStream

NOW = dt.datetime.now(dt.UTC)


def peer(name: str, pin: str | None = None) -> PeerConfig:
    return PeerConfig(name=name, pin_sha256=pin, channels=(ChannelConfig("data"),))


def with_tls(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, tls=dataclasses.replace(cfg.tls, **changes))


@dataclasses.dataclass
class Outcome:
    server: PeerIdentity | TLSRefused
    client: PeerIdentity | TLSRefused
    server_stream: TLSStream
    client_stream: TLSStream


async def handshake(server_cfg: Config, client_cfg: Config) -> Outcome:
    """Both linkd sides, as supervisor runs them; a refusing side closes at once."""
    left, right = trio.testing.memory_stream_pair()
    sctx, cctx = make_contexts(server_cfg), make_contexts(client_cfg)
    server = sctx.server_stream(left, list(server_cfg.peers))
    client = cctx.client_stream(right, client_cfg.peers[0])
    results: dict[str, Any] = {}

    async def side(name: str, contexts: TLSContexts, stream: TLSStream) -> None:
        try:
            results[name] = await contexts.finish_handshake(stream)
        except TLSRefused as exc:
            results[name] = exc
            await trio.aclose_forcefully(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "server", sctx, server)
            nursery.start_soon(side, "client", cctx, client)
    return Outcome(results["server"], results["client"], server, client)


async def first_read_fails(stream: TLSStream) -> BaseException:
    """TLS 1.3: a client the server refused learns it on its first read."""
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
        await stream.receive_some()
    return info.value


def pair(tmp_path: Path, ca: trustme.CA | None = None,
         ca2: trustme.CA | None = None) -> tuple[Config, Config]:
    ca = ca or trustme.CA()
    alpha = node_config(tmp_path, ca, "alpha", [peer("bravo")])
    bravo = node_config(tmp_path, ca2 or ca, "bravo", [peer("alpha")])
    return alpha, bravo


# -- the good case ---------------------------------------------------------------------

async def test_two_linkd_nodes_agree_on_the_hybrid_post_quantum_group(tmp_path):
    alpha, bravo = pair(tmp_path)
    out = await handshake(bravo, alpha)
    assert isinstance(out.server, PeerIdentity) and out.server.peer.name == "alpha"
    assert isinstance(out.client, PeerIdentity) and out.client.peer.name == "bravo"
    for stream, identity in ((out.server_stream, out.server), (out.client_stream, out.client)):
        assert stream.group() == HYBRID_GROUP == "X25519MLKEM768"
        info = tls_info(stream, identity)
        assert info["version"] == "TLSv1.3" and info["group"] == "X25519MLKEM768"
        assert info["post_quantum"] is True and info["cipher"].startswith("TLS_")
        assert info["peer_not_after"].endswith("Z")
    assert out.server.subject.startswith("CN=alpha,")
    # and the stream works both ways
    await out.client_stream.send_all(b"ping")
    assert await out.server_stream.receive_some() == b"ping"
    await out.server_stream.send_all(b"pong")
    assert await out.client_stream.receive_some() == b"pong"


async def test_require_post_quantum_on_both_sides_still_connects(tmp_path):
    alpha, bravo = pair(tmp_path)
    out = await handshake(with_tls(bravo, require_post_quantum=True),
                          with_tls(alpha, require_post_quantum=True))
    assert isinstance(out.server, PeerIdentity) and isinstance(out.client, PeerIdentity)
    assert out.server_stream.group() == out.client_stream.group() == "X25519MLKEM768"


# -- identity --------------------------------------------------------------------------

async def test_a_certificate_naming_no_configured_peer_fails_the_handshake(tmp_path):
    ca = trustme.CA()
    mallory = node_config(tmp_path, ca, "mallory", [peer("bravo")])
    bravo = node_config(tmp_path, ca, "bravo", [peer("alpha")])
    out = await handshake(bravo, mallory)
    assert isinstance(out.server, TLSRefused)
    assert "'mallory'" in str(out.server) and "not a configured peer (alpha)" in str(out.server)
    # mallory finished its side (TLS 1.3) but reads an alert, never a byte of bravo's own
    assert isinstance(out.client, PeerIdentity)
    await first_read_fails(out.client_stream)


async def test_a_dialler_refuses_a_server_that_is_not_the_configured_peer(tmp_path):
    ca = trustme.CA()
    alpha = node_config(tmp_path, ca, "alpha", [peer("bravo")])
    impostor = node_config(tmp_path, ca, "charlie", [peer("alpha")])
    out = await handshake(impostor, alpha)
    assert isinstance(out.client, TLSRefused) and "'charlie'" in str(out.client)
    # the client stopped before sending its certificate: the impostor never saw it
    assert isinstance(out.server, TLSRefused)


async def test_pin_sha256_mismatch_is_refused_and_a_matching_pin_accepted(tmp_path):
    ca = trustme.CA()
    alpha = node_config(tmp_path, ca, "alpha", [peer("bravo")])
    der = x509.load_pem_x509_certificate(alpha.tls.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    bad = node_config(tmp_path, ca, "bravo", [peer("alpha", pin="0" * 64)])
    out = await handshake(bad, alpha)
    assert isinstance(out.server, TLSRefused) and "pin_sha256" in str(out.server)
    good = dataclasses.replace(bad, peers=(peer("alpha", pin=hashlib.sha256(der).hexdigest()),))
    out = await handshake(good, alpha)
    assert isinstance(out.server, PeerIdentity) and out.server.sha256 == hashlib.sha256(
        der).hexdigest()


def test_identify_without_a_certificate_is_refused():
    from linkd.net.tls import IdentityError
    with pytest.raises(IdentityError, match="no certificate"):
        identify(None, [peer("alpha")])


# -- chain, time, revocation -----------------------------------------------------------

async def test_a_certificate_from_another_ca_fails_on_both_sides(tmp_path):
    alpha, bravo = pair(tmp_path, trustme.CA(), trustme.CA())
    out = await handshake(bravo, alpha)
    assert isinstance(out.client, TLSRefused)
    assert str(out.client).startswith("certificate verify failed: ")
    # said plainly, naming our CA file (an operator trial read only OpenSSL's words)
    assert f"not issued by our [tls].ca ({alpha.tls.ca})" in str(out.client), out.client
    assert isinstance(out.server, TLSRefused)


def test_the_peers_alerts_say_what_they_mean_for_us():
    from OpenSSL import SSL

    from linkd.net.tls_stream import describe_openssl_error
    unknown = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])
    assert describe_openssl_error(unknown) == (
        "tlsv1 alert unknown ca: the peer does not trust the CA that issued our "
        "certificate (its [tls].ca is not ours): both sites need the link's CA")
    internal = SSL.Error([("SSL routines", "", "tlsv1 alert internal error")])
    assert "tls_refused" in describe_openssl_error(internal)
    other = SSL.Error([("SSL routines", "", "wrong version number")])
    assert describe_openssl_error(other) == "wrong version number"


async def test_an_expired_peer_certificate_is_refused(tmp_path):
    ca = trustme.CA()
    alpha, bravo = pair(tmp_path, ca)
    old = ca.issue_cert("alpha", common_name="alpha", not_before=NOW - dt.timedelta(days=30),
                        not_after=NOW - dt.timedelta(days=1))
    old.cert_chain_pems[0].write_to_path(str(alpha.tls.cert))
    old.private_key_pem.write_to_path(str(alpha.tls.key))
    out = await handshake(bravo, alpha)
    assert isinstance(out.server, TLSRefused)
    assert str(out.server) == "certificate verify failed: certificate has expired"
    await first_read_fails(out.client_stream)


def write_crl(ca: trustme.CA, path: Path, revoked_pem: bytes | None = None) -> Path:
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(NOW - dt.timedelta(days=1))
               .next_update(NOW + dt.timedelta(days=1))
               .add_extension(x509.CRLNumber(1), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   key.public_key()), critical=False))   # type: ignore[arg-type]
    if revoked_pem is not None:
        serial = x509.load_pem_x509_certificate(revoked_pem).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(NOW - dt.timedelta(hours=1)).build())
    crl = builder.sign(key, hashes.SHA256())   # type: ignore[arg-type]
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


async def test_a_revoked_peer_certificate_is_refused_and_others_pass_the_crl(tmp_path):
    ca = trustme.CA()
    alpha, bravo = pair(tmp_path, ca)
    crl = write_crl(ca, tmp_path / "ca.crl", alpha.tls.cert.read_bytes())
    out = await handshake(with_tls(bravo, crl=crl), alpha)
    assert isinstance(out.server, TLSRefused)
    assert str(out.server) == "certificate verify failed: certificate revoked"
    await first_read_fails(out.client_stream)
    # the same CRL, checked by alpha, lets bravo (not revoked) in
    out = await handshake(bravo, with_tls(alpha, crl=crl))
    assert isinstance(out.client, PeerIdentity) and isinstance(out.server, PeerIdentity)


async def test_a_crl_of_another_ca_fails_closed(tmp_path):
    alpha, bravo = pair(tmp_path)
    crl = write_crl(trustme.CA(), tmp_path / "other.crl")
    out = await handshake(with_tls(bravo, crl=crl), alpha)
    assert isinstance(out.server, TLSRefused)
    assert str(out.server) == "certificate verify failed: unable to get certificate CRL"


# -- classical peers: Python's ssl (OpenSSL 3.0, no ML-KEM) -----------------------------

def stdlib_client(cfg: Config, *, cert: bool = True,
                  max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(cfg.tls.ca))
    if cert:
        ctx.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


async def stdlib_against_linkd_server(server_cfg: Config, client_ctx: ssl.SSLContext
                                      ) -> tuple[PeerIdentity | TLSRefused, TLSStream,
                                                 trio.SSLStream[Any] | BaseException]:
    left, right = trio.testing.memory_stream_pair()
    contexts = make_contexts(server_cfg)
    server = contexts.server_stream(left, list(server_cfg.peers))
    client = trio.SSLStream(right, client_ctx, server_hostname="bravo")
    results: dict[str, Any] = {}

    async def run_server() -> None:
        try:
            results["server"] = await contexts.finish_handshake(server)
        except TLSRefused as exc:
            results["server"] = exc
            await trio.aclose_forcefully(server)

    async def run_client() -> None:
        try:
            await client.do_handshake()
            results["client"] = client
        except trio.BrokenResourceError as exc:
            results["client"] = exc
            await trio.aclose_forcefully(client)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_server)
            nursery.start_soon(run_client)
    return results["server"], server, results["client"]


def test_pythons_ssl_here_is_classical_only():
    """The premise of the tests below (and of the issue): no ML-KEM in the stdlib's OpenSSL."""
    assert ssl.OPENSSL_VERSION_INFO < (3, 5), ssl.OPENSSL_VERSION


async def test_a_classical_only_client_is_accepted_on_x25519_and_marked(tmp_path):
    alpha, bravo = pair(tmp_path)
    server, stream, client = await stdlib_against_linkd_server(bravo, stdlib_client(alpha))
    assert isinstance(server, PeerIdentity) and server.peer.name == "alpha"
    assert isinstance(client, trio.SSLStream)
    assert stream.group() == "x25519"      # OpenSSL's name; tls_info says X25519
    info = tls_info(stream, server)
    assert info["group"] == "X25519" and info["post_quantum"] is False
    await client.send_all(b"hello")
    assert await stream.receive_some() == b"hello"


async def test_require_post_quantum_refuses_a_classical_only_client_in_the_handshake(tmp_path):
    alpha, bravo = pair(tmp_path)
    server, _stream, client = await stdlib_against_linkd_server(
        with_tls(bravo, require_post_quantum=True), stdlib_client(alpha))
    assert isinstance(server, TLSRefused)
    assert "post-quantum" in str(server) and "require_post_quantum = true" in str(server)
    assert isinstance(client, trio.BrokenResourceError)     # refused before it finished


async def test_require_post_quantum_refuses_a_classical_only_server(tmp_path):
    alpha, bravo = pair(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(bravo.tls.cert), str(bravo.tls.key))
    left, right = trio.testing.memory_stream_pair()
    contexts = make_contexts(with_tls(alpha, require_post_quantum=True))
    client = contexts.client_stream(right, alpha.peers[0])
    server = trio.SSLStream(left, server_ctx, server_side=True)

    async def run_server() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await server.do_handshake()
        await trio.aclose_forcefully(server)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_server)
            # Python's server just closes (trio aborts without an alert); OpenSSL's
            # s_server would send handshake_failure: both name the likely cause.
            with pytest.raises(TLSRefused, match="post-quantum"):
                await contexts.finish_handshake(client)


async def test_a_client_without_a_certificate_is_refused(tmp_path):
    alpha, bravo = pair(tmp_path)
    server, _stream, client = await stdlib_against_linkd_server(
        bravo, stdlib_client(alpha, cert=False))
    assert isinstance(server, TLSRefused) and "certificate" in str(server)


async def test_tls_1_2_is_refused(tmp_path):
    alpha, bravo = pair(tmp_path)
    server, _stream, client = await stdlib_against_linkd_server(
        bravo, stdlib_client(alpha, max_version=ssl.TLSVersion.TLSv1_2))
    assert isinstance(server, TLSRefused) and "unsupported protocol" in str(server)
    assert isinstance(client, trio.BrokenResourceError)


async def test_no_session_is_ever_resumed(tmp_path):
    """Each session is a full handshake (every check runs): a ticket is never honoured."""
    alpha, bravo = pair(tmp_path)
    client_ctx = stdlib_client(alpha)
    server, stream, client = await stdlib_against_linkd_server(bravo, client_ctx)
    assert isinstance(server, PeerIdentity) and isinstance(client, trio.SSLStream)
    await stream.send_all(b"x")          # the server's tickets go out with its first write
    assert await client.receive_some() == b"x"
    session = client.session
    assert session is not None
    left, right = trio.testing.memory_stream_pair()
    contexts = make_contexts(bravo)
    again = contexts.server_stream(left, list(bravo.peers))
    resumer = trio.SSLStream(right, client_ctx, server_hostname="bravo")
    resumer.session = session
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(contexts.finish_handshake, again)
            await resumer.do_handshake()
    assert resumer.session_reused is False


# -- construction ----------------------------------------------------------------------

async def test_a_stream_without_a_verifier_trusts_no_one(tmp_path):
    alpha, bravo = pair(tmp_path)
    left, right = trio.testing.memory_stream_pair()
    bare = TLSStream(left, make_contexts(bravo).server, server_side=True)   # no app_data
    client_contexts = make_contexts(alpha)
    client = client_contexts.client_stream(right, alpha.peers[0])

    async def run_server() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await bare.do_handshake()
        await trio.aclose_forcefully(bare)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_server)
            await client_contexts.finish_handshake(client)
    await first_read_fails(client)


def test_unloadable_credentials_are_one_config_error(tmp_path):
    alpha, _ = pair(tmp_path)
    alpha.tls.key.write_text("not a key\n")
    with pytest.raises(ConfigError, match="run linkd --check"):
        make_contexts(alpha)
