"""Delivery receipts: canonical encoding, Merkle batches, signing, the store.

A receipt states that node `to` durably delivered, at `delivered_at`, the file
that node `from` sent as `sent_name` under (`channel`, `seq`), with this `size`
and `sha256`, under the name `delivered_name`. Its canonical bytes
(canonical.py) are those of the object

  {"channel", "delivered_at" (RFC 3339 UTC, 6 fractional digits, "Z"),
   "delivered_name", "from", "seq", "sent_name", "sha256" (64 lowercase hex),
   "size", "to", "v": 1}

Receipts of one group commit form a Merkle tree as RFC 9162 §2.1 defines it
(leaf hash SHA-256(0x00 || receipt bytes), node hash SHA-256(0x01 || left ||
right), the tree split at the largest power of two below its size). One
signature covers the batch: the signer's key signs the canonical bytes of

  {"n": tree size, "root": hex root, "signer": hex SHA-256 of the signing
   certificate's DER, "type": "linkd-receipt-batch", "v": 1}

Each receipt keeps its inclusion path (RFC 9162 §2.1.3), so it is checked on
its own: rebuild the root from the receipt, its index and path, then check the
signature over the batch statement. docs/EVIDENCE.md has the whole format.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, TypedDict

from cryptography import x509

from ..errors import ReceiptError as ReceiptError  # re-exported
from . import keys
from .canonical import EncodingError, canonical_json, parse_utc, utc_text

RECEIPT_VERSION = 1
FORMAT = "linkd-receipt/1"
BATCH_TYPE = "linkd-receipt-batch"
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")

# The stored receipt document (docs/EVIDENCE.md), as `document` writes it.
ReceiptMap = TypedDict("ReceiptMap", {
    "v": int, "from": str, "to": str, "channel": str, "seq": int, "sent_name": str,
    "delivered_name": str, "size": int, "sha256": str, "delivered_at": str})


class ProofMap(TypedDict):
    index: int
    size: int
    path: list[str]
    root: str | None
    signer: str
    alg: str
    sig: str


class ReceiptDoc(TypedDict):
    format: str
    receipt: ReceiptMap
    proof: ProofMap




@dataclasses.dataclass(frozen=True, slots=True)
class Receipt:
    frm: str
    to: str
    channel: str
    seq: int
    sent_name: str
    delivered_name: str
    size: int
    sha256: str              # lowercase hex
    delivered_at_us: int     # microseconds since the epoch

    def to_map(self) -> ReceiptMap:
        return {"v": RECEIPT_VERSION, "from": self.frm, "to": self.to, "channel": self.channel,
                "seq": self.seq, "sent_name": self.sent_name,
                "delivered_name": self.delivered_name, "size": self.size,
                "sha256": self.sha256, "delivered_at": utc_text(self.delivered_at_us)}

    def encode(self) -> bytes:
        return canonical_json(self.to_map())

    @classmethod
    def from_map(cls, m: Any) -> Receipt:
        if not isinstance(m, dict):
            raise ReceiptError("receipt is not an object")
        want = {"v", "from", "to", "channel", "seq", "sent_name", "delivered_name", "size",
                "sha256", "delivered_at"}
        if set(m) != want:
            raise ReceiptError(f"receipt fields are {sorted(m)}, expected {sorted(want)}")
        if m["v"] != RECEIPT_VERSION:
            raise ReceiptError(f"receipt version {m['v']!r} is not {RECEIPT_VERSION}")
        for key in ("from", "to", "channel", "sent_name", "delivered_name"):
            if not isinstance(m[key], str) or not m[key]:
                raise ReceiptError(f"receipt field {key!r} is not a non-empty string")
        for key in ("seq", "size"):
            if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < 0:
                raise ReceiptError(f"receipt field {key!r} is not a non-negative integer")
        if not isinstance(m["sha256"], str) or not _HEX64.match(m["sha256"]):
            raise ReceiptError("receipt field 'sha256' is not 64 lowercase hex digits")
        try:
            at = parse_utc(m["delivered_at"])
        except EncodingError as exc:
            raise ReceiptError(f"receipt field 'delivered_at': {exc}") from None
        return cls(m["from"], m["to"], m["channel"], m["seq"], m["sent_name"],
                   m["delivered_name"], m["size"], m["sha256"], at)


# -- Merkle trees (RFC 9162 §2.1) ---------------------------------------------

def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def tree(leaves: list[bytes]) -> list[list[bytes]]:
    """The levels of the tree over these leaf hashes, bottom up. Building pairwise
    and carrying a lone last node up unchanged gives exactly RFC 9162's tree."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        above = [node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])
        levels.append(above)
    return levels


def inclusion_path(levels: list[list[bytes]], index: int) -> list[bytes]:
    path = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index //= 2
    return path


