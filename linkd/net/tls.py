"""The one place TLS policy lives, on pyOpenSSL (OpenSSL 4 from `cryptography`).

* TLS 1.3 only, both directions; mutual authentication (VERIFY_PEER |
  VERIFY_FAIL_IF_NO_PEER_CERT on both sides). Peers must chain to `[tls].ca`
  only (no system trust store), X509_STRICT, and with `[tls].crl` the leaf is
  checked against it (CRL_CHECK: the leaf only). No session resumption: the
  session cache is off on both sides and no session is ever offered again, so
  every session is a full handshake that runs every check below; no 0-RTT
  (early data is off by default); no renegotiation (TLS 1.3 has none).
  pyOpenSSL cannot set the number of TLS 1.3 tickets to 0: the server still
  emits two stateful tickets, which no server will ever resume (no cache).
* One verifier. The context's verify callback gets each certificate of the
  chain with OpenSSL's verdict; the first failure is kept with its OpenSSL
  wording ("certificate verify failed: certificate revoked"). For the leaf
  that OpenSSL accepts it runs `identify()` (the certificate must name a
  configured peer: CN or DNS SAN, exact, ASCII case-insensitive; and match
  `pin_sha256`), inside the handshake: a client that names no configured peer
  gets an alert and never a byte of linkd's own; a dialler never sends its
  certificate to an impostor. Per-connection state (`Verifier`) hangs on the
  Connection's app data; the callback never raises (pyOpenSSL would keep the
  exception on the shared context).
* Key exchange: the groups are "*X25519MLKEM768 / *X25519": a client sends key
  shares for both, so two linkd nodes agree on the hybrid ML-KEM group and a
  classical-only peer gets X25519 with no extra round trip. With
  `require_post_quantum` the only group is X25519MLKEM768: a classical-only
  peer fails the handshake (no shared group), and `finish_handshake` checks
  the negotiated group again (fail closed).
* Under TLS 1.3 a client whose certificate the server rejects still finishes
  its handshake; it learns of the refusal on its first read. So a link counts
  as up only once the peer's hello has arrived (linkd.net.connection).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib  # SSL_CTX_set1_curves_list: no public pyOpenSSL API

from ..certs import cert_matches_name, cert_sha256
from ..config import Config, PeerConfig
from ..errors import ConfigError as ConfigError  # re-exported
from ..errors import IdentityError as IdentityError
from ..errors import TLSRefused as TLSRefused
from ..jsontypes import JSONObject
from .tls_stream import EOF_WITHOUT_CLOSE_NOTIFY, TLSError, TLSStream, describe_openssl_error

HYBRID_GROUP = "X25519MLKEM768"
CLASSICAL_GROUP = "X25519"
# "*" = send a key share for it; "/" separates preference tuples (OpenSSL >= 3.5).
GROUPS_PREFER_HYBRID = f"*{HYBRID_GROUP} / *{CLASSICAL_GROUP}"
GROUPS_HYBRID_ONLY = HYBRID_GROUP
# Groups whose secret does not fall to a quantum computer alone (ML-KEM hybrids).
POST_QUANTUM_GROUPS = frozenset({"X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024"})

_VERIFY_MODE = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT






def is_post_quantum(group: str | None) -> bool:
    return group in POST_QUANTUM_GROUPS


def group_name(stream: TLSStream) -> str | None:
    """The negotiated group by its IANA name (OpenSSL says "x25519" for X25519)."""
    group = stream.group()
    return {"x25519": "X25519", "x448": "X448"}.get(group, group) if group else None


@dataclass(frozen=True)
class PeerIdentity:
    peer: PeerConfig
    subject: str
    not_after: dt.datetime
    sha256: str


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def identify(der: bytes | None, candidates: list[PeerConfig],
             configured: list[PeerConfig] | None = None) -> PeerIdentity:
    """The configured peer that `der` names, or IdentityError with the reason.

    `candidates` are the peers acceptable on this connection (the dialled one, or all
    on the listener); `configured` all peers (default: the candidates). A
    certificate naming several configured peers is refused: it would let one key
    speak for several peers (CONTRACT §5)."""
    if not der:
        raise IdentityError("peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    digest = cert_sha256(der)
    everyone = {p.name: p for p in (configured or [])} | {p.name: p for p in candidates}
    all_named = [p for p in everyone.values() if cert_matches_name(cert, p.name)]
    if len(all_named) > 1:
        names = ", ".join(sorted(p.name for p in all_named))
        raise IdentityError(f"certificate names several configured peers ({names}): "
                            "ambiguous, refused (issue one certificate per peer)")
    named = [p for p in candidates if cert_matches_name(cert, p.name)]
    if not named:
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        wanted = ", ".join(p.name for p in candidates) or "(none)"
        raise IdentityError(f"certificate names {cns or _subject(cert)!r}, "
                            f"not a configured peer ({wanted})")
    peer = named[0]
    if peer.pin_sha256 is not None and peer.pin_sha256 != digest:
        raise IdentityError(f"certificate of {peer.name} does not match pin_sha256 "
                            f"(got {digest})")
    not_after = cert.not_valid_after_utc
    return PeerIdentity(peer=peer, subject=_subject(cert), not_after=not_after, sha256=digest)


# X509_V_ERR_* meaning the chain does not lead to our CA: UNABLE_TO_GET_ISSUER_CERT,
# CERT_SIGNATURE_FAILURE, DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN,
# UNABLE_TO_GET_ISSUER_CERT_LOCALLY, UNABLE_TO_VERIFY_LEAF_SIGNATURE
_ISSUER_ERRORS = frozenset({2, 7, 18, 19, 20, 21})


def _verify_message(errnum: int) -> str:
    text = _lib.X509_verify_cert_error_string(errnum)
    return _ffi.string(text).decode("ascii", "replace") if text else f"error {errnum}"


@dataclass
class Verifier:
    """One connection's verification: which peers may be on the other end, and the verdict."""

    candidates: list[PeerConfig]
    configured: list[PeerConfig] | None = None
    error: str | None = None
    identity: PeerIdentity | None = None
    ca: str | None = None               # our [tls].ca, named when a chain does not lead there

    def check(self, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            if self.error is None:
                self.error = f"certificate verify failed: {_verify_message(errnum)}" + (
                    f" (at chain depth {depth})" if depth else "") + (
                    f": the peer's certificate was not issued by our [tls].ca"
                    f"{f' ({self.ca})' if self.ca else ''}; both sites need the "
                    f"link's CA" if errnum in _ISSUER_ERRORS else "")
            return False
        if depth != 0:
            return True
        try:
            der = cert.to_cryptography().public_bytes(Encoding.DER)
            self.identity = identify(der, self.candidates, self.configured)
        except IdentityError as exc:
            self.error = str(exc)
            return False
        except Exception as exc:   # noqa: BLE001 - a bad certificate must not escape as a crash
            self.error = f"unreadable peer certificate: {exc}"
            return False
        return True


def _verify_callback(conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int,
                     ok: int) -> bool:
    verifier = conn.get_app_data()
    if not isinstance(verifier, Verifier):
        return False        # fail closed: a connection made without a Verifier trusts no one
    return verifier.check(cert, errnum, depth, ok)


def _set_groups(ctx: SSL.Context, groups: str) -> None:
    # pyOpenSSL 26 has no Context.set_groups (set_tmp_ecdh takes one classical curve),
    # so call OpenSSL's SSL_CTX_set1_groups_list (alias set1_curves_list) through its binding.
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode("ascii")) != 1:
        version = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
        raise ConfigError(f"the OpenSSL in cryptography ({version}) cannot use the TLS "
                          f"groups {groups!r}: install cryptography >= 45 "
                          "(OpenSSL >= 3.5, ML-KEM)")


