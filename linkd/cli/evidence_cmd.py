"""`linkctl receipt show|verify` and `linkctl audit verify|export` (CONTRACT §11).

`receipt verify` and `audit verify` work offline: no daemon, no state dir. Any
mismatch is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from ..evidence import audit as A
from ..evidence import keys
from ..evidence import receipts as R
from .safe import printable


def add_parsers(sub: Any) -> None:
    """Register `receipt` and `audit` on linkctl's sub-command parser."""
    rc = sub.add_parser("receipt", help="show or verify signed delivery receipts")
    rc_sub = rc.add_subparsers(dest="receipt_command", required=True, metavar="ACTION")
    show = rc_sub.add_parser("show", help="print the receipt of a sent file (from the state dir)")
    show.add_argument("--peer", required=True)
    show.add_argument("--channel", required=True)
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("--seq", type=int)
    which.add_argument("--name")
    ver = rc_sub.add_parser("verify", help="check a receipt offline")
    ver.add_argument("receipt", type=Path, metavar="RECEIPT_FILE")
    ver.add_argument("--cert", type=Path, required=True, help="the peer's certificate (PEM)")
    ver.add_argument("--ca", type=Path, required=True, help="the link CA certificate (PEM)")
    ver.add_argument("--file", type=Path, default=None, help="the original file: its SHA-256 "
                                                             "and size are compared")

    au = sub.add_parser("audit", help="verify or export the tamper-evident audit log")
    au_sub = au.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    av = au_sub.add_parser("verify", help="check the hash chain, checkpoints and witnesses")
    av.add_argument("--log", type=Path, default=None,
                    help="the log (default <state_dir>/audit/audit.jsonl) or an export bundle")
    av.add_argument("--peer-log", type=Path, default=None,
                    help="the peer's log: detects a cut tail through its witnesses")
    av.add_argument("--ca", type=Path, default=None,
                    help="the link CA certificate (PEM): every checkpoint must be signed "
                         "by a certificate it issued (without it, the log is only checked "
                         "against itself)")
    ex = au_sub.add_parser("export", help="write a self-contained bundle of a time range")
    ex.add_argument("--since", default=None, help="ISO 8601 time (inclusive)")
    ex.add_argument("--until", default=None, help="ISO 8601 time (inclusive)")
    ex.add_argument("--log", type=Path, default=None)
    ex.add_argument("-o", "--output", type=Path, default=None, help="default: stdout")


def run(args: argparse.Namespace, load_config: Any) -> int:
    try:
        if args.command == "receipt":
            if args.receipt_command == "verify":
                return receipt_verify(args.receipt, args.cert, args.ca, args.file)
            return receipt_show(load_config(args).node.state_dir, args.peer, args.channel,
                                args.seq, args.name)
        if args.audit_command == "verify":
            log = args.log or load_config(args).node.state_dir / "audit" / "audit.jsonl"
            return audit_verify(log, args.peer_log, args.ca)
        log = args.log or load_config(args).node.state_dir / "audit" / "audit.jsonl"
        return audit_export(log, args.since, args.until, args.output)
    except _Fail as exc:
        print(f"linkctl: {exc}", file=sys.stderr)
        return 1


class _Fail(Exception):
    pass


# -- receipts ----------------------------------------------------------------------

def receipt_show(state_dir: Path, peer: str, channel: str, seq: int | None,
                 name: str | None) -> int:
    found = R.ReceiptStore(state_dir / "receipts").find_all(peer, channel, seq, name)
    if not found:
        what = f"seq {seq}" if seq is not None else f"name {printable(name)}"
        raise _Fail(f"no receipt for {what} on {peer}/{channel} in {state_dir / 'receipts'} "
                    f"(a file has one once its peer acknowledged it; `linkctl queue` shows "
                    f"what is not acknowledged yet; the audit log's message_sent line shows "
                    f"an acknowledgement whose receipt was lost with a restored state_dir)")
    doc = found[-1]
    if len(found) > 1 and seq is None:
        seqs = ", ".join(str(d["receipt"].get("seq")) for d in found)
        print(f"linkctl: {len(found)} receipts match {printable(name)} (seq {seqs}): this is "
              f"the newest; give --seq N for another", file=sys.stderr)
    print(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False))
    return 0


