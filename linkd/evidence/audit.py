"""The tamper-evident audit log: `<state_dir>/audit/audit.jsonl`.

Each line is one JSON object (UTF-8, no embedded newline) holding the event as
logged (CONTRACT §8/§10 fields) plus `line` (its number in the chain, from 1,
continuing across rotated files) and `prev` (the lowercase hex SHA-256 of the
previous line's bytes, without its newline; 64 zeros for line 1). Editing,
inserting, deleting or reordering a line therefore breaks the chain at that
line. Special lines:

* `audit_key`: written when the log is opened, carries the node's certificate
  (`cert`, PEM) and its `cert_sha256`: the log carries what verifies it. Also
  when a reload renews the certificate (`renew()`): a checkpoint signed by the
  old key (`why` "renewing") covers every line before it, then the new
  `audit_key`, then a checkpoint signed by the new key ("renewed").
* `audit_checkpoint`: every `audit_checkpoint_lines` lines and at clean
  shutdown; `signer`, `alg` and `sig` (base64) = the node key's signature over
  the canonical JSON (canonical.py) of the line's object without `sig`. It
  commits to the whole chain before it. Each side sends its latest checkpoint
  to the peer (hello `ck`, `ckpt` frames), which logs it as `audit_witness`
  (`peer`, `checkpoint` = the object): a cut tail is then visible against the
  peer's log.
* `audit_torn_tail`: on opening, a last line without its newline (a crash in
  mid-write, never acknowledged) is cut and recorded here (`bytes`, `sha256`).
* `audit_resumed`: the log could not be written because its disk was full
  (ENOSPC or EDQUOT from a write) and can be again (`resume()`): `failed_at`,
  `reason`; the lines of the events in between are missing (no delivery was
  acknowledged meanwhile: every one was refused). A torn fragment the failed
  write left is cut and recorded first (`audit_torn_tail`).
* `audit_rotated` / first line of a new file: when the file grows past
  `max_bytes` at a checkpoint it is renamed `audit-<line>.jsonl` and the chain
  continues in a fresh `audit.jsonl`.

Durability: `record()` writes at once (O_APPEND); `sync()` fsyncs. The inbound
worker calls `sync()` after logging a batch's deliveries and before sending
their acks; checkpoints and close fsync too.

Size: over 400 lines on purpose: writing, rotating, repairing a torn tail and
verifying share one line format and one hash chain, and change together.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import errno
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..spool.fs import fsync_dir
from . import keys
from .canonical import canonical_json

ZERO = "0" * 64
# what json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str) builds per call
_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)
DEFAULT_CHECKPOINT_LINES = 1000
MAX_BYTES = 64 << 20
TAIL_LOOKUP_BYTES = 8 << 20     # how far back delivered_in_tail() looks

AUDIT_EVENTS = frozenset({
    "message_queued", "message_sent", "message_delivered", "message_failed",
    "message_quarantined", "message_changed", "message_renumbered", "message_retry",
    "message_retried", "duplicate_possible", "channel_mismatch", "link_up", "link_down",
    "link_still_down", "tls_refused", "log_suppressed", "reloaded", "reload_failed",
    "paused", "resumed", "channel_paused", "channel_resumed", "retried", "retry",
    "started", "stopping", "stopped", "recovery", "protocol_violation", "ack_mismatch",
    "receipt_invalid", "inbound_storage_failed", "cert_expiring", "audit_witness",
    "audit_witness_refused", "audit_went_back",
})


def line_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def checkpoint_problem(obj: dict[str, Any], cert: x509.Certificate) -> str | None:
    """None if the checkpoint object's signature verifies with `cert`."""
    body = {k: v for k, v in obj.items() if k != "sig"}
    try:
        sig = base64.b64decode(str(obj.get("sig", "")), validate=True)
        data = canonical_json(body)
    except ValueError as exc:
        return f"checkpoint is malformed: {exc}"
    if obj.get("signer") != keys.cert_sha256(keys.der(cert)):
        return "checkpoint names another signing certificate"
    if not keys.verify(cert, data, sig):
        return "checkpoint signature does not verify"
    return None


@dataclasses.dataclass(frozen=True)
class AuditTail:
    since: float        # epoch seconds of the first line read
    delivered: set[tuple[str, str, int, str]]   # (peer, channel, seq, sha256)