def _context(cfg: Config) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # One SSL_write per send_all, not one per 16 KiB record (memory BIOs never block).
    ctx.clear_mode(_lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    # Free the record buffers of an idle session (~34 KiB), as CPython's ssl does.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        ctx.use_certificate_chain_file(str(cfg.tls.cert))
        ctx.use_privatekey_file(str(cfg.tls.key))
        ctx.check_privatekey()
        ctx.load_verify_locations(str(cfg.tls.ca))
        if cfg.tls.crl is not None:
            ctx.load_verify_locations(str(cfg.tls.crl))    # PEM: certificates and CRLs
    except SSL.Error as exc:
        raise ConfigError(f"cannot load the TLS credentials of {cfg.path.name} "
                          f"([tls] cert, key, ca, crl): {describe_openssl_error(exc)}: "
                          f"run linkd --check") from None
    flags = crypto.X509StoreFlags.X509_STRICT
    if cfg.tls.crl is not None:
        flags |= crypto.X509StoreFlags.CRL_CHECK
    store = ctx.get_cert_store()
    assert store is not None
    store.set_flags(flags)
    ctx.set_verify(_VERIFY_MODE, _verify_callback)
    _set_groups(ctx, GROUPS_HYBRID_ONLY if cfg.tls.require_post_quantum
                else GROUPS_PREFER_HYBRID)
    return ctx


@dataclass
class TLSContexts:
    """The server and client contexts of one configuration (rebuilt on SIGHUP)."""

    server: SSL.Context
    client: SSL.Context
    require_post_quantum: bool = False
    ca: str | None = None

    def server_stream(self, transport: trio.abc.Stream,
                      candidates: list[PeerConfig]) -> TLSStream:
        return TLSStream(transport, self.server, server_side=True,
                         app_data=Verifier(list(candidates), ca=self.ca))

    def client_stream(self, transport: trio.abc.Stream, peer: PeerConfig,
                      server_hostname: str | None = None,
                      configured: list[PeerConfig] | None = None) -> TLSStream:
        return TLSStream(transport, self.client, server_hostname=server_hostname,
                         app_data=Verifier([peer], configured, ca=self.ca))

    async def finish_handshake(self, stream: TLSStream) -> PeerIdentity:
        """Run the handshake and return who the peer is, or raise TLSRefused (the reason).

        Deadlines are the caller's (one handshake_timeout)."""
        verifier = stream.connection.get_app_data()
        assert isinstance(verifier, Verifier)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, OSError) as exc:
            raise TLSRefused(self._handshake_failure(stream, verifier, exc)) from exc
        identity = verifier.identity
        if identity is None or verifier.error is not None:     # fail closed
            raise TLSRefused(verifier.error or "peer certificate was not verified")
        der = stream.peer_certificate_der()
        if der is None or cert_sha256(der) != identity.sha256:
            raise TLSRefused("peer certificate changed during the handshake")
        group = group_name(stream)
        if self.require_post_quantum and not is_post_quantum(group):
            raise TLSRefused(f"key exchange {group} is not post-quantum "
                             "and require_post_quantum = true")
        return identity

    def _handshake_failure(self, stream: TLSStream, verifier: Verifier,
                           exc: BaseException) -> str:
        if verifier.error is not None:
            return verifier.error
        detail = describe_ssl_error(exc)
        if detail.endswith(EOF_WITHOUT_CLOSE_NOTIFY):
            detail = "peer closed the connection during the TLS handshake"
            if not (self.require_post_quantum and stream.server_side is False):
                return detail
        if self.require_post_quantum and _no_shared_group(detail):
            return (f"no post-quantum key exchange ({HYBRID_GROUP}) in common with the peer "
                    f"and require_post_quantum = true ({detail})")
        return detail


