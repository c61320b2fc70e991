"""linkd.pki and `linkctl pki`: a link CA and node certificates that OpenSSL accepts strictly."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

from linkd.certs import cert_matches_name
from linkd.cli.pki_cmd import run_pki
from linkd.errors import PKIError
from linkd.pki import init_ca, issue


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(kind)


@pytest.fixture(params=[0o000, 0o277], ids=["umask000", "umask277"])
def umask(request: pytest.FixtureRequest) -> Iterator[None]:
    """The loosest umask (only the code can make keys private) and a strict one
    (the code must still give keys exactly 0600, certificates 0644)."""
    old = os.umask(request.param)
    yield
    os.umask(old)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    init_ca(directory)
    return directory


def test_init_ca_writes_a_ca_certificate_and_a_private_key(tmp_path: Path, umask: None) -> None:
    directory = tmp_path / "new" / "link-pki"
    init_ca(directory)
    assert sorted(os.listdir(directory)) == ["ca.crt", "ca.key"]
    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600
    assert mode(directory / "ca.crt") == 0o644
    cert = load_cert(directory / "ca.crt")
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value \
        == "link-pki link CA"
    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= life <= dt.timedelta(days=3651)
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_init_ca_keeps_the_mode_of_an_existing_folder(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    init_ca(tmp_path)
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "ca.key") == 0o600


@pytest.mark.parametrize("existing", ["ca.key", "ca.crt"])
def test_init_ca_refuses_to_overwrite_a_ca(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("precious")
    with pytest.raises(PKIError, match="refusing to overwrite an existing CA") as info:
        init_ca(tmp_path)
    assert str(tmp_path / existing) in str(info.value)
    assert (tmp_path / existing).read_text() == "precious"
    assert os.listdir(tmp_path) == [existing]


def test_issue_writes_a_node_certificate(ca_dir: Path, umask: None) -> None:
    before = dt.datetime.now(dt.UTC)
    crt, key = issue(ca_dir, "alpha")
    assert (crt, key) == (ca_dir / "alpha.crt", ca_dir / "alpha.key")
    assert mode(key) == 0o600 and mode(crt) == 0o644
    cert, ca = load_cert(crt), load_cert(ca_dir / "ca.crt")
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] \
        == ["alpha"]
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) \
        == ["alpha"]
    assert cert_matches_name(cert, "alpha")
    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert set(ext(cert, x509.ExtendedKeyUsage).value) == {ExtendedKeyUsageOID.SERVER_AUTH,
                                                           ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ext(cert, x509.SubjectKeyIdentifier).value \
        == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier \
        == ext(ca, x509.SubjectKeyIdentifier).value.digest
    assert cert.issuer == ca.subject
    start = cert.not_valid_before_utc
    assert before - dt.timedelta(minutes=5, seconds=2) <= start <= before - dt.timedelta(
        minutes=4, seconds=58)
    assert abs(cert.not_valid_after_utc - before - dt.timedelta(days=825)) \
        < dt.timedelta(seconds=2)
    key_obj = serialization.load_pem_private_key(key.read_bytes(), None)
    assert key_obj.public_key() == cert.public_key()


def test_serials_are_random_and_distinct(ca_dir: Path) -> None:
    serials = {load_cert(issue(ca_dir, name)[0]).serial_number for name in ("a", "b", "c")}
    assert len(serials) == 3 and all(s > 1 << 64 for s in serials)


def test_the_chain_verifies_with_pyopenssl_strictly(ca_dir: Path) -> None:
    crt, _ = issue(ca_dir, "alpha")
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(load_cert(ca_dir / "ca.crt")))
    store.set_flags(crypto.X509StoreFlags.X509_STRICT)
    leaf = crypto.X509.from_cryptography(load_cert(crt))
    crypto.X509StoreContext(store, leaf).verify_certificate()
    other = ca_dir / "other"
    init_ca(other)
    rogue_store = crypto.X509Store()
    rogue_store.add_cert(crypto.X509.from_cryptography(load_cert(other / "ca.crt")))
    with pytest.raises(crypto.X509StoreContextError):
        crypto.X509StoreContext(rogue_store, leaf).verify_certificate()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_the_chain_verifies_with_the_openssl_command(ca_dir: Path) -> None:
    crt, _ = issue(ca_dir, "alpha")
    result = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslclient",
                             "-CAfile", str(ca_dir / "ca.crt"), str(crt)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result


def test_two_nodes_complete_a_strict_mutual_tls13_handshake(ca_dir: Path) -> None:
    paths = {name: issue(ca_dir, name) for name in ("alpha", "bravo")}

    def context(side: int, name: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(side)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(*map(str, paths[name]))
        ctx.load_verify_locations(cafile=str(ca_dir / "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.check_hostname = False
        return ctx

    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = context(ssl.PROTOCOL_TLS_CLIENT, "alpha").wrap_bio(bios[0], bios[1])
    server = context(ssl.PROTOCOL_TLS_SERVER, "bravo").wrap_bio(bios[2], bios[3],
                                                                  server_side=True)
    done = {id(client): False, id(server): False}
    for _ in range(10):
        for conn, out, peer_in in ((client, bios[1], bios[2]), (server, bios[3], bios[0])):
            if not done[id(conn)]:
                try:
                    conn.do_handshake()
                    done[id(conn)] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            break
    assert all(done.values())
    server.write(b"hello")       # TLS 1.3: the client learns of any refusal on its first read
    bios[0].write(bios[3].read())
    assert client.read() == b"hello"
    assert client.version() == "TLSv1.3"
    peer = x509.load_der_x509_certificate(client.getpeercert(binary_form=True) or b"")
    assert cert_matches_name(peer, "bravo")


def test_issue_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    crt, key = issue(ca_dir, "alpha")
    before = crt.read_bytes(), key.read_bytes()
    with pytest.raises(PKIError, match="already exists.*--force") as info:
        issue(ca_dir, "alpha")
    assert str(key) in str(info.value)
    assert (crt.read_bytes(), key.read_bytes()) == before
    key.unlink()
    with pytest.raises(PKIError, match="alpha.crt already exists"):
        issue(ca_dir, "alpha")
    assert not key.exists()


def test_issue_with_force_replaces_both_files(ca_dir: Path, umask: None) -> None:
    crt, key = issue(ca_dir, "alpha")
    old_cert, old_key = crt.read_bytes(), key.read_bytes()
    assert issue(ca_dir, "alpha", force=True) == (crt, key)
    assert crt.read_bytes() != old_cert and key.read_bytes() != old_key
    assert mode(key) == 0o600
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert private.public_key() == load_cert(crt).public_key()
    assert sorted(os.listdir(ca_dir)) == ["alpha.crt", "alpha.key", "ca.crt", "ca.key"]


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "x" * 65, "sp ace", "ca", "CA",
                                  "caf\u00e9"])
def test_issue_refuses_bad_names(ca_dir: Path, name: str) -> None:
    with pytest.raises(PKIError):
        issue(ca_dir, name)
    assert sorted(os.listdir(ca_dir)) == ["ca.crt", "ca.key"]


def test_issue_without_a_ca(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="pki init"):
        issue(tmp_path, "alpha")
    assert os.listdir(tmp_path) == []


def test_issue_refuses_a_ca_key_that_does_not_match(ca_dir: Path, tmp_path: Path) -> None:
    init_ca(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "ca.key", ca_dir / "ca.key")
    with pytest.raises(PKIError, match="does not match"):
        issue(ca_dir, "alpha")


# ---------------------------------------------------------------------------
# run_pki (`linkctl pki ...`)
# ---------------------------------------------------------------------------

def args(command: str, directory: Path, name: str | None = None,
         force: bool = False) -> argparse.Namespace:
    return argparse.Namespace(pki_command=command, dir=str(directory), name=name, force=force)


def test_run_pki_prints_one_line_of_what_it_wrote(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "pki"
    assert run_pki(args("init", directory)) == 0
    out, err = capsys.readouterr()
    assert err == "" and len(out.splitlines()) == 1
    assert str(directory / "ca.crt") in out and str(directory / "ca.key") in out
    assert run_pki(args("issue", directory, "alpha")) == 0
    out, err = capsys.readouterr()
    assert err == "" and len(out.splitlines()) == 1 and str(directory / "alpha.key") in out


def test_run_pki_failures_are_one_line_on_stderr(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "pki"
    assert run_pki(args("init", directory)) == 0
    capsys.readouterr()
    for bad in (args("init", directory), args("issue", tmp_path / "none", "alpha"),
                args("issue", directory, "../x")):
        assert run_pki(bad) == 1
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, err
    assert run_pki(args("issue", directory, "alpha")) == 0
    capsys.readouterr()
    assert run_pki(args("issue", directory, "alpha")) == 1
    assert "--force" in capsys.readouterr().err
    assert run_pki(args("issue", directory, "alpha", force=True)) == 0


def test_run_pki_os_errors_are_one_line(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_pki(args("init", blocker / "pki")) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and str(blocker) in err