def _line_number(raw: bytes) -> int | None:
    try:
        number = json.loads(raw)["line"]
    except (ValueError, KeyError, TypeError):
        return None
    return number if isinstance(number, int) else None


def _first_line_number(data: bytes) -> int:
    """The `line` of the first whole line of `data` (a file read from its start)."""
    return _line_number(data.split(b"\n", 1)[0]) or 0


def _last_line_number(data: bytes) -> int | None:
    return _line_number(data.rstrip(b"\n").rsplit(b"\n", 1)[-1])


def _epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class AuditLog:
    def __init__(self, folder: Path, node: str, signer: keys.Signer | None,
                 checkpoint_lines: int = DEFAULT_CHECKPOINT_LINES,
                 max_bytes: int = MAX_BYTES) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "audit.jsonl"
        self.node = node
        self.signer = signer
        self.checkpoint_lines = max(1, checkpoint_lines)
        self.max_bytes = max_bytes
        self.lock = threading.RLock()
        self.fd = -1
        self.line = 0               # number of the last line written
        self.prev = ZERO            # hash of the last line written
        self.since_checkpoint = 0
        self.dirty = False
        self.failed: OSError | None = None
        self.failed_at: str | None = None      # when it failed (the audit_resumed line)
        self.failed_at_last: str | None = None  # ... the last time, once resumed
        self._write_error: OSError | None = None   # the last error of a write (not an fsync)
        self.failures = 0           # times the log failed: a caller's lines may be lost
        self._torn: list[bytes] = []    # fragments cut while resuming, not yet recorded
        self._own_fragment = False  # a resume attempt's own write was cut short
        self.latest_checkpoint: bytes | None = None   # raw line of the newest checkpoint
        self.checkpoints = 0        # how many were made since open (to notice new ones)
        self._busy = False
        self._key_due = False       # the signer changed: its audit_key line is not written yet

    # -- opening ----------------------------------------------------------------

    def open(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        self.fd = fd
        torn = self._read_tail()
        if self.line == 0:
            self._continue_from_rotated()
        if torn is not None:
            self._write({"event": "audit_torn_tail", "node": self.node, "timestamp": _now(),
                         "bytes": len(torn), "sha256": hashlib.sha256(torn).hexdigest(),
                         "reason": "the last line was cut short (a crash mid-write); its "
                                   "fragment was removed"})
        if self.signer is not None:
            self._write_key()
            self.checkpoint("opened")    # so that the first hello already carries one
        self.sync()

    def _write_key(self) -> None:
        assert self.signer is not None
        self._write({"event": "audit_key", "node": self.node, "timestamp": _now(),
                     "cert_sha256": self.signer.cert_sha256, "alg": self.signer.alg,
                     "cert": self.signer.cert.public_bytes(Encoding.PEM).decode("ascii")})
        self._key_due = False

    def renew(self, signer: keys.Signer) -> bytes | None:
        """Sign checkpoints with `signer` from now on (a reload installed a new
        certificate and key). A checkpoint signed by the old key covers the lines
        before the switch (returned: the sessions still running under the old
        certificate can witness it); then the new certificate's `audit_key` line, so
        the log still carries what verifies each checkpoint, and a checkpoint signed
        by the new key. A log that cannot be written now switches all the same: its
        next checkpoint (resume()) or open() writes the `audit_key` line first."""
        with self.lock:
            old = self.signer
            if old is not None and old.cert_sha256 == signer.cert_sha256:
                return None
            line = None
            if old is not None and self.fd >= 0 and self.failed is None:
                try:
                    line = self.checkpoint("renewing")
                except OSError:
                    pass                # (failed: the switch below is still made)
            self.signer = signer
            self._key_due = True
            if self.fd >= 0 and self.failed is None:
                try:
                    self.checkpoint("renewed")
                except OSError:
                    pass
            return line

    def _read_tail(self) -> bytes | None:
        """Find the last line's number and hash; cut a torn fragment (returned)."""
        size = os.fstat(self.fd).st_size
        if size == 0:
            return None
        block = 1 << 16
        end = size
        data = b""
        while True:
            start = max(0, end - block)
            data = os.pread(self.fd, end - start, start) + data
            end = start
            body = data[:-1] if data.endswith(b"\n") else data
            if b"\n" in body or start == 0:
                break
            block *= 2
        torn = None
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n")
            torn = data[cut + 1:]
            os.ftruncate(self.fd, size - len(torn))
            os.fsync(self.fd)
            data = data[:cut + 1]
        lines = data.split(b"\n")[:-1]
        if lines:
            last = lines[-1]
            try:
                self.line = int(json.loads(last)["line"])
            except (ValueError, KeyError, TypeError):
                self.line = 0
            self.prev = line_hash(last)
        return torn

    def _continue_from_rotated(self) -> None:
        rotated = rotated_files(self.folder)
        if not rotated:
            return
        raw = rotated[-1].read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            self.line = int(json.loads(raw)["line"])
            self.prev = line_hash(raw)
        except (ValueError, KeyError, TypeError):
            pass

    # -- writing ----------------------------------------------------------------

    @staticmethod
    def _encode(obj: Mapping[str, object], line: int, prev: str) -> bytes:
        """The raw bytes of the line after `line` (whose hash is `prev`)."""
        obj = {"line": line + 1, "prev": prev, **obj}
        # A file name that is not UTF-8 reaches us with lone surrogates (Python's
        # surrogateescape): written as the JSON escape `\udcff`, which reads back as
        # the same string, so the line stays valid UTF-8 JSON and verifies.
        return _LINE_ENCODER.encode(obj).replace("\n", "\\n").encode("utf-8",
                                                                     "backslashreplace")

    def _write(self, obj: Mapping[str, object]) -> bytes:
        raw = self._encode(obj, self.line, self.prev)
        self._write_lines([raw], line_hash(raw))
        return raw

    def _write_lines(self, lines: list[bytes], last_hash: str) -> None:
        """Append the encoded lines that follow the last one written (`last_hash`:
        the hash of the last of them), in one write where the kernel takes it."""
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        try:
            written = os.write(self.fd, data)
            if written < len(data):
                view = memoryview(data)[written:]
                while view:
                    view = view[os.write(self.fd, view):]
        except OSError as exc:
            self._write_error = exc     # (resume() can recover from a full disk here)
            raise
        self.line += len(lines)
        self.prev = last_hash
        self.since_checkpoint += len(lines)
        self.dirty = True

    def record(self, event: Mapping[str, object]) -> None:
        """Append one logged event (if it is an audit event); never raises."""
        self.record_many([event])

    def record_many(self, events: list[Mapping[str, object]]) -> None:
        """Append logged events (those that are audit events), in order, in one write
        (a checkpoint due in the middle is written where it falls); never raises."""
        events = [e for e in events if e.get("event") in AUDIT_EVENTS]
        if not events:
            return
        with self.lock:
            if self.failed is not None:
                self.failures += 1      # lines lost: see lost_since()
                return
            if self.fd < 0 or self._busy:
                return
            self._busy = True
            try:
                lines: list[bytes] = []
                line, prev = self.line, self.prev
                for event in events:
                    if "line" in event or "prev" in event:  # ours to set, never the caller's
                        event = {k: v for k, v in event.items() if k not in ("line", "prev")}
                    try:
                        raw = self._encode(event, line, prev)
                    except Exception:
                        # not encodable (a caller's bug): the lines before it are
                        # written, as record() one by one would have, then it raises
                        self._write_lines(lines, prev)
                        raise
                    lines.append(raw)
                    line, prev = line + 1, line_hash(raw)
                    if self.since_checkpoint + len(lines) >= self.checkpoint_lines:
                        self._write_lines(lines, prev)
                        lines = []
                        self.checkpoint("every")
                        line, prev = self.line, self.prev
                self._write_lines(lines, prev)
            except OSError as exc:
                self._fail(exc)
            finally:
                self._busy = False

    def _fail(self, exc: OSError) -> None:
        if self.failed is None:
            self.failed, self.failed_at = exc, _now()
            self.failures += 1

    def checkpoint(self, why: str) -> bytes | None:
        """Write a signed checkpoint line and fsync; returns its bytes."""
        with self.lock:
            if self.signer is None or self.fd < 0:
                return None
            if self.failed is not None:
                # Not after a failure: the file may end in a fragment, and line/prev
                # may be behind it (only resume() or open() re-reads the tail).
                raise OSError(self.failed.errno, f"audit log {self.path}: "
                                                 f"{self.failed.strerror or self.failed}")
            try:
                if self._key_due:       # (renew() while the log could not be written)
                    self._write_key()
                obj = {"line": self.line + 1, "prev": self.prev, "event": "audit_checkpoint",
                       "node": self.node, "timestamp": _now(), "why": why,
                       "signer": self.signer.cert_sha256, "alg": self.signer.alg}
                sig = self.signer.sign(canonical_json(obj))
                obj["sig"] = base64.b64encode(sig).decode("ascii")
                del obj["line"], obj["prev"]
                raw = self._write(obj)
                self.since_checkpoint = 0
                self.sync()
                self.latest_checkpoint = raw
                self.checkpoints += 1
                if os.fstat(self.fd).st_size > self.max_bytes:
                    self._rotate()
            except OSError as exc:
                self._fail(exc)
                raise
            return raw

    def _rotate(self) -> None:
        try:
            self._rotate_now()
        except OSError:
            # A new file without its audit_rotated and audit_key lines would not verify
            # alone: not for resume() to carry on from (a restart's open() does).
            self._write_error = None
            raise

    def _rotate_now(self) -> None:
        target = self.folder / f"audit-{self.line:012d}.jsonl"
        os.rename(self.path, target)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
        fsync_dir(self.folder)
        self._write({"event": "audit_rotated", "node": self.node, "timestamp": _now(),
                     "previous_file": target.name})
        if self.signer is not None:
            self._write_key()
        self.sync()

    def sync(self) -> None:
        """Make every line written so far durable (raises if the log failed)."""
        with self.lock:
            if self.failed is not None:
                raise OSError(self.failed.errno, f"audit log {self.path}: "
                                                 f"{self.failed.strerror or self.failed}")
            if self.dirty and self.fd >= 0:
                try:
                    os.fsync(self.fd)
                except OSError as exc:
                    # Linux reports a failed write-back once per file: the next fsync
                    # would "succeed" with the lines lost. Failed stays failed.
                    if self.failed is None:
                        self.failures += 1
                    self.failed, self.failed_at = exc, self.failed_at or _now()
                    self._write_error = None        # (not resumable: see resume())
                    raise
                self.dirty = False

    def tail(self, tail_bytes: int = TAIL_LOOKUP_BYTES) -> AuditTail:
        """The message_delivered lines of the last `tail_bytes` of the log (of the
        current file, and of the newest rotated one when the current file is
        shorter), and the time of the first line read: a delivery made after that
        time has its line in there, if it has one."""
        with self.lock:
            if self.fd < 0:
                return AuditTail(time.time(), set())
            size = os.fstat(self.fd).st_size
            start = max(0, size - tail_bytes)
            data = os.pread(self.fd, size - start, start)
        if size < tail_bytes:
            rotated = rotated_files(self.folder)
            if rotated:
                try:
                    with open(rotated[-1], "rb") as f:
                        f.seek(max(0, os.fstat(f.fileno()).st_size - (tail_bytes - size)))
                        older = f.read()
                except OSError:
                    older = b""
                # only the file the current one continues (line numbers follow on): a
                # newest rotated file moved away must not make an older one count
                if _last_line_number(older) is not None and \
                        _last_line_number(older) == _first_line_number(data) - 1:
                    data = older + b"\n" + data
        lines = data.split(b"\n")
        since = time.time()
        for raw in lines[1:] if len(lines) > 1 else lines:   # the first may be cut
            try:
                since = _epoch(str(json.loads(raw)["timestamp"]))
                break
            except (ValueError, KeyError, TypeError):
                continue
        marker = b'"message_delivered"'
        delivered: set[tuple[str, str, int, str]] = set()
        for raw in lines:
            if marker not in raw:
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue            # the cut first line of the tail
            if isinstance(obj, dict) and obj.get("event") == "message_delivered":
                seq = obj.get("seq")
                if isinstance(seq, int):
                    delivered.add((str(obj.get("peer")), str(obj.get("channel")), seq,
                                   str(obj.get("sha256"))))
        return AuditTail(since, delivered)

    def lost_since(self, mark: int) -> bool:
        """Whether lines may have been lost since `mark` (a value of `failures` read
        before recording them): the log failed, or dropped lines while failed, even
        if it works again now (resume() in between). A caller that must not go on
        without its lines (a delivery's) checks this after its sync()."""
        return self.failures != mark

    def resumable(self) -> bool:
        """Failed only because a write found the disk full: resume() may recover it.
        Not after a failed fsync (Linux reports a lost write-back once: lines may be
        gone without a trace) nor any other error: those wait for a restart."""
        failed = self.failed
        return failed is not None and failed is self._write_error \
            and failed.errno in (errno.ENOSPC, errno.EDQUOT)

    def resume(self) -> bool:
        """Blocking: after a full disk, carry on if a write fits again. Re-reads the
        tail as open() does (the failed write may have left part of a line: cut,
        recorded), then writes `audit_resumed` and a checkpoint and fsyncs; True if
        the log works again. Lines written before the failure were accepted by the
        kernel whole (a full disk fails the write, not the write-back, on the file
        systems linkd supports), so the chain goes on from the file's last line."""
        with self.lock:
            if not self.resumable() or self.fd < 0:
                return False
            failed, failed_at = self.failed, self.failed_at
            assert failed is not None
            try:
                torn = self._read_tail()        # (line/prev from the file, as it is now)
                if torn is not None and not self._own_fragment:
                    self._torn.append(torn)     # recorded below, or at the next attempt
                # (a fragment of the last attempt's own lines is cut, not recorded: those
                # lines are written again below, and nothing of the events was lost)
                self._own_fragment = False
                self.failed = None
                while self._torn:
                    fragment = self._torn[0]
                    self._write({"event": "audit_torn_tail", "node": self.node,
                                 "timestamp": _now(), "bytes": len(fragment),
                                 "sha256": hashlib.sha256(fragment).hexdigest(),
                                 "reason": "a write cut short by a full disk; its fragment "
                                           "was removed"})
                    self._torn.pop(0)
                self._write({"event": "audit_resumed", "node": self.node, "timestamp": _now(),
                             "failed_at": failed_at,
                             "reason": f"the audit log could not be written "
                                       f"({failed.strerror or failed}): the events since "
                                       f"then are not in it; every delivery was refused "
                                       f"meanwhile"})
                self.sync()
                if self.signer is not None:
                    self.checkpoint("resumed")
            except OSError as exc:
                # (line/prev stay as the file was read: the next attempt re-reads it)
                self.failed, self.failed_at = exc, failed_at
                if exc is not self._write_error:
                    self._write_error = None
                else:
                    self._own_fragment = True
                return False
            self.failed_at_last, self.failed_at = failed_at, None
            return True

    def refusal(self) -> str:
        """Why deliveries must be refused now ("" if none): a log that failed drops
        every line, and no delivery may be acknowledged without its line."""
        failed = self.failed
        if failed is None:
            return ""
        if self.resumable():
            return (f"the audit log {self.path} cannot be written "
                    f"({failed.strerror or failed}): deliveries are refused until it can "
                    f"(free space: linkd carries on by itself)")
        return (f"the audit log {self.path} cannot be written ({failed.strerror or failed}): "
                f"deliveries are refused until it can (free space, then restart linkd)")

    def close(self) -> None:
        with self.lock:
            if self.fd < 0:
                return
            try:
                self.checkpoint("shutdown")
                self.sync()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1




_ROTATED = re.compile(r"audit-(\d{12})\.jsonl\Z")


def rotated_files(folder: Path) -> list[Path]:
    try:
        names = sorted(n for n in os.listdir(folder) if _ROTATED.match(n))
    except FileNotFoundError:
        return []
    return [Path(folder) / n for n in names]


# -- verification -----------------------------------------------------------------

@dataclasses.dataclass
class Verdict:
    ok: bool
    message: str
    lines: int = 0
    node: str | None = None


@dataclasses.dataclass
class _Chain:
    lines: int = 0
    node: str | None = None
    last_checkpoint: str = "none"
    by_number: dict[int, str] = dataclasses.field(default_factory=dict)  # line -> hash
    first: int = 1
    signed_through: int | None = None           # the last checkpoint's line number
    # the certificates that signed checkpoints, with the times of the first and the
    # last checkpoint each signed
    signers: dict[str, tuple[x509.Certificate, str, str]] = dataclasses.field(
        default_factory=dict)
    bundle: bool = False                        # an export bundle: a slice, not a whole log


EXPORT_FORMAT = "linkd-audit-export/1"


def _bundle(data: bytes) -> tuple[bytes, dict[str, x509.Certificate]] | None:
    """An export bundle (cli/evidence_cmd.py): its lines, and the certificates of the
    audit_key lines before its slice."""
    if not data.startswith(b"{") or EXPORT_FORMAT.encode() not in data[:200]:
        return None
    try:
        doc = json.loads(data)
        lines = [str(x).encode("utf-8") for x in doc["lines"]]
        certs = {}
        for raw in doc.get("keys", []):
            cert = x509.load_pem_x509_certificate(str(json.loads(raw)["cert"]).encode())
            certs[keys.cert_sha256(keys.der(cert))] = cert
    except (ValueError, KeyError, TypeError):
        return None
    return b"".join(line + b"\n" for line in lines), certs


def _parse(raw: bytes, where: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None, f"{where}: not valid JSON (edited or cut short)"
    if not isinstance(obj, dict) or not isinstance(obj.get("line"), int) \
            or not isinstance(obj.get("prev"), str):
        return None, f"{where}: not an audit line (no line number or prev hash)"
    return obj, None


def verify_chain(files: list[Path], extra_certs: dict[str, x509.Certificate] | None = None,
                 ) -> tuple[Verdict, _Chain]:
    """Check one node's log (its files in order). The first problem wins."""
    chain = _Chain()
    certs: dict[str, x509.Certificate] = dict(extra_certs or {})
    expected_prev: str | None = None
    expected_line: int | None = None
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return Verdict(False, f"cannot read {path}: {exc.strerror or exc}"), chain
        bundle = _bundle(data)
        if bundle is not None:
            data, bundle_certs = bundle
            certs.update(bundle_certs)
            chain.bundle = True
        if data and not data.endswith(b"\n"):
            n = data.count(b"\n") + 1
            return Verdict(False, f"{path}: line {n}: cut short (no newline at its end)"), chain
        # a bundle (audit export) is JSON: its lines are counted as entries, each
        # named with its audit line number too (a position alone misled: off by the
        # slice's start)
        kind = "entry" if bundle is not None else "line"
        for n, raw in enumerate(data.split(b"\n")[:-1], start=1):
            where = f"{path}: {kind} {n}"
            obj, problem = _parse(raw, where)
            if obj is None:
                return Verdict(False, problem or where), chain
            number = obj["line"]
            if bundle is not None:
                where += f" (audit line {number})"
            if expected_line is None:
                expected_line, expected_prev = number, obj["prev"]
                chain.first = number
                if number == 1 and obj["prev"] != ZERO:
                    return Verdict(False, f"{where}: the first line must have prev = 64 zeros "
                                          f"(lines were deleted before it)"), chain
            if number != expected_line:
                if number > expected_line:
                    what = (f"lines before it were deleted, or it was moved (expected line "
                            f"{expected_line}, found {number})")
                else:
                    what = (f"inserted or out of order (expected line {expected_line}, "
                            f"found {number})")
                return Verdict(False, f"{where}: {what}"), chain
            if obj["prev"] != expected_prev:
                before = f"line {n - 1} of the file" if bundle is None else \
                    f"entry {n - 1}, audit line {number - 1},"
                return Verdict(False, f"{where}: does not chain to the line before it "
                                      f"({before} was edited, or lines were inserted, "
                                      f"deleted or reordered there)"), chain
            h = line_hash(raw)
            event = obj.get("event")
            if event == "audit_key":
                pem = obj.get("cert")
                try:
                    cert = x509.load_pem_x509_certificate(str(pem).encode("ascii"))
                except ValueError:
                    return Verdict(False, f"{where}: audit_key holds no certificate"), chain
                sha = keys.cert_sha256(keys.der(cert))
                if sha != obj.get("cert_sha256"):
                    return Verdict(False, f"{where}: audit_key certificate does not match "
                                          f"its cert_sha256"), chain
                certs[sha] = cert
                chain.node = chain.node or obj.get("node")
            elif event == "audit_checkpoint":
                signer = obj.get("signer")
                signing = certs.get(str(signer))
                if signing is None:
                    return Verdict(False, f"{where}: checkpoint signed by certificate "
                                          f"{str(signer)[:16]}…, which this log does not "
                                          f"carry"), chain
                problem = checkpoint_problem(obj, signing)
                if problem:
                    return Verdict(False, f"{where}: {problem}"), chain
                chain.last_checkpoint = f"line {number} at {obj.get('timestamp')}"
                chain.signed_through = number
                stamp = str(obj.get("timestamp"))
                first = chain.signers.get(str(signer), (signing, stamp, stamp))[1]
                chain.signers[str(signer)] = (signing, first, stamp)
                chain.node = chain.node or obj.get("node")
            chain.by_number[number] = h
            expected_prev, expected_line = h, number + 1
            chain.lines += 1
    return Verdict(True, "", chain.lines, chain.node), chain


def verify(files: list[Path], peer_files: list[Path] | None = None,
           extra_certs: dict[str, x509.Certificate] | None = None,
           anchors: list[x509.Certificate] | None = None) -> Verdict:
    """Verify a node's log (or a bundle); `peer_files`: the peer's, for its witnesses;
    `anchors`: the link CA, which must have issued every certificate that signed a
    checkpoint (a log is otherwise only consistent with itself: anyone can make one
    that verifies, signed with a key of their own). The message says who signed and
    which lines no signature covers yet."""
    verdict, chain = verify_chain(files, extra_certs)
    if not verdict.ok:
        return verdict
    if anchors is not None:
        if not chain.signers:
            return Verdict(False, "no checkpoint in the log: nothing in it is signed, so "
                                  "nothing can be checked against the CA")
        for cert, first_at, last_at in chain.signers.values():
            for stamp in (first_at, last_at):   # valid from its first signature to its last
                try:
                    at = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                except ValueError:
                    at = dt.datetime.now(dt.UTC)
                problem = keys.chain_problem(cert, [], anchors, at)
                if problem:
                    return Verdict(False, f"checkpoints signed by {_who(cert)}: {problem}")
    if peer_files:
        peer_verdict, _peer = verify_chain(peer_files)
        if not peer_verdict.ok:
            return Verdict(False, f"peer log: {peer_verdict.message}")
        problem = _witness_problem(chain, peer_files)
        if problem:
            return Verdict(False, problem)
    message = f"audit log OK: {chain.lines} lines, last checkpoint {chain.last_checkpoint}"
    last = chain.first + chain.lines - 1
    through = chain.signed_through
    if through is None:
        message += "; no line is signed (no checkpoint)"
    elif through < last:
        message += (f"; lines {through + 1}-{last} after it are not signed yet (no "
                    f"checkpoint covers them: they prove nothing until one does)")
    if chain.signers:
        message += "; signed by " + ", ".join(sorted({_who(c) for c, _, _ in
                                                     chain.signers.values()}))
        if anchors is None:
            message += " (not checked against a CA: give --ca)"
    return Verdict(True, message, chain.lines, chain.node)


def _who(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} (issued by {cert.issuer.rfc4514_string()})"


def _witness_problem(chain: _Chain, peer_files: list[Path]) -> str | None:
    last = chain.first + chain.lines - 1
    for path in peer_files:
        for n, raw in enumerate(path.read_bytes().split(b"\n")[:-1], start=1):
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(obj, dict) or obj.get("event") != "audit_witness":
                continue
            ck = obj.get("checkpoint")
            if not isinstance(ck, dict) or ck.get("node") != chain.node:
                continue
            number = ck.get("line")
            if not isinstance(number, int):
                continue
            if number > last:
                if chain.bundle:
                    continue        # a slice ends where it was cut: not a cut tail
                return (f"tail cut: {path} line {n} witnessed our line {number} (checkpoint "
                        f"of {ck.get('timestamp')}), but the log ends at line {last}")
            want = chain.by_number.get(number)
            raw_ck = json.dumps(ck, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            if want is not None and want != line_hash(raw_ck):
                return (f"line {number}: differs from the checkpoint the peer witnessed "
                        f"({path} line {n})")
    return None


# -- the daemon's one audit log (installed by the daemon; None in unit tests) ---------

_CURRENT: AuditLog | None = None


def install(log: AuditLog | None) -> None:
    global _CURRENT
    _CURRENT = log


def current() -> AuditLog | None:
    return _CURRENT


def sink(event: Mapping[str, object]) -> None:
    """The structlog hook (log.py): record an audit event in the installed log."""
    log = _CURRENT
    if log is not None:
        log.record(event)


def sink_many(events: list[Mapping[str, object]]) -> None:
    """The same for a batch of events (log.info_many): one write for all."""
    log = _CURRENT
    if log is not None and events:
        log.record_many(events)