def _no_shared_group(detail: str) -> bool:
    text = detail.lower()
    return any(s in text for s in ("no suitable key share", "no shared group",
                                   "handshake failure", "bad key share",
                                   "closed the connection during the tls handshake"))


def make_contexts(cfg: Config) -> TLSContexts:
    return TLSContexts(server=_context(cfg), client=_context(cfg),
                       require_post_quantum=cfg.tls.require_post_quantum, ca=str(cfg.tls.ca))


def tls_info(stream: TLSStream, identity: PeerIdentity) -> JSONObject:
    """What status (`tls`), metrics and `link_up` show about a session's TLS."""
    group = group_name(stream)
    return {"version": stream.version(), "cipher": stream.cipher(), "group": group,
            "post_quantum": is_post_quantum(group),
            "peer_subject": identity.subject,
            "peer_not_after": identity.not_after.isoformat().replace("+00:00", "Z")}


def describe_ssl_error(exc: BaseException) -> str:
    """A readable reason for a failed TLS stream (its cause is a TLSError or an OSError)."""
    inner = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(inner, TLSError):
        return f"TLS error: {inner}"
    if isinstance(inner, SSL.Error):
        return f"TLS error: {describe_openssl_error(inner)}"
    if isinstance(inner, OSError):
        return f"{type(inner).__name__}: {inner.strerror or inner}"
    return str(inner) or type(inner).__name__
