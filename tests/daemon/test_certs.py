"""check_identity, check_spool, peer-name helpers, CRLs, and `linkd --check` (run_check)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fsmodes import modes_are_enforced

from linkd import pki
from linkd.certs import (
    cert_matches_name,
    cert_names,
    cert_sha256,
    check_identity,
    check_spool,
    is_revoked,
    load_crl,
)
from linkd.check import run_check, startup_problems
from linkd.config import Config, LinkConfig, NodeConfig, TLSConfig
from linkd.errors import ConfigError

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


class CA:
    """A link CA made by linkd.pki, plus makers of odd certificates signed by it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        pki.init_ca(directory)
        self.cert_path = directory / "ca.crt"
        self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key

    def issue(self, name: str) -> tuple[Path, Path]:
        return pki.issue(self.dir, name)

    def custom(self, label: str, *, cn: str | None, dns: list[str],
               not_before: dt.datetime = NOW - DAY,
               not_after: dt.datetime = NOW + 30 * DAY, aki: bool = True) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after))
        if aki:
            builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        out = self.dir / "custom"
        out.mkdir(exist_ok=True)
        crt, key_path = out / f"{label}.crt", out / f"{label}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return crt, key_path

    def crl(self, path: Path, revoke: list[Path], *, next_update: dt.datetime = NOW + DAY,
            pem: bool = True) -> Path:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(NOW - DAY).next_update(next_update)
                   .add_extension(x509.CRLNumber(1), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        for cert_path in revoke:
            serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(NOW - DAY).build())
        crl = builder.sign(self.key, hashes.SHA256())
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM if pem
                                          else serialization.Encoding.DER))
        return path


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "pki")


@pytest.fixture
def rogue(tmp_path: Path) -> CA:
    return CA(tmp_path / "rogue")


def config(tmp_path: Path, cert: Path, key: Path, ca: Path, crl: Path | None = None,
           name: str = "alpha") -> Config:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    state = spool / ".linkd"
    return Config(path=tmp_path / "linkd.toml",
                  node=NodeConfig(name, spool, state, state / "status.sock"),
                  tls=TLSConfig(cert, key, ca, crl), listen=None, link=LinkConfig(),
                  peers=())


@pytest.fixture
def alpha(tmp_path: Path, ca: CA) -> Config:
    crt, key = ca.issue("alpha")
    return config(tmp_path, crt, key, ca.cert_path)


def one_problem(problems: list[str], *mentions: str) -> str:
    assert len(problems) == 1, problems
    for mention in mentions:
        assert mention in problems[0], problems[0]
    assert "\n" not in problems[0]
    return problems[0]


# ---------------------------------------------------------------------------
# check_identity
# ---------------------------------------------------------------------------

def test_a_good_identity_has_no_problems(alpha: Config) -> None:
    assert check_identity(alpha) == []
    assert startup_problems(alpha) == []


def test_node_name_matches_ignoring_ascii_case(tmp_path: Path, ca: CA) -> None:
    crt, key = ca.issue("Alpha")
    assert check_identity(config(tmp_path, crt, key, ca.cert_path, name="aLPHA")) == []


def test_key_that_does_not_match_names_both_files(tmp_path: Path, ca: CA) -> None:
    crt, _ = ca.issue("alpha")
    _, other_key = ca.issue("bravo")
    one_problem(check_identity(config(tmp_path, crt, other_key, ca.cert_path)),
                str(crt), str(other_key), "match", "tls.key")