def root_from_path(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes | None:
    """RFC 9162 §2.1.3.2: the root the path leads to, or None if it cannot be one."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def batch_statement(root: bytes, size: int, signer_sha256: str) -> bytes:
    return canonical_json({"v": 1, "type": BATCH_TYPE, "n": size, "root": root.hex(),
                           "signer": signer_sha256})


@dataclasses.dataclass(frozen=True, slots=True)
class Proof:
    """What makes one receipt of a batch checkable on its own."""

    index: int
    size: int
    path: tuple[bytes, ...]
    signature: bytes
    signer: str              # hex SHA-256 of the signing certificate (DER)


def sign_batch(receipts: list[Receipt], signer: keys.Signer) -> list[Proof]:
    """One signature for the whole batch; a proof per receipt (same order)."""
    if not receipts:
        return []
    levels = tree([leaf_hash(r.encode()) for r in receipts])
    root = levels[-1][0]
    sig = signer.sign(batch_statement(root, len(receipts), signer.cert_sha256))
    return [Proof(i, len(receipts), tuple(inclusion_path(levels, i)), sig, signer.cert_sha256)
            for i in range(len(receipts))]


class Verifier:
    """Checks receipts against one certificate; a batch signature is checked once."""

    def __init__(self, cert: x509.Certificate) -> None:
        self.cert = cert
        self.cert_sha256 = keys.cert_sha256(keys.der(cert))
        self._good: set[tuple[bytes, int, bytes]] = set()

    def problem(self, receipt: Receipt, proof: Proof) -> str | None:
        """None if the receipt verifies, else why not (one line)."""
        return self.check(receipt, proof)[0]

    def check(self, receipt: Receipt, proof: Proof) -> tuple[str | None, bytes | None]:
        """(why the receipt does not verify or None, the root its path leads to):
        the root is what `document()` records, so it need not be computed twice."""
        if proof.signer != self.cert_sha256:
            return (f"signed by certificate {proof.signer[:16]}…, not by "
                    f"{self.cert_sha256[:16]}…"), None
        root = root_from_path(leaf_hash(receipt.encode()), proof.index, proof.size,
                              list(proof.path))
        if root is None:
            return "its inclusion path is malformed", None
        key = (root, proof.size, proof.signature)
        if key in self._good:
            return None, root
        if not keys.verify(self.cert, batch_statement(root, proof.size, proof.signer),
                           proof.signature):
            return "the signature does not verify (the receipt was altered or signed by " \
                   "another key)", root
        self._good.add(key)
        return None, root


# -- documents (what is stored and what `linkctl receipt` reads) -----------------

def document(receipt: Receipt, proof: Proof, alg: str,
             root: bytes | None = None) -> ReceiptDoc:
    """The stored form of a receipt; `root`: what its path leads to, if already
    known (Verifier.check), else computed here."""
    if root is None:
        root = root_from_path(leaf_hash(receipt.encode()), proof.index, proof.size,
                              list(proof.path))
    return {"format": FORMAT, "receipt": receipt.to_map(),
            "proof": {"index": proof.index, "size": proof.size,
                      "path": [p.hex() for p in proof.path],
                      "root": root.hex() if root else None, "signer": proof.signer,
                      "alg": alg, "sig": base64.b64encode(proof.signature).decode("ascii")}}


def from_document(doc: Any) -> tuple[Receipt, Proof]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ReceiptError(f"not a linkd receipt (no \"format\": \"{FORMAT}\")")
    receipt = Receipt.from_map(doc.get("receipt"))
    p = doc.get("proof")
    if not isinstance(p, dict):
        raise ReceiptError("receipt has no proof object")
    try:
        index, size = p["index"], p["size"]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (index, size)):
            raise TypeError
        path = tuple(bytes.fromhex(h) for h in p["path"])
        if any(len(h) != 32 for h in path):
            raise ValueError
        signer = p["signer"]
        if not isinstance(signer, str) or not _HEX64.match(signer):
            raise ValueError
        sig = base64.b64decode(p["sig"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise ReceiptError("receipt proof is malformed (index, size, path, signer, sig)") \
            from None
    proof = Proof(index, size, path, sig, signer)
    if p.get("root") is not None:
        root = root_from_path(leaf_hash(receipt.encode()), index, size, list(path))
        if root is None or root.hex() != p["root"]:
            raise ReceiptError("the receipt does not hash to the root its proof names "
                               "(a field was altered)")
    return receipt, proof


_DOC_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def dumps(doc: ReceiptDoc) -> bytes:
    return _DOC_ENCODER.encode(doc).encode("utf-8") + b"\n"


class ReceiptStore:
    """`<state_dir>/receipts/<peer>/<channel>.jsonl`: one receipt document a line,
    appended and fsync'd before the file it proves leaves the queue."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, peer: str, channel: str) -> Path:
        return self.folder / peer / f"{channel}.jsonl"

    def append(self, peer: str, channel: str, docs: list[ReceiptDoc]) -> None:
        if not docs:
            return
        path = self.path(peer, channel)
        created = not path.parent.is_dir()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            data = b"".join(dumps(d) for d in docs)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            for folder in (path.parent, path.parent.parent):
                dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    def find(self, peer: str, channel: str, seq: int | None = None,
             name: str | None = None) -> dict[str, Any] | None:
        """The newest receipt for this seq or sent name (a torn last line is skipped)."""
        found = self.find_all(peer, channel, seq, name)
        return found[-1] if found else None

    def find_all(self, peer: str, channel: str, seq: int | None = None,
                 name: str | None = None) -> list[dict[str, Any]]:
        """Every receipt for this seq or name (sent or delivered), oldest first: one
        name may have been sent several times (delivered as NAME, NAME~1...)."""
        found: list[dict[str, Any]] = []
        try:
            f = open(self.path(peer, channel), "rb")  # noqa: SIM115
        except FileNotFoundError:
            return found
        with f:
            for raw in f:
                try:
                    doc = json.loads(raw)
                    r = doc["receipt"]
                except (ValueError, KeyError, TypeError):
                    continue
                if (seq is not None and r.get("seq") == seq) or \
                        (name is not None and name in (r.get("sent_name"),
                                                       r.get("delivered_name"))):
                    found.append(doc)
        return found