def _load_doc(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _Fail(f"cannot read the receipt {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _Fail(f"{path} is not a receipt (not UTF-8 text)") from None
    try:
        return json.loads(text)
    except ValueError:
        raise _Fail(f"{path} is not a receipt (not JSON): save the output of "
                    f"`linkctl receipt show`") from None


def receipt_verify(path: Path, cert_path: Path, ca_path: Path, original: Path | None) -> int:
    doc = _load_doc(path)
    try:
        receipt, proof = R.from_document(doc)
        chain = keys.load_certs(cert_path)
        anchors = keys.load_certs(ca_path)
    except (R.ReceiptError, keys.KeyError_) as exc:
        raise _Fail(f"{path}: {exc}" if isinstance(exc, R.ReceiptError) else str(exc)) \
            from None
    leaf = chain[0]
    problem = R.Verifier(leaf).problem(receipt, proof)
    if problem is not None:
        if proof.signer != keys.cert_sha256(keys.der(leaf)):
            problem += (f": pass the certificate that signed it (the sender keeps it as "
                        f"<state_dir>/certs/{proof.signer}.pem)")
        raise _Fail(f"receipt does not verify: {problem}")
    at = A_EPOCH + dt.timedelta(microseconds=receipt.delivered_at_us)
    problem = keys.chain_problem(leaf, chain[1:], anchors, at)
    if problem is not None:
        raise _Fail(f"receipt signer not trusted: {problem}")
    names = {x.value for x in leaf.subject.get_attributes_for_oid(
        x509.oid.NameOID.COMMON_NAME)}
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names |= set(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    if receipt.to.lower() not in {str(n).lower() for n in names}:
        raise _Fail(f"receipt names {receipt.to!r} as the receiver, but {cert_path} is not "
                    f"that node's certificate")
    if original is not None:
        digest, size = _hash_file(original)
        if (digest, size) != (receipt.sha256, receipt.size):
            raise _Fail(f"{original} does not match the receipt: SHA-256 {digest[:16]}… "
                        f"({size} bytes), receipt says {receipt.sha256[:16]}… "
                        f"({receipt.size} bytes)")
    print(f"receipt OK: {receipt.to} delivered {receipt.frm}'s {receipt.sent_name!r} "
          f"({receipt.size} bytes, sha256 {receipt.sha256}) on {receipt.channel} seq "
          f"{receipt.seq} as {receipt.delivered_name!r} at "
          f"{at.isoformat().replace('+00:00', 'Z')}")
    return 0


A_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise _Fail(f"cannot read {path}: {exc.strerror or exc}") from None
    return h.hexdigest(), size


# -- audit -------------------------------------------------------------------------

def _files(log: Path, option: str = "--log") -> list[Path]:
    if not log.exists():
        raise _Fail(f"no audit log at {log} (give {option} FILE)")
    if log.is_dir():
        return [*A.rotated_files(log), log / "audit.jsonl"]
    if log.name == "audit.jsonl":
        return [*A.rotated_files(log.parent), log]
    return [log]


def audit_verify(log: Path, peer_log: Path | None, ca: Path | None = None) -> int:
    peer = _files(peer_log, "--peer-log") if peer_log is not None else None
    anchors = None
    if ca is not None:
        try:
            anchors = keys.load_certs(ca)
        except keys.KeyError_ as exc:
            raise _Fail(f"--ca: {exc}") from None
    verdict = A.verify(_files(log), peer, anchors=anchors)
    if not verdict.ok:
        raise _Fail(f"audit log NOT OK: {verdict.message}")
    print(verdict.message)
    return 0


def _time(text: str | None, what: str) -> dt.datetime | None:
    if text is None:
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _Fail(f"{what} {text!r} is not an ISO 8601 time (e.g. 2026-11-30T12:00:00Z)") \
            from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def audit_export(log: Path, since: str | None, until: str | None, output: Path | None) -> int:
    """A bundle = the log lines from the last checkpoint at or before `since` up to the
    first checkpoint at or after `until` (so both ends are signed), preceded by every
    audit_key line it needs: `verify --log BUNDLE` checks it offline. Lines are kept
    verbatim: the chain is intact inside the slice."""
    lo, hi = _time(since, "--since"), _time(until, "--until")
    if lo is not None and hi is not None and lo > hi:
        raise _Fail(f"--since {since} is after --until {until}: swap them")
    lines: list[bytes] = []
    for path in _files(log):
        lines += path.read_bytes().split(b"\n")[:-1]
    objs = []
    for raw in lines:
        try:
            objs.append(json.loads(raw))
        except ValueError:
            raise _Fail(f"{log} is damaged: run `linkctl audit verify` first") from None

    def when(o: dict[str, Any]) -> dt.datetime | None:
        try:
            return dt.datetime.fromisoformat(str(o.get("timestamp")).replace("Z", "+00:00"))
        except ValueError:
            return None
    start, end = 0, len(objs) - 1
    last = next((t for t in map(when, reversed(objs)) if t is not None), None)
    if lo is not None and last is not None and lo > last:
        raise _Fail(f"--since {since} is after the log's last line ({last:%Y-%m-%dT%H:%M:%SZ}):"
                    f" nothing to export")
    if lo is not None:
        for i, o in enumerate(objs):
            t = when(o)
            if t is not None and t >= lo:
                break
            if o.get("event") in ("audit_checkpoint", "audit_key"):
                start = i
    if hi is not None:
        for i, o in enumerate(objs):
            t = when(o)
            if i >= start and t is not None and t > hi and o.get("event") == "audit_checkpoint":
                end = i
                break
    keys_needed = [raw for raw, o in zip(lines[:start], objs[:start], strict=True)
                   if o.get("event") == "audit_key"]
    bundle = {"format": "linkd-audit-export/1", "node": next(
        (o.get("node") for o in objs if o.get("node")), None),
        "keys": [k.decode("utf-8") for k in keys_needed],
        "lines": [raw.decode("utf-8") for raw in lines[start:end + 1]]}
    text = json.dumps(bundle, ensure_ascii=False) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, output)
        print(f"wrote {output}: {end - start + 1} lines", file=sys.stderr)
    if objs and objs[end].get("event") != "audit_checkpoint":
        # (fourth operator trial: exported to the unsigned end, exit 0, no word)
        print(f"linkctl: warning: the bundle ends unsigned (no checkpoint after "
              f"{until or 'its last line'} yet): `systemctl reload linkd` (SIGHUP) signs "
              f"one now; export again after it", file=sys.stderr)
    return 0


def main_receipt_verify(argv: list[str]) -> int:
    """`linkctl receipt verify ARGV...` (for tests and scripts)."""
    p = argparse.ArgumentParser(prog="linkctl")
    add_parsers(p.add_subparsers(dest="command"))
    return run(p.parse_args(["receipt", "verify", *argv]), None)
