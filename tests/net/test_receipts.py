"""Signed delivery receipts (issue 10): encoding, Merkle batches, signatures, the
offline verifier, and a peer whose receipt names other content."""

import dataclasses
import datetime as dt
import hashlib
import json
import os

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from memlink import FakePeer, drop, make_link, node_config, peer_config, scan_sync
from test_ack_evidence import run_against

from linkd.cli.evidence_cmd import main_receipt_verify
from linkd.evidence import keys
from linkd.evidence import receipts as R
from linkd.evidence.canonical import micros, utc_text


def signer_for(ca: trustme.CA, name: str) -> keys.Signer:
    cert = ca.issue_cert(name, common_name=name)
    return keys.Signer(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()),
                       load_pem_private_key(cert.private_key_pem.bytes(), None))


def receipt(seq=1, name="case.pdf", at=1_790_000_000.25, data=b"hello"):
    return R.Receipt(frm="alpha", to="bravo", channel="cases", seq=seq, sent_name=name,
                     delivered_name=name, size=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), delivered_at_us=micros(at))


@pytest.fixture
def ca():
    return trustme.CA()


def test_canonical_encoding_is_byte_exact():
    r = receipt()
    assert r.encode() == (
        b'{"channel":"cases","delivered_at":"2026-09-21T14:13:20.250000Z",'
        b'"delivered_name":"case.pdf","from":"alpha","sent_name":"case.pdf","seq":1,'
        b'"sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",'
        b'"size":5,"to":"bravo","v":1}')
    assert R.Receipt.from_map(json.loads(r.encode())) == r


@pytest.mark.parametrize("us", [0, 1, 999_999, 1_000_000, -1, -1_000_001,
                                1_790_000_000_250_000, 1_790_000_000_999_999,
                                1_790_000_001_000_000, 4_102_444_799_999_999])
def test_utc_text_is_the_strftime_text_also_when_the_second_is_remembered(us):
    """utc_text keeps the text of the last second it formatted (the receipts of one
    commit share it): the result is the same whatever it formatted before."""
    want = (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)) \
        .strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for before in (us, us - 1, us + 1_000_000, 0):
        utc_text(before)
        assert utc_text(us) == want


def test_a_document_with_a_known_root_is_the_document(ca):
    signer = signer_for(ca, "bravo")
    rs = [receipt(seq=i, name=f"f{i}.bin") for i in range(1, 6)]
    proofs = R.sign_batch(rs, signer)
    verifier = R.Verifier(signer.cert)
    for r, p in zip(rs, proofs, strict=True):
        problem, root = verifier.check(r, p)
        assert problem is None
        assert R.document(r, p, "x", root) == R.document(r, p, "x")


def _rfc_mth(leaves):
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return R.node_hash(_rfc_mth(leaves[:k]), _rfc_mth(leaves[k:]))


@pytest.mark.parametrize("n", [*range(1, 18), 100, 1000])
def test_merkle_tree_is_rfc9162_and_every_path_leads_to_the_root(n):
    leaves = [R.leaf_hash(str(i).encode()) for i in range(n)]
    levels = R.tree(leaves)
    assert levels[-1][0] == _rfc_mth(leaves)
    for i in ([0, n - 1, n // 2] if n > 20 else range(n)):
        path = R.inclusion_path(levels, i)
        assert R.root_from_path(leaves[i], i, n, path) == levels[-1][0]
        if n > 1:
            assert R.root_from_path(leaves[i], (i + 1) % n, n, path) != levels[-1][0]


@pytest.mark.parametrize("n", [1, 1000])
def test_a_batch_is_signed_once_and_each_receipt_verifies_alone(ca, n):
    signer = signer_for(ca, "bravo")
    batch = [receipt(seq=i + 1, name=f"f{i}.bin", data=os.urandom(8)) for i in range(n)]
    calls = []
    original = signer.sign
    signer.sign = lambda data: calls.append(data) or original(data)   # type: ignore
    proofs = R.sign_batch(batch, signer)
    assert len(calls) == 1
    for r, p in zip(batch, proofs, strict=True):
        assert R.Verifier(signer.cert).problem(r, p) is None     # a fresh verifier each
        doc = json.loads(R.dumps(R.document(r, p, signer.alg)))
        assert R.from_document(doc) == (r, p)


def test_a_tampered_field_or_wrong_key_fails(ca):
    signer = signer_for(ca, "bravo")
    r = receipt()
    p = R.sign_batch([r], signer)[0]
    v = R.Verifier(signer.cert)
    for change in (dict(size=6), dict(sha256="0" * 64), dict(seq=2),
                   dict(delivered_name="x.pdf"), dict(delivered_at_us=r.delivered_at_us + 1)):
        assert "signature does not verify" in v.problem(dataclasses.replace(r, **change), p)
    other = signer_for(ca, "bravo")
    assert "signed by certificate" in R.Verifier(other.cert).problem(r, p)
    forged = dataclasses.replace(p, signer=other.cert_sha256)
    assert "does not verify" in R.Verifier(other.cert).problem(r, forged)


@pytest.mark.parametrize("kind", ["ec384", "rsa"])
def test_rsa_and_other_curves_sign_as_issued(tmp_path, kind):
    key = ec.generate_private_key(ec.SECP384R1()) if kind == "ec384" \
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "bravo")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                                       NoEncryption()))
    signer = keys.Signer.from_files(tmp_path / "c.pem", tmp_path / "k.pem")
    r = receipt()
    assert R.Verifier(cert).problem(r, R.sign_batch([r], signer)[0]) is None