@pytest.mark.parametrize("which", ["cert", "key", "ca", "crl"])
def test_missing_files_are_named(tmp_path: Path, alpha: Config, which: str) -> None:
    missing = tmp_path / f"missing-{which}.pem"
    tls = alpha.tls
    paths: dict[str, Path | None] = {"cert": tls.cert, "key": tls.key, "ca": tls.ca,
                                     "crl": None, which: missing}
    cert, key, ca = paths["cert"], paths["key"], paths["ca"]
    assert cert is not None and key is not None and ca is not None
    cfg = config(tmp_path, cert, key, ca, paths["crl"])
    problems = check_identity(cfg)
    assert any(str(missing) in p and f"tls.{which}" in p and "does not exist" in p
               for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_a_folder_instead_of_a_file(tmp_path: Path, alpha: Config) -> None:
    cfg = config(tmp_path, tmp_path, alpha.tls.key, alpha.tls.ca)
    one_problem(check_identity(cfg), str(tmp_path), "folder")


def test_unreadable_certificate(tmp_path: Path, alpha: Config) -> None:
    if not modes_are_enforced(tmp_path):
        pytest.skip("file modes do not bind us (root)")
    alpha.tls.cert.chmod(0)
    one_problem(check_identity(alpha), str(alpha.tls.cert), "permission denied")


def test_garbage_pem_files(tmp_path: Path, alpha: Config) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    one_problem(check_identity(config(tmp_path, junk, alpha.tls.key, alpha.tls.ca)),
                str(junk), "tls.cert", "PEM")
    one_problem(check_identity(config(tmp_path, alpha.tls.cert, alpha.tls.key, junk)),
                str(junk), "tls.ca", "PEM")
    junk.chmod(0o600)
    one_problem(check_identity(config(tmp_path, alpha.tls.cert, junk, alpha.tls.ca)),
                str(junk), "tls.key", "private key")


def test_encrypted_key(tmp_path: Path, alpha: Config) -> None:
    key = serialization.load_pem_private_key(alpha.tls.key.read_bytes(), None)
    alpha.tls.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    one_problem(check_identity(alpha), str(alpha.tls.key), "encrypted")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_open_to_group_or_others(alpha: Config, mode: int) -> None:
    alpha.tls.key.chmod(mode)
    one_problem(check_identity(alpha), str(alpha.tls.key), f"mode {mode:04o}",
                f"chmod 600 {alpha.tls.key}")


def test_key_mode_0400_is_fine(alpha: Config) -> None:
    alpha.tls.key.chmod(0o400)
    assert check_identity(alpha) == []


def test_expired_certificate_is_one_problem_with_dates(tmp_path: Path, ca: CA) -> None:
    crt, key = ca.custom("old", cn="alpha", dns=["alpha"], not_before=NOW - 400 * DAY,
                         not_after=NOW - 30 * DAY)
    message = one_problem(check_identity(config(tmp_path, crt, key, ca.cert_path)),
                          str(crt), "certificate", "expired")
    assert (NOW - 30 * DAY).strftime("%Y-%m-%d") in message


def test_not_yet_valid_certificate(tmp_path: Path, ca: CA) -> None:
    crt, key = ca.custom("future", cn="alpha", dns=["alpha"], not_before=NOW + 365 * DAY,
                         not_after=NOW + 730 * DAY)
    message = one_problem(check_identity(config(tmp_path, crt, key, ca.cert_path)),
                          str(crt), "not valid yet")
    assert (NOW + 365 * DAY).strftime("%Y-%m-%d") in message


def test_now_is_taken_from_the_caller(alpha: Config) -> None:
    cert = x509.load_pem_x509_certificate(alpha.tls.cert.read_bytes())
    later = cert.not_valid_after_utc + DAY
    one_problem(check_identity(alpha, now=later), str(alpha.tls.cert), "expired")
    one_problem(check_identity(alpha, now=later.replace(tzinfo=None)), "expired")
    assert check_identity(alpha, now=cert.not_valid_before_utc + DAY) == []


def test_certificate_from_another_ca(tmp_path: Path, ca: CA, rogue: CA) -> None:
    crt, key = rogue.issue("alpha")
    one_problem(check_identity(config(tmp_path, crt, key, ca.cert_path)),
                str(crt), "not issued by the CA", str(ca.cert_path))


def test_ca_file_may_hold_several_anchors(tmp_path: Path, ca: CA, rogue: CA) -> None:
    crt, key = rogue.issue("alpha")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(ca.cert_path.read_bytes() + rogue.cert_path.read_bytes())
    assert check_identity(config(tmp_path, crt, key, bundle)) == []


def test_verification_is_strict_like_the_tls_layer(tmp_path: Path, ca: CA) -> None:
    crt, key = ca.custom("no-aki", cn="alpha", dns=["alpha"], aki=False)
    one_problem(check_identity(config(tmp_path, crt, key, ca.cert_path)), str(crt),
                "does not verify", "Authority Key Identifier")


def test_certificate_that_does_not_name_the_node(tmp_path: Path, ca: CA) -> None:
    crt, key = ca.issue("bravo")
    message = one_problem(check_identity(config(tmp_path, crt, key, ca.cert_path)),
                          str(crt), "alpha", "does not name")
    assert "bravo" in message


def test_intermediates_after_the_own_certificate_are_used(tmp_path: Path) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("alpha")
    ca_file, key_file = tmp_path / "root.crt", tmp_path / "alpha.key"
    root.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    full, bare = tmp_path / "full.crt", tmp_path / "bare.crt"
    full.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.cert_chain_pems[0].write_to_path(str(bare))
    assert check_identity(config(tmp_path, full, key_file, ca_file)) == []
    one_problem(check_identity(config(tmp_path, bare, key_file, ca_file)), str(bare),
                "not issued by the CA", "intermediates")


def test_several_problems_are_each_one_line(tmp_path: Path, ca: CA, rogue: CA) -> None:
    crt, _ = rogue.issue("bravo")
    _, other_key = ca.issue("charlie")
    other_key.chmod(0o644)
    problems = check_identity(config(tmp_path, crt, other_key, ca.cert_path))
    assert len(problems) == 4, problems   # key mode, key mismatch, other CA, wrong name
    assert all("\n" not in p for p in problems)


# ---------------------------------------------------------------------------
# CRLs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pem", [True, False])
def test_is_revoked_reads_the_crl(tmp_path: Path, ca: CA, pem: bool) -> None:
    revoked, _ = ca.issue("bravo")
    good, _ = ca.issue("charlie")
    crl = ca.crl(tmp_path / "ca.crl", [revoked], pem=pem)

    def der(path: Path) -> bytes:
        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
            serialization.Encoding.DER)

    assert is_revoked(der(revoked), crl, ca.cert_path) is True
    assert is_revoked(der(good), crl, ca.cert_path) is False
    assert load_crl(crl, ca.cert_path).issuer == ca.cert.subject


