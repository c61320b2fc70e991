"""Signing with the node's own TLS key; verifying with a certificate.

Algorithms follow the key in the certificate, as issued:
  * EC (any curve):  ECDSA over SHA-256, DER-encoded signature ("ecdsa-sha256");
  * RSA:             RSASSA-PSS, SHA-256, MGF1-SHA-256, salt length 32 ("rsa-pss-sha256");
  * Ed25519/Ed448:   pure EdDSA ("ed25519", "ed448").
A certificate is named by the lowercase hex SHA-256 of its DER encoding (the same
fingerprint as `pin_sha256` and `openssl x509 -fingerprint -sha256`).
`CertStore` keeps every certificate that ever signed or was relied on under
`<state_dir>/certs/<sha256>.pem`, so that evidence stays verifiable after a
renewal.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from ..errors import KeyError_ as KeyError_  # re-exported
from ..spool.fs import DEFAULT_FS, write_atomic

PSS_SALT = 32




def cert_sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def load_certs(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM (or a single DER) file; raises KeyError_ with a
    readable reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyError_(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise KeyError_(f"{path} holds no readable X.509 certificate") from None
    if not certs:
        raise KeyError_(f"{path} holds no certificate")
    return certs


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def algorithm(public_key: Any) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ecdsa-sha256"
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa-pss-sha256"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "ed448"
    raise KeyError_(f"unsupported key type {type(public_key).__name__} for signing evidence")


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT)


class Signer:
    """The node's key and certificate, as used for TLS."""

    def __init__(self, cert: x509.Certificate, key: Any) -> None:
        self.cert = cert
        self.key = key
        self.cert_der = der(cert)
        self.cert_sha256 = cert_sha256(self.cert_der)
        self.alg = algorithm(cert.public_key())

    @classmethod
    def from_files(cls, cert_path: Path, key_path: Path) -> Signer:
        cert = load_certs(cert_path)[0]
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
        except (OSError, ValueError, TypeError) as exc:
            raise KeyError_(f"cannot load the key {key_path}: {exc}") from None
        return cls(cert, key)

    def sign(self, data: bytes) -> bytes:
        key = self.key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, _pss(), hashes.SHA256())
        if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
            return key.sign(data)
        raise KeyError_(f"unsupported key type {type(key).__name__} for signing evidence")


def verify(cert: x509.Certificate, data: bytes, signature: bytes) -> bool:
    """True if `signature` over `data` verifies with the certificate's key."""
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, _pss(), hashes.SHA256())
        elif isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _valid_at(cert: x509.Certificate, at: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def chain_problem(leaf: x509.Certificate, extra: list[x509.Certificate],
                  anchors: list[x509.Certificate], at: dt.datetime) -> str | None:
    """None if `leaf` chains (through `extra`, if needed) to one of `anchors` and
    every certificate on the way was valid at `at`; else what is wrong."""
    who = leaf.subject.rfc4514_string()
    current = leaf
    pool = list(extra)
    for _depth in range(8):
        if not _valid_at(current, at):
            when = at.strftime("%Y-%m-%dT%H:%M:%SZ")
            return (f"certificate {current.subject.rfc4514_string()} was not valid at {when} "
                    f"(valid {current.not_valid_before_utc:%Y-%m-%d} to "
                    f"{current.not_valid_after_utc:%Y-%m-%d})")
        for anchor in anchors:
            if _issued_by(current, anchor):
                if not _valid_at(anchor, at):
                    return f"the CA {anchor.subject.rfc4514_string()} was not valid then"
                return None
        parent = next((c for c in pool if _issued_by(current, c)), None)
        if parent is None:
            return f"certificate {who} does not chain to the given CA"
        pool.remove(parent)
        current = parent
    return f"certificate {who}: chain too long"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class CertStore:
    """`<state_dir>/certs/<sha256>.pem`: every certificate that signed evidence."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def keep(self, cert_der: bytes) -> Path:
        """Store the certificate (once; durably) and return its path."""
        name = cert_sha256(cert_der)
        path = self.folder / f"{name}.pem"
        if path.exists():
            return path
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"     # one process's own temporary
        write_atomic(DEFAULT_FS, path, pem, 0o644, tmp=tmp)
        return path

    def find(self, sha256: str) -> x509.Certificate | None:
        path = self.folder / f"{sha256.lower()}.pem"
        try:
            return load_certs(path)[0]
        except KeyError_:
            return None