def write_receipt(tmp_path, ca, at, name="bravo"):
    cert = ca.issue_cert(name, common_name=name,
                         not_before=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                         not_after=dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    signer = keys.Signer(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()),
                         load_pem_private_key(cert.private_key_pem.bytes(), None))
    r = receipt(at=at, data=b"hello")
    doc = R.document(r, R.sign_batch([r], signer)[0], signer.alg)
    (tmp_path / "r.json").write_bytes(R.dumps(doc))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "peer.crt"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    (tmp_path / "original").write_bytes(b"hello")
    return [str(tmp_path / "r.json"), "--cert", str(tmp_path / "peer.crt"),
            "--ca", str(tmp_path / "ca.crt")]


def test_verify_command_round_trip_and_mismatches(tmp_path, ca, capsys):
    inside = dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp()
    args = write_receipt(tmp_path, ca, inside)
    assert main_receipt_verify([*args, "--file", str(tmp_path / "original")]) == 0
    assert capsys.readouterr().out.startswith("receipt OK:")
    (tmp_path / "original").write_bytes(b"hellO")
    assert main_receipt_verify([*args, "--file", str(tmp_path / "original")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHA-256" in err
    doc = json.loads((tmp_path / "r.json").read_text())
    doc["receipt"]["size"] = 6
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert main_receipt_verify(args) == 1
    assert "altered" in capsys.readouterr().err
    assert main_receipt_verify([args[0], "--cert", args[2], "--ca", args[2]]) == 1
    assert "receipt" in capsys.readouterr().err


def test_verify_refuses_a_certificate_expired_at_delivery(tmp_path, ca, capsys):
    after = dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp()
    args = write_receipt(tmp_path, ca, after)
    assert main_receipt_verify(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid at 2026-07-01" in err


def test_verify_refuses_a_certificate_of_another_ca(tmp_path, ca, capsys):
    inside = dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp()
    args = write_receipt(tmp_path, ca, inside)
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    assert main_receipt_verify(args) == 1
    assert "does not chain" in capsys.readouterr().err


# -- the sender's side ---------------------------------------------------------

@pytest.fixture
def link(tmp_path):
    return make_link(node_config(tmp_path, trustme.CA(), "alpha", [peer_config("bravo")]),
                     "bravo")


async def test_a_receipt_for_other_content_is_a_violation_and_nothing_is_sent(link):
    payload = os.urandom(30_000)
    drop(link, "data", "case.pdf", payload)
    scan_sync(link)
    peer = FakePeer(None)

    def lie(entry):
        # The ack names the right content, but its receipt is signed over other content.
        other = dataclasses.replace(entry, sha256=hashlib.sha256(b"other").digest())
        signed = peer.sign("data", other)
        return dataclasses.replace(signed, sha256=entry.sha256)
    peer.forge = lie

    async def until(runner, peer):
        await trio.sleep_forever()
    runner = await run_against(link, peer, until)
    reason, error = runner.result
    assert error and "receipt" in reason and "does not verify" in reason, reason
    assert [i.name for i in link.outbound["data"].pending()] == ["case.pdf"]
    assert link.status.channel("data").sent == 0
    store = R.ReceiptStore(link.cfg.node.state_dir / "receipts")
    assert store.find("bravo", "data", seq=1) is None


async def test_an_unsigned_ack_is_a_violation(link):
    drop(link, "data", "a.txt", b"a")
    scan_sync(link)
    peer = FakePeer(None, forge=lambda e: dataclasses.replace(e, sig=b"", path=(), signer=b""))

    async def until(runner, peer):
        await trio.sleep_forever()
    runner = await run_against(link, peer, until)
    reason, _error = runner.result
    assert "carries no signed receipt" in reason
    assert [i.name for i in link.outbound["data"].pending()] == ["a.txt"]


async def test_a_good_receipt_is_kept_before_the_file_leaves(link):
    payload = b"x" * 1000
    drop(link, "data", "ok.txt", payload)
    scan_sync(link)
    peer = FakePeer(None)

    async def until(runner, peer):
        while link.outbound["data"].pending():   # noqa: ASYNC110
            await trio.sleep(0.01)
    await run_against(link, peer, until)
    doc = R.ReceiptStore(link.cfg.node.state_dir / "receipts").find("bravo", "data",
                                                                   name="ok.txt")
    assert doc is not None
    r, p = R.from_document(doc)
    assert (r.sha256, r.size, r.frm, r.to) == (hashlib.sha256(payload).hexdigest(), 1000,
                                               "alpha", "bravo")
    assert R.Verifier(peer.signer.cert).problem(r, p) is None
    certs = keys.CertStore(link.cfg.node.state_dir / "certs")
    assert certs.find(peer.signer.cert_sha256) is not None


async def test_archive_sent_keeps_the_receipt_beside_the_archived_file(tmp_path):
    from linkd.config import LinkConfig
    link = make_link(node_config(tmp_path, trustme.CA(), "alpha", [peer_config("bravo")],
                                 LinkConfig(archive_sent=True)), "bravo")
    drop(link, "data", "kept.txt", b"kept")
    scan_sync(link)
    peer = FakePeer(None)

    async def until(runner, peer):
        sent = link.layout.sent_dir("data")
        while not (sent / ".kept.txt.receipt").exists():   # noqa: ASYNC110
            await trio.sleep(0.01)
    await run_against(link, peer, until)
    sent = link.layout.sent_dir("data")
    assert sorted(p.name for p in sent.iterdir()) == [".kept.txt.receipt", "kept.txt"]
    r, p = R.from_document(json.loads((sent / ".kept.txt.receipt").read_text()))
    assert r.sha256 == hashlib.sha256(b"kept").hexdigest()
    assert R.Verifier(peer.signer.cert).problem(r, p) is None
