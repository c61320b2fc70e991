"""The one place TLS policy lives.

* TLS 1.3 only, both directions; mutual authentication (CERT_REQUIRED on the
  server too); peers must chain to `[tls].ca`; with `[tls].crl` the leaf is
  checked against it (VERIFY_CRL_CHECK_LEAF); VERIFY_X509_STRICT.
* Python checks no client name and we dial by address, so hostname checking
  is off and *we* check identity after the handshake, on both sides:
  `identify()` maps the peer certificate to a configured peer (CN or DNS SAN,
  exact, case-insensitive) and checks `pin_sha256`.
* Under TLS 1.3 a client whose certificate the server rejects still finishes
  its handshake; it learns of the refusal on its first read. So a link counts
  as up only once the peer's hello has arrived (linkd.net.connection).
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..certs import cert_matches_name, cert_sha256
from ..config import Config, PeerConfig


class IdentityError(Exception):
    """The peer's certificate is valid but not acceptable for this link."""


def _context(cfg: Config, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
    ctx.load_verify_locations(cafile=str(cfg.tls.ca))
    flags = ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_TRUSTED_FIRST
    if cfg.tls.crl is not None:
        ctx.load_verify_locations(cafile=str(cfg.tls.crl))
        flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_flags = flags
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


@dataclass
class TLSContexts:
    server: ssl.SSLContext
    client: ssl.SSLContext


def make_contexts(cfg: Config) -> TLSContexts:
    return TLSContexts(server=_context(cfg, True), client=_context(cfg, False))


@dataclass(frozen=True)
class PeerIdentity:
    peer: PeerConfig
    subject: str
    not_after: dt.datetime
    sha256: str


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def identify(der: bytes | None, candidates: list[PeerConfig]) -> PeerIdentity:
    """The configured peer that `der` names, or IdentityError with the reason."""
    if not der:
        raise IdentityError("peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    digest = cert_sha256(der)
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


def describe_ssl_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc}"
