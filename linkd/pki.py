"""A private link CA for demos, tests and small sites (`linkctl pki init|issue`).

Layout (CONTRACT §10): DIR/ca.crt, DIR/ca.key, DIR/NAME.crt, DIR/NAME.key.
Keys are EC P-256 in unencrypted PKCS#8 PEM, created 0600 from the first byte
(O_CREAT|O_EXCL with mode 0600, never chmod'ed down after being written).
Certificates carry SKI and AKI, which OpenSSL's strict verification needs.

Nothing is overwritten by accident: `init_ca` refuses when either CA file
exists; `issue` refuses when either NAME file exists unless `force`, and then
replaces each file by an atomic rename of a complete new one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import PKIError

CA_DAYS = 3650
LEAF_DAYS = 825
BACKDATE = dt.timedelta(minutes=5)      # tolerate clocks a little behind ours
KEY_MODE = 0o600
CERT_MODE = 0o644
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _show(path: object) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, signature: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=signature, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                         decipher_only=False)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (which must not exist) with exactly `mode`, write, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    try:
        os.fchmod(fd, mode)     # exact despite the umask; never wider than `mode`
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _write(path: Path, data: bytes, mode: int, replace: bool) -> None:
    if not replace:
        try:
            _write_new(path, data, mode)
        except FileExistsError:
            raise PKIError(f"{_show(path)} already exists: refusing to overwrite it") from None
        return
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    _write_new(temp, data, mode)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_pair(crt: Path, key: Path, cert: x509.Certificate,
               private: ec.EllipticCurvePrivateKey, replace: bool) -> None:
    """Write the key, then the certificate; undo the new key if the certificate fails."""
    _write(key, _key_pem(private), KEY_MODE, replace)
    try:
        _write(crt, _cert_pem(cert), CERT_MODE, replace)
    except BaseException:
        if not replace:
            key.unlink(missing_ok=True)
        raise
    _fsync_dir(crt.parent)


def _ca_common_name(directory: Path) -> str:
    folder = directory.absolute().name
    if _NAME_RE.fullmatch(folder) and len(folder) <= 56:
        return f"{folder} link CA"
    return "linkd link CA"


def init_ca(directory: Path) -> None:
    """Write DIR/ca.crt and DIR/ca.key: a new link CA valid for 10 years.

    Creates DIR (0700) when missing; PKIError when either file already exists.
    """
    directory = Path(directory)
    crt, key = directory / "ca.crt", directory / "ca.key"
    for existing in (key, crt):
        if os.path.lexists(existing):
            raise PKIError(f"{_show(existing)} already exists: refusing to overwrite an "
                           "existing CA (use another folder, or remove the old CA first)")
    if not directory.is_dir():
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
        directory.chmod(0o700)      # exact despite the umask; it was never wider
    private = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _ca_common_name(directory))])
    ski = x509.SubjectKeyIdentifier.from_public_key(private.public_key())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(private, hashes.SHA256()))
    _save_pair(crt, key, cert, private, replace=False)


def _load_ca(directory: Path) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    crt, key = directory / "ca.crt", directory / "ca.key"
    try:
        cert_pem, key_pem = crt.read_bytes(), key.read_bytes()
    except FileNotFoundError as exc:
        raise PKIError(f"{_show(exc.filename)} does not exist: run `linkctl pki init "
                       f"{_show(directory)}` first") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PKIError(f"{_show(crt)}: not a PEM certificate: restore the CA certificate "
                       "made by `linkctl pki init`") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (TypeError, ValueError):
        raise PKIError(f"{_show(key)}: not an unencrypted PEM private key: restore the CA "
                       "key made by `linkctl pki init`") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                      | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
                      | dsa.DSAPrivateKey):
        raise PKIError(f"{_show(key)}: this kind of key cannot sign certificates: "
                       "use the key made by `linkctl pki init`")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.DER, spki)
            != cert.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise PKIError(f"{_show(key)} does not match {_show(crt)}: keep the CA's key and "
                       "certificate together")
    return cert, private


def issue(directory: Path, name: str, force: bool = False,
          days: int | None = None) -> tuple[Path, Path]:
    """Write DIR/NAME.crt and DIR/NAME.key, issued by the CA in DIR; return both paths.

    The certificate has CN = NAME and DNS SAN NAME, serverAuth and clientAuth,
    and is valid `days` (default 825; never beyond the CA) from 5 minutes ago.
    """
    if days is not None and days < 1:
        raise PKIError(f"--days {days}: a certificate must be valid at least 1 day")
    directory = Path(directory)
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise PKIError(f"{name!r} is not a valid node name: use 1-64 of A-Z a-z 0-9 _ . -")
    if name.casefold() == "ca":
        raise PKIError(f"{name!r} would overwrite the CA's own ca.crt and ca.key: "
                       "choose another node name")
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    if not force:
        for existing in (key, crt):
            if os.path.lexists(existing):
                raise PKIError(f"{_show(existing)} already exists: refusing to overwrite it "
                               "(add --force to replace it)")
    ca_cert, ca_key = _load_ca(directory)
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days or LEAF_DAYS), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise PKIError(f"{_show(directory / 'ca.crt')} expired on {not_after:%Y-%m-%d}: "
                       "make a new CA with `linkctl pki init` in another folder")
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    private = _new_key()
    algorithm = None if isinstance(ca_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) \
        else hashes.SHA256()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()),
                           critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, algorithm))
    _save_pair(crt, key, cert, private, replace=force)
    return crt, key


# --------------------------------------------------------------------------- revocation
#
# DIR/revoked.json  {"crl_number": N, "revoked": [{"name", "serial", "revoked_at"}]}
# DIR/ca.crl        PEM CRL signed by the CA, with AKI and CRL number (which strict
#                   OpenSSL verification needs), rewritten by revoke and crl.

CRL_DAYS = 30
REVOKED_FILE = "revoked.json"


def _revocations(directory: Path) -> dict[str, Any]:
    try:
        doc = json.loads((directory / REVOKED_FILE).read_text())
    except FileNotFoundError:
        return {"crl_number": 0, "revoked": []}
    except ValueError:
        raise PKIError(f"{_show(directory / REVOKED_FILE)}: not a linkd revocation list: "
                       "restore it from a backup") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("revoked"), list):
        raise PKIError(f"{_show(directory / REVOKED_FILE)}: not a linkd revocation list: "
                       "restore it from a backup")
    return doc


def revoke(directory: Path, name: str, days: int | None = None) -> tuple[int, Path]:
    """Revoke DIR/NAME.crt (its serial number) and rewrite DIR/ca.crl; (serial, crl path)."""
    directory = Path(directory)
    crt = directory / f"{name}.crt"
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{_show(crt)} does not exist: name a node issued in "
                       f"{_show(directory)}") from None
    except ValueError:
        raise PKIError(f"{_show(crt)}: not a PEM certificate") from None
    ca_cert, _ = _load_ca(directory)
    if cert.issuer != ca_cert.subject:
        raise PKIError(f"{_show(crt)} was not issued by the CA in {_show(directory)}")
    doc = _revocations(directory)
    serial = cert.serial_number
    if not any(int(r.get("serial", -1)) == serial for r in doc["revoked"]):
        doc["revoked"].append({"name": name, "serial": serial,
                               "revoked_at": dt.datetime.now(dt.UTC).isoformat(
                                   timespec="seconds")})
    _write(directory / REVOKED_FILE, (json.dumps(doc, indent=1) + "\n").encode(),
           CERT_MODE, replace=True)
    return serial, write_crl(directory, days)


def write_crl(directory: Path, days: int | None = None) -> Path:
    """Sign a fresh CRL of everything revoked so far into DIR/ca.crl (next update in
    `days`, default 30); the CRL number grows by one each time."""
    directory = Path(directory)
    if days is not None and days < 1:
        raise PKIError(f"--days {days}: a CRL must be valid at least 1 day")
    ca_cert, ca_key = _load_ca(directory)
    doc = _revocations(directory)
    number = int(doc.get("crl_number", 0)) + 1
    now = dt.datetime.now(dt.UTC)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - BACKDATE)
               .next_update(now + dt.timedelta(days=days or CRL_DAYS))
               .add_extension(aki, critical=False)
               .add_extension(x509.CRLNumber(number), critical=False))
    for r in doc["revoked"]:
        when = dt.datetime.fromisoformat(str(r.get("revoked_at")))
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(r["serial"]))
            .revocation_date(when).build())
    algorithm = None if isinstance(ca_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) \
        else hashes.SHA256()
    crl = builder.sign(ca_key, algorithm)
    path = directory / "ca.crl"
    _write(path, crl.public_bytes(serialization.Encoding.PEM), CERT_MODE, replace=True)
    doc["crl_number"] = number
    _write(directory / REVOKED_FILE, (json.dumps(doc, indent=1) + "\n").encode(),
           CERT_MODE, replace=True)
    return path
