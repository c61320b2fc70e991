"""Cost of evidence per delivered file (not a test).

    .venv/bin/python bench/bench_evidence.py [--files 4096] [--dir DIR]

For batches of 1, 16, 128 and 512 files (the inbound worker's group commits are
at most 512 events), with the EC P-256 key `linkctl pki issue` makes and an
RSA-3072 key:

  sign       receiver: canonical receipts + Merkle tree + one signature per batch
  verify     sender: rebuild each receipt's root from its path + one check per batch
  store      sender: append the batch's receipt documents to receipts/, one fsync
  audit      receiver: one message_delivered line per file + one fsync per batch

Prints microseconds per file for each. DIR should be on the state_dir's file
system (default: a temporary folder under /var/tmp).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402

from linkd.evidence import audit as A  # noqa: E402
from linkd.evidence import keys  # noqa: E402
from linkd.evidence import receipts as R  # noqa: E402


def signer(kind: str) -> keys.Signer:
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec-p256" \
        else rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "bravo")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return keys.Signer(cert, key)


def receipts(n: int) -> list[R.Receipt]:
    return [R.Receipt("alpha", "bravo", "cases", i + 1, f"case-{i:06d}.pdf",
                      f"case-{i:06d}.pdf", 4096, hashlib.sha256(str(i).encode()).hexdigest(),
                      1_790_000_000_000_000 + i) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=4096)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-evidence-", dir=args.dir or "/var/tmp"))
    try:
        print(f"{args.files} files per row; microseconds per file")
        print(f"{'key':8} {'batch':>5} {'sign':>8} {'verify':>8} {'store':>8} {'audit':>8}")
        for kind in ("ec-p256", "rsa-3072"):
            s = signer(kind)
            for batch in (1, 16, 128, 512):
                rs = receipts(args.files)
                t0 = time.perf_counter()
                proofs: list[R.Proof] = []
                for i in range(0, len(rs), batch):
                    proofs += R.sign_batch(rs[i:i + batch], s)
                t_sign = time.perf_counter() - t0
                t0 = time.perf_counter()
                v = R.Verifier(s.cert)
                for r, p in zip(rs, proofs, strict=True):
                    assert v.problem(r, p) is None
                t_verify = time.perf_counter() - t0
                store = R.ReceiptStore(base / f"r-{kind}-{batch}")
                docs = [R.document(r, p, s.alg) for r, p in zip(rs, proofs, strict=True)]
                t0 = time.perf_counter()
                for i in range(0, len(docs), batch):
                    store.append("alpha", "cases", docs[i:i + batch])
                t_store = time.perf_counter() - t0
                log = A.AuditLog(base / f"a-{kind}-{batch}", "bravo", s)
                log.open()
                t0 = time.perf_counter()
                for i in range(0, len(rs), batch):
                    for r in rs[i:i + batch]:
                        log.record({"event": "message_delivered", "peer": "alpha",
                                    "channel": r.channel, "name": r.delivered_name,
                                    "seq": r.seq, "size": r.size, "sha256": r.sha256,
                                    "level": "info", "timestamp": "2026-11-30T12:00:00Z"})
                    log.sync()
                t_audit = time.perf_counter() - t0
                log.close()
                us = 1e6 / args.files
                print(f"{kind:8} {batch:5d} {t_sign * us:8.1f} {t_verify * us:8.1f} "
                      f"{t_store * us:8.1f} {t_audit * us:8.1f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