def test_a_crl_not_signed_by_the_ca_is_refused(tmp_path: Path, ca: CA, rogue: CA) -> None:
    cert, _ = ca.issue("bravo")
    forged = rogue.crl(tmp_path / "forged.crl", [])   # same subject name, other key
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    with pytest.raises(ConfigError, match="not signed by a CA"):
        is_revoked(der, forged, ca.cert_path)


def test_an_expired_crl_is_refused(tmp_path: Path, ca: CA) -> None:
    crl = ca.crl(tmp_path / "old.crl", [], next_update=NOW - dt.timedelta(hours=1))
    with pytest.raises(ConfigError, match="expired"):
        load_crl(crl, ca.cert_path)
    assert load_crl(crl, ca.cert_path, now=NOW - dt.timedelta(hours=2)) is not None


def test_a_crl_of_another_issuer_does_not_pass_a_certificate(tmp_path: Path, ca: CA,
                                                            rogue: CA) -> None:
    crl = ca.crl(tmp_path / "ca.crl", [])
    cert, _ = CA(tmp_path / "third").issue("bravo")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(ca.cert_path.read_bytes() + (tmp_path / "third/ca.crt").read_bytes())
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    with pytest.raises(ConfigError, match="issuer"):
        is_revoked(der, crl, bundle)


def test_garbage_crl(tmp_path: Path, ca: CA) -> None:
    junk = tmp_path / "junk.crl"
    junk.write_bytes(b"\x30\x03junk")
    with pytest.raises(ConfigError, match="not a CRL"):
        load_crl(junk, ca.cert_path)


def test_check_identity_with_a_crl(tmp_path: Path, alpha: Config, ca: CA) -> None:
    crl = ca.crl(tmp_path / "ca.crl", [])
    assert check_identity(config(tmp_path, alpha.tls.cert, alpha.tls.key, ca.cert_path,
                                 crl)) == []
    revoked = ca.crl(tmp_path / "revoked.crl", [alpha.tls.cert])
    one_problem(check_identity(config(tmp_path, alpha.tls.cert, alpha.tls.key, ca.cert_path,
                                      revoked)), str(alpha.tls.cert), "revoked")
    der = ca.crl(tmp_path / "der.crl", [], pem=False)
    one_problem(check_identity(config(tmp_path, alpha.tls.cert, alpha.tls.key, ca.cert_path,
                                      der)), str(der), "DER", "PEM")
    stale = ca.crl(tmp_path / "stale.crl", [], next_update=NOW - DAY)
    one_problem(check_identity(config(tmp_path, alpha.tls.cert, alpha.tls.key, ca.cert_path,
                                      stale)), str(stale), "expired", "tls.crl")


