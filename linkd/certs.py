"""Certificates and spool folders as `linkd --check` and the daemon see them.

No trio, no sockets: plain functions over files, pyOpenSSL and cryptography.

- `check_identity` and `check_spool` return problems, each one line that names
  the file (and its config key) and says the fix. An empty list means "fine".
- `cert_names`, `cert_matches_name` and `cert_sha256` are what the TLS layer
  uses to check who the peer is (CN or DNS SAN, exact and ASCII
  case-insensitive; no wildcards) and its pin.
- `load_crl` / `is_revoked` read the CRL at `[tls].crl` and fail closed: a
  CRL that cannot be read, is not signed by a CA in `[tls].ca`, has expired,
  or does not cover the certificate's issuer raises ConfigError.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
import string
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from .config import Config
from .errors import ConfigError

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_SUN_PATH_MAX = 107          # sizeof(sockaddr_un.sun_path) - 1 on Linux

# OpenSSL verify error codes (X509_V_ERR_*) that mean "not issued by this CA".
_NOT_FROM_CA = {2, 7, 18, 19, 20, 21, 30, 31}
_TIME_ERRORS = {9, 10}       # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
_REVOKED = 23


def _show(path: object) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


def _day(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now.replace(tzinfo=dt.UTC) if now.tzinfo is None else now


# --------------------------------------------------------------------------
# Names and digests (used by the TLS layer on the peer's certificate)
# --------------------------------------------------------------------------

def cert_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(common names, DNS subject alternative names) of `cert`."""
    cns = [v if isinstance(v, str) else v.decode("utf-8", "replace")
           for v in (a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    except (x509.ExtensionNotFound, ValueError):
        dns = []
    return cns, dns


def cert_matches_name(cert: x509.Certificate, name: str) -> bool:
    """True when `name` equals the CN or a DNS SAN of `cert`, ignoring ASCII case."""
    if not name:
        return False
    wanted = name.translate(_ASCII_LOWER)
    cns, dns = cert_names(cert)
    return any(n.translate(_ASCII_LOWER) == wanted for n in (*cns, *dns))


def cert_sha256(der: bytes) -> str:
    """Lowercase hex SHA-256 of a DER certificate (the form `pin_sha256` is normalised to)."""
    return hashlib.sha256(der).hexdigest()


# --------------------------------------------------------------------------
# Revocation
# --------------------------------------------------------------------------

def _read_for(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{_show(path)} ({key}): cannot be read ({exc.strerror}): "
                          f"fix {key} or the file's permissions") from None


def load_crl(crl_path: Path, ca_path: Path,
             now: dt.datetime | None = None) -> x509.CertificateRevocationList:
    """The CRL at `crl_path` (PEM or DER), checked to be signed by a CA in `ca_path`
    and not expired; ConfigError (one line) otherwise."""
    shown = _show(crl_path)
    data = _read_for(crl_path, "tls.crl")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
    except ValueError:
        raise ConfigError(f"{shown} (tls.crl): not a CRL in PEM or DER form: "
                          "point tls.crl at the CRL your CA publishes") from None
    try:
        cas = x509.load_pem_x509_certificates(_read_for(ca_path, "tls.ca"))
    except ValueError:
        raise ConfigError(f"{_show(ca_path)} (tls.ca): no PEM certificate could be read: "
                          "it must hold PEM CA certificates") from None
    if not any(ca.subject == crl.issuer and _signed_by(crl, ca.public_key()) for ca in cas):
        raise ConfigError(f"{shown} (tls.crl): is not signed by a CA in {_show(ca_path)}: "
                          "use the CRL published by that CA")
    expires = crl.next_update_utc
    if expires is not None and _utc(now) > expires:
        raise ConfigError(f"{shown} (tls.crl): CRL expired on {_day(expires)}: "
                          "publish a fresh CRL from the CA")
    return crl


def _signed_by(crl: x509.CertificateRevocationList, key: PublicKeyTypes) -> bool:
    try:
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def is_revoked(cert_der: bytes, crl_path: Path, ca_path: Path,
               now: dt.datetime | None = None) -> bool:
    """Whether the DER certificate is listed in the CRL (verified with `load_crl`).

    Fails closed: raises ConfigError when the CRL is unusable or was issued by
    another CA than the certificate's issuer."""
    crl = load_crl(crl_path, ca_path, now)
    cert = x509.load_der_x509_certificate(cert_der)
    if cert.issuer != crl.issuer:
        raise ConfigError(f"{_show(crl_path)} (tls.crl): the CRL is for "
                          f"{crl.issuer.rfc4514_string()}, not for the certificate's issuer "
                          f"{cert.issuer.rfc4514_string()}: use that issuer's CRL")
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


# --------------------------------------------------------------------------
# check_identity: our own certificate, key, CA and CRL
# --------------------------------------------------------------------------

def _read(path: Path, key: str, what: str, conf: str, problems: list[str]) -> bytes | None:
    shown = _show(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{shown} ({key}): {what} file does not exist: "
                        f"create it or fix {key} in {conf}")
    except IsADirectoryError:
        problems.append(f"{shown} ({key}): is a folder, not a {what} file: "
                        f"point {key} in {conf} at the file")
    except PermissionError:
        problems.append(f"{shown} ({key}): {what} file cannot be read (permission denied): "
                        "make it readable by the user linkd runs as")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        problems.append(f"{shown} ({key}): {what} file cannot be read ({reason}): "
                        f"fix {key} in {conf}")
    return None


def _certs(data: bytes | None, path: Path, key: str,
           problems: list[str]) -> list[x509.Certificate]:
    if data is None:
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        problems.append(f"{_show(path)} ({key}): no PEM certificate could be read: it must "
                        "hold PEM certificates (-----BEGIN CERTIFICATE-----)")
        return []


def _private_key(data: bytes | None, path: Path, problems: list[str]) -> PrivateKeyTypes | None:
    if data is None:
        return None
    shown = _show(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        problems.append(f"{shown} (tls.key): private key is encrypted: linkd needs it "
                        f"unencrypted (openssl pkey -in {shown} -out NEW.key)")
    except (ValueError, UnsupportedAlgorithm):
        problems.append(f"{shown} (tls.key): no PEM private key could be read: it must hold "
                        "an unencrypted PEM key (-----BEGIN PRIVATE KEY-----)")
    return None


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _chain_problem(cfg: Config, own: x509.Certificate, chain: list[x509.Certificate],
                   cas: list[x509.Certificate], crl: x509.CertificateRevocationList | None,
                   now: dt.datetime) -> str | None:
    store = crypto.X509Store()
    for anchor in cas:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    store.set_time(now.astimezone(dt.UTC))
    flags = crypto.X509StoreFlags.X509_STRICT      # as the TLS layer verifies (net/tls.py)
    if crl is not None and crl.issuer == own.issuer:
        store.add_crl(crl)
        flags |= crypto.X509StoreFlags.CRL_CHECK
    store.set_flags(flags)
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(own),
                                      [crypto.X509.from_cryptography(c) for c in chain])
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as exc:
        code, depth, message = exc.errors[0], exc.errors[1], str(exc.errors[2])
    else:
        return None
    shown, ca = _show(cfg.tls.cert), _show(cfg.tls.ca)
    if code in _TIME_ERRORS and depth == 0:
        return None          # reported by the validity check, with dates
    if code in _NOT_FROM_CA:
        return (f"{shown} (tls.cert): certificate is not issued by the CA in {ca} ({message}): "
                "use a certificate from that CA (with any intermediates after it in the "
                "same file) or point tls.ca at the CA that issued it")
    if code == _REVOKED:
        return (f"{shown} (tls.cert): certificate is revoked in {_show(cfg.tls.crl)}: "
                "issue a new certificate for this node")
    return (f"{shown} (tls.cert): certificate does not verify against {ca} "
            f"({message}, at chain depth {depth}): fix the certificate chain or tls.ca")


def check_identity(cfg: Config, now: dt.datetime | None = None) -> list[str]:
    """Problems with our own certificate, key, CA and CRL, one line each."""
    when = _utc(now)
    tls, conf = cfg.tls, cfg.path.name
    problems: list[str] = []
    cert_pem = _read(tls.cert, "tls.cert", "certificate", conf, problems)
    key_pem = _read(tls.key, "tls.key", "private key", conf, problems)
    ca_pem = _read(tls.ca, "tls.ca", "CA certificate", conf, problems)
    crl_pem = _read(tls.crl, "tls.crl", "CRL", conf, problems) if tls.crl else None
    if key_pem is not None:
        try:
            mode = stat.S_IMODE(os.stat(tls.key).st_mode)
        except OSError:
            mode = 0
        if mode & 0o077:
            problems.append(f"{_show(tls.key)} (tls.key): private key is readable by "
                            f"group/others (mode {mode:04o}): chmod 600 {_show(tls.key)}")
    with warnings.catch_warnings():   # odd certificates must not print warnings
        warnings.simplefilter("ignore")
        certs = _certs(cert_pem, tls.cert, "tls.cert", problems)
        key = _private_key(key_pem, tls.key, problems)
        cas = _certs(ca_pem, tls.ca, "tls.ca", problems)
        crl = None
        if tls.crl is not None and crl_pem is not None and cas:
            try:
                crl = load_crl(tls.crl, tls.ca, when)
            except ConfigError as exc:
                problems.append(str(exc))
            else:
                if b"-----BEGIN X509 CRL-----" not in crl_pem:   # the TLS layer loads PEM
                    shown = _show(tls.crl)
                    problems.append(f"{shown} (tls.crl): CRL is in DER form, linkd needs PEM: "
                                    f"openssl crl -inform DER -in {shown} -out {shown}.pem")
        if not certs:
            return problems
        own, cert = certs[0], _show(tls.cert)
        if key is not None and _spki(key.public_key()) != _spki(own.public_key()):
            problems.append(f"{_show(tls.key)} (tls.key): private key does not match the "
                            f"certificate {cert} (tls.cert): point tls.key at the key "
                            f"{tls.cert.name} was issued for, or tls.cert at its certificate")
        start, end = own.not_valid_before_utc, own.not_valid_after_utc
        if when < start:
            problems.append(f"{cert} (tls.cert): certificate is not valid yet (valid from "
                            f"{_day(start)} to {_day(end)}): check this machine's clock or "
                            "use a certificate that is valid now")
        elif when > end:
            problems.append(f"{cert} (tls.cert): certificate expired on {_day(end)}: issue a "
                            f"new one (e.g. linkctl pki issue DIR {cfg.node.name} --force)")
        if cas:
            chain = _chain_problem(cfg, own, certs[1:], cas, crl, when)
            if chain:
                problems.append(chain)
        if not cert_matches_name(own, cfg.node.name):
            cns, dns = cert_names(own)
            problems.append(f"{cert} (tls.cert): certificate does not name this node "
                            f"{cfg.node.name} (CN: {', '.join(map(_show, cns)) or 'none'}; "
                            f"DNS names: {', '.join(map(_show, dns)) or 'none'}): set "
                            f"node.name to the certificate's name or issue one for "
                            f"{cfg.node.name}")
    return problems


# --------------------------------------------------------------------------
# check_spool: folders the daemon writes to
# --------------------------------------------------------------------------

def _nearest(path: Path) -> tuple[Path, os.stat_result] | str:
    """The nearest existing folder at or above `path` with its stat, or an error."""
    for candidate in (path, *path.parents):
        try:
            return candidate, os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            return f"{_show(candidate)} cannot be inspected ({exc.strerror})"
    return f"no part of {_show(path)} exists"


def _dir_problem(path: Path, key: str, mode: str) -> str | None:
    found = _nearest(path)
    shown = _show(path)
    if isinstance(found, str):
        return f"{shown} ({key}): {found}: fix {key} or the permissions above it"
    where, st = found
    if not stat.S_ISDIR(st.st_mode):
        if where == path:
            return f"{shown} ({key}): exists but is not a folder: remove it or fix {key}"
        return f"{shown} ({key}): cannot be created: {_show(where)} is not a folder: fix {key}"
    if not os.access(where, os.R_OK | os.W_OK | os.X_OK):
        if where == path:
            return (f"{shown} ({key}): folder is not writable by this user (uid {os.getuid()}): "
                    "chown it to the user linkd runs as")
        return (f"{shown} ({key}): does not exist and cannot be created, {_show(where)} is not "
                f"writable by this user (uid {os.getuid()}): create it "
                f"(install -d -m {mode} {shown}) for the user linkd runs as")
    return None


def check_spool(cfg: Config) -> list[str]:
    """Problems with spool_dir, state_dir and the status socket's folder, one line each."""
    node = cfg.node
    problems = [p for p in (_dir_problem(node.spool_dir, "node.spool_dir", "0750"),
                            _dir_problem(node.state_dir, "node.state_dir", "0700")) if p]
    # (state_dir may be on another file system: since CONTRACT revision 2 a claim
    # renames a file from out/ into the spool's own queue/, never into state_dir)
    sock = node.status_socket
    shown = _show(sock)
    size = len(os.fsencode(sock))
    if size > _SUN_PATH_MAX:
        problems.append(f"{shown} (node.status_socket): path is {size} bytes, longer than the "
                        f"{_SUN_PATH_MAX} a UNIX socket allows: choose a shorter path")
    parent = sock.parent
    if parent not in (node.state_dir, node.spool_dir):    # those two are checked above
        # linkd creates a missing folder itself (0700): a problem only if it cannot
        problem = _dir_problem(parent, "node.status_socket", "0750")
        if problem:
            problems.append(problem)
    try:
        st = os.lstat(sock)
    except OSError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            problems.append(f"{shown} (node.status_socket): exists and is not a socket: "
                            "remove it or choose another path")
    return problems