# ---------------------------------------------------------------------------
# Names and digests
# ---------------------------------------------------------------------------

def _cert(tmp_path: Path, ca: CA, cn: str | None, dns: list[str]) -> x509.Certificate:
    crt, _ = ca.custom(f"c{len(list(tmp_path.rglob('*.crt')))}", cn=cn, dns=dns)
    return x509.load_pem_x509_certificate(crt.read_bytes())


def test_cert_names_and_matching(tmp_path: Path, ca: CA) -> None:
    both = _cert(tmp_path, ca, "alpha", ["alpha", "alpha.example", "*.wild.example"])
    assert cert_names(both) == (["alpha"], ["alpha", "alpha.example", "*.wild.example"])
    assert cert_matches_name(both, "ALPHA.example")
    assert not cert_matches_name(both, "x.wild.example")      # no wildcards
    assert not cert_matches_name(both, "alph")
    assert not cert_matches_name(both, "")
    cn_only = _cert(tmp_path, ca, "bravo", [])
    assert cert_names(cn_only) == (["bravo"], [])
    assert cert_matches_name(cn_only, "Bravo")
    san_only = _cert(tmp_path, ca, None, ["charlie"])
    assert cert_names(san_only) == ([], ["charlie"])
    assert cert_matches_name(san_only, "charlie")
    unicode_cn = _cert(tmp_path, ca, "\u00c4lpha", [])
    assert cert_matches_name(unicode_cn, "\u00c4LPHA")
    assert not cert_matches_name(unicode_cn, "\u00e4lpha")     # ASCII case only


def test_cert_sha256_is_the_digest_of_the_der(alpha: Config) -> None:
    der = x509.load_pem_x509_certificate(alpha.tls.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    assert cert_sha256(der) == hashlib.sha256(der).hexdigest()
    assert cert_sha256(der) == cert_sha256(der).lower() and len(cert_sha256(der)) == 64


# ---------------------------------------------------------------------------
# check_spool
# ---------------------------------------------------------------------------

def spool_config(tmp_path: Path, spool: Path, state: Path | None = None,
                 sock: Path | None = None) -> Config:
    state = state or spool / ".linkd"
    x = tmp_path / "x"
    return Config(path=tmp_path / "linkd.toml",
                  node=NodeConfig("alpha", spool, state, sock or state / "status.sock"),
                  tls=TLSConfig(x, x, x), listen=None, link=LinkConfig(), peers=())


def test_spool_that_does_not_exist_yet_is_fine(tmp_path: Path) -> None:
    assert check_spool(spool_config(tmp_path, tmp_path / "a" / "b" / "spool")) == []


def test_existing_spool_and_state_are_fine(tmp_path: Path) -> None:
    (tmp_path / "spool" / ".linkd").mkdir(parents=True)
    assert check_spool(spool_config(tmp_path, tmp_path / "spool")) == []


def test_spool_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "spool").write_text("")
    problems = check_spool(spool_config(tmp_path, tmp_path / "spool",
                                        state=tmp_path / "state"))
    one_problem(problems, "node.spool_dir", str(tmp_path / "spool"), "not a folder")


def test_state_dir_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    problems = check_spool(spool_config(tmp_path, tmp_path / "spool",
                                        state=tmp_path / "file" / "state",
                                        sock=tmp_path / "status.sock"))
    one_problem(problems, "node.state_dir", "cannot be created")


def test_spool_that_is_not_writable(tmp_path: Path) -> None:
    if not modes_are_enforced(tmp_path):
        pytest.skip("file modes do not bind us (root)")
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o500)
    problems = check_spool(spool_config(tmp_path, spool, state=tmp_path / "state"))
    one_problem(problems, "node.spool_dir", "not writable")


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    for base in ("/dev/shm", "/run", "/tmp"):
        try:
            if os.stat(base).st_dev != os.stat(tmp_path).st_dev and os.access(base, os.W_OK):
                folder = Path(tempfile.mkdtemp(dir=base))
                yield folder
                shutil.rmtree(folder, ignore_errors=True)
                return
        except OSError:
            continue
    pytest.skip("no writable folder on another filesystem")


def test_state_dir_on_another_filesystem_is_fine(tmp_path: Path,
                                                 other_filesystem: Path) -> None:
    # CONTRACT revision 2: a claim renames out/ -> the spool's queue/, so state_dir may
    # be elsewhere (an operator trial found --check still refusing it; the daemon ran)
    problems = check_spool(spool_config(tmp_path, tmp_path / "spool",
                                        state=other_filesystem / "state",
                                        sock=tmp_path / "status.sock"))
    assert problems == []


def test_a_status_socket_folder_linkd_can_create_is_fine(tmp_path: Path) -> None:
    # operator trial: --check said the socket's folder "does not exist" (exit 1) on a
    # fresh install that the daemon started fine, creating that folder itself
    problems = check_spool(spool_config(tmp_path, tmp_path / "site" / "spool",
                                        state=tmp_path / "site" / "state",
                                        sock=tmp_path / "site" / "status.sock"))
    assert problems == []


def test_socket_path_too_long(tmp_path: Path) -> None:
    sock = tmp_path / "spool" / ".linkd" / ("s" * 120)
    one_problem(check_spool(spool_config(tmp_path, tmp_path / "spool", sock=sock)),
                "node.status_socket", "bytes")


def test_socket_folder_outside_state_dir_must_be_creatable(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "linkd" / "s.sock"
    (tmp_path / "run").write_text("a file where a folder should be")
    one_problem(check_spool(spool_config(tmp_path, tmp_path / "spool", sock=sock)),
                "node.status_socket", str(tmp_path / "run" / "linkd"), "cannot be created")
    (tmp_path / "run").unlink()
    # missing, but linkd creates it (as the daemon does at start-up)
    assert check_spool(spool_config(tmp_path, tmp_path / "spool", sock=sock)) == []


def test_socket_folder_under_state_dir_may_be_made_later(tmp_path: Path) -> None:
    sock = tmp_path / "spool" / ".linkd" / "run" / "s.sock"
    assert check_spool(spool_config(tmp_path, tmp_path / "spool", sock=sock)) == []


def test_socket_path_taken_by_a_file(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    sock.write_text("")
    one_problem(check_spool(spool_config(tmp_path, tmp_path / "spool", sock=sock)),
                "node.status_socket", "not a socket")
    sock.unlink()
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(sock))
        assert check_spool(spool_config(tmp_path, tmp_path / "spool", sock=sock)) == []
    finally:
        listener.close()


# ---------------------------------------------------------------------------
# run_check (`linkd --check`)
# ---------------------------------------------------------------------------

def write_config(tmp_path: Path, cert: Path, key: Path, ca: Path) -> Path:
    path = tmp_path / "linkd.toml"
    path.write_text(f"""
[node]
name = "alpha"
spool_dir = "spool"

[tls]
cert = "{cert}"
key = "{key}"
ca = "{ca}"

[[peer]]
name = "bravo"
  [[peer.channel]]
  name = "alerts"
  [[peer.channel]]
  name = "data"
""")
    return path


def test_run_check_success_prints_one_line_on_stdout(tmp_path: Path, ca: CA,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    crt, key = ca.issue("alpha")
    path = write_config(tmp_path, crt, key, ca.cert_path)
    assert run_check(path) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: configuration OK (node alpha, 1 peer, 2 channels)\n"
    assert err == ""


def test_run_check_prints_each_problem_on_stderr(tmp_path: Path, ca: CA,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    crt, _ = ca.issue("alpha")
    _, key = ca.issue("bravo")
    key.chmod(0o644)
    assert run_check(write_config(tmp_path, crt, key, ca.cert_path)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2 and any("chmod 600" in ln for ln in lines) \
        and any("match" in ln for ln in lines), lines


@pytest.mark.parametrize("text", ["[node\n", "[node]\nnmae = 'x'\n", None])
def test_run_check_config_errors_are_one_line(tmp_path: Path, text: str | None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "linkd.toml"
    if text is not None:
        path.write_text(text)
    assert run_check(path) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and str(path) in err
