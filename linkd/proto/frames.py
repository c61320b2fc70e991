"""The closed vocabulary of wire frames, and their one encoder/decoder.

Every frame body is one msgpack map whose key ``"t"`` names the type
(CONTRACT §9). Decoding is strict about what we rely on and lenient about
what we do not: every field we read is type- and range-checked (a violation
raises RemoteProtocolError, which closes the session), unknown extra keys are
ignored so that a later minor version may add fields.

Short keys keep the per-chunk overhead small; docs/PROTOCOL.md is the
reference for each field. (A little over 400 lines on purpose: each frame's
record, encoding and checks are read together when a field changes.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from ..errors import LocalProtocolError, RemoteProtocolError
from ..names import is_channel_name, is_node_name, plain_name_problem

PROTOCOL_VERSION = 2
MAX_DATA = 256 * 1024          # payload of one data frame
MAX_SEQ = (1 << 53) - 1        # sequence numbers stay exact in JSON and far below u64
MAX_ACK_ENTRIES = 1024         # entries in one ack frame
MAX_REASON_CHARS = 1000
MAX_U64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelHello:
    """What one side says about a channel in its hello.

    `max` is the largest message it accepts on the channel; `committed` the
    highest sequence it has durably delivered from this peer; `resume` the
    (seq, offset) of a checkpointed partial it can continue; `credit` the
    initial number of data bytes the peer may send before more is granted.
    """

    name: str
    max: int
    priority: int = 0
    committed: int = 0
    resume: tuple[int, int] | None = None
    credit: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    version: int
    node: str
    channels: tuple[ChannelHello, ...]
    checkpoint: bytes | None = None     # optional `ck`: the sender's latest audit checkpoint
    # optional `lh`: we accept a Msg without its SHA-256, which a Sum frame then brings
    # after the message's last byte (a big file is sent while it is still being hashed)
    late_hash: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Bye:
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Pong:
    id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Msg:
    """Start (or, with offset > 0, resume) message `seq` on channel `ch`.

    `rewind` marks the first message sent after a Nack on the channel: the
    receiver discards every frame of the channel between its Nack and this.
    `sha256` None (only to a peer whose hello says `late_hash`): a Sum frame
    brings it after the message's last data byte.
    """

    ch: str
    seq: int
    name: str
    size: int
    sha256: bytes | None
    offset: int = 0
    rewind: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Data:
    """The next bytes of message `seq`. Decoded from the wire, `data` is a read-only
    view of the frame's own buffer (framing.py: no copy after the one out of the
    TLS layer); it compares equal to the same bytes."""

    ch: str
    seq: int
    data: bytes | memoryview


@dataclasses.dataclass(frozen=True, slots=True)
class Sum:
    """The SHA-256 of message `seq`, whose Msg did not carry it: sent after the
    message's last data byte, before anything else of the channel."""

    ch: str
    seq: int
    sha256: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class AckEntry:
    """The receiver holds message `seq` durably, with exactly this content: the
    sender resolves its queued file only if every field matches it (an ack is
    evidence, not a number). `delivered_at` is seconds since the epoch."""

    seq: int
    sha256: bytes
    size: int
    sent_name: str
    name: str
    delivered_at: float
    # The signed receipt (docs/EVIDENCE.md): the signature over the batch's Merkle
    # root, this receipt's index and inclusion path in a tree of `batch` receipts,
    # and the SHA-256 of the signing certificate. Optional on the wire; linkd always
    # sends them and requires them.
    sig: bytes = b""
    index: int = 0
    batch: int = 0
    path: tuple[bytes, ...] = ()
    signer: bytes = b""


MAX_SIG_BYTES = 1024          # an RSA-8192 signature is 1024 bytes
MAX_PATH = 64                 # inclusion path of a receipt (a tree of at most 2^64 leaves)


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """The sender's latest signed audit checkpoint (one line of its audit log, as
    written), for the receiver to witness (docs/EVIDENCE.md)."""

    line: bytes


MAX_CHECKPOINT = 16 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledges each listed message of `ch` (not cumulative)."""

    ch: str
    entries: tuple[AckEntry, ...]


NACK_RETRY = ""        # kinds of Nack: an ordinary refusal (see `retry`)
NACK_BUSY = "busy"     # a resource problem on the receiver: send again after `wait`, not counted
NACK_STALE = "stale"   # seq is at or below the receiver's committed seq and it cannot say
                       # what it holds there: the sender must renumber the file


@dataclasses.dataclass(frozen=True, slots=True)
class Nack:
    """Message `seq` of `ch` was not accepted. `retry`: send it again (from
    a Msg with rewind); otherwise the refusal is final. `kind` refines it
    (NACK_BUSY, NACK_STALE); `wait` is the seconds to wait before a resend;
    `resume` (busy only): the receiver holds the first `resume` bytes of `seq`
    durably, so the resend may start there (as a hello's resume point)."""

    ch: str
    seq: int
    reason: str
    retry: bool
    kind: str = NACK_RETRY
    wait: float = 0.0
    resume: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Credit:
    ch: str
    bytes: int


Frame = Hello | Bye | Ping | Pong | Msg | Data | Sum | Ack | Nack | Credit | Checkpoint


# -- encoding ---------------------------------------------------------------

def _channel_hello(c: ChannelHello) -> dict[str, Any]:
    return {"n": c.name, "max": c.max, "p": c.priority, "c": c.committed,
            "r": list(c.resume) if c.resume else None, "cr": c.credit}


def _ack_entry_map(e: AckEntry) -> dict[str, Any]:
    m: dict[str, Any] = {"s": e.seq, "h": e.sha256, "z": e.size, "n": e.sent_name, "d": e.name,
                         "at": e.delivered_at}
    if e.sig:
        m.update(rs=e.sig, ri=e.index, rn=e.batch, rp=list(e.path), rc=e.signer)
    return m


def frame_to_map(frame: Frame) -> dict[str, Any]:
    if isinstance(frame, Data):
        return {"t": "data", "ch": frame.ch, "s": frame.seq, "d": frame.data}
    if isinstance(frame, Msg):
        msg = {"t": "msg", "ch": frame.ch, "s": frame.seq, "n": frame.name, "z": frame.size,
               "h": frame.sha256, "o": frame.offset, "rw": frame.rewind}
        if frame.sha256 is None:
            del msg["h"]
        return msg
    if isinstance(frame, Sum):
        return {"t": "sum", "ch": frame.ch, "s": frame.seq, "h": frame.sha256}
    if isinstance(frame, Ack):
        return {"t": "ack", "ch": frame.ch, "a": [_ack_entry_map(e) for e in frame.entries]}
    if isinstance(frame, Checkpoint):
        return {"t": "ckpt", "c": frame.line}
    if isinstance(frame, Credit):
        return {"t": "credit", "ch": frame.ch, "b": frame.bytes}
    if isinstance(frame, Nack):
        m = {"t": "nack", "ch": frame.ch, "s": frame.seq, "why": frame.reason,
             "retry": frame.retry}
        if frame.kind:
            m["k"] = frame.kind
        if frame.wait:
            m["w"] = frame.wait
        if frame.resume is not None:
            m["r"] = frame.resume
        return m
    if isinstance(frame, Ping):
        return {"t": "ping", "id": frame.id}
    if isinstance(frame, Pong):
        return {"t": "pong", "id": frame.id}
    if isinstance(frame, Hello):
        hello = {"t": "hello", "v": frame.version, "node": frame.node,
                 "ch": [_channel_hello(c) for c in frame.channels]}
        if frame.checkpoint is not None:
            hello["ck"] = frame.checkpoint
        if frame.late_hash:
            hello["lh"] = True
        return hello
    if isinstance(frame, Bye):
        return {"t": "bye", "why": frame.reason}
    raise LocalProtocolError(f"not a frame: {frame!r}")


def encode_body(frame: Frame) -> bytes:
    body: bytes = msgpack.packb(frame_to_map(frame), use_bin_type=True)
    return body


def encode_data_head(ch: str, seq: int, size: int) -> bytes:
    """The bytes of encode_body(Data(ch, seq, d)) that come before `d` (of `size`
    bytes; it is the last field): the sender appends the payload to its output
    itself, so that msgpack does not copy it first."""
    fields: bytes = msgpack.packb({"t": "data", "ch": ch, "s": seq}, use_bin_type=True)
    if size < 0x100:
        tag = b"\xc4" + size.to_bytes(1, "big")
    elif size < 0x10000:
        tag = b"\xc5" + size.to_bytes(2, "big")
    else:
        tag = b"\xc6" + size.to_bytes(4, "big")
    return b"\x84" + fields[1:] + b"\xa1d" + tag


# -- decoding ---------------------------------------------------------------

def _get(m: dict[Any, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in m:
        raise RemoteProtocolError(f"{what} frame lacks field {key!r}")
    value = m[key]
    if isinstance(value, bool) and kind is not bool:
        raise RemoteProtocolError(f"{what} frame field {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise RemoteProtocolError(f"{what} frame field {key!r} has the wrong type")
    return value


def _uint(m: dict[Any, Any], key: str, what: str, low: int = 0, high: int = MAX_U64) -> int:
    value: int = _get(m, key, int, what)
    if not low <= value <= high:
        raise RemoteProtocolError(f"{what} frame field {key!r} out of range: {value}")
    return value


def _channel(m: dict[Any, Any], what: str) -> str:
    ch: str = _get(m, "ch", str, what)
    if not is_channel_name(ch):
        raise RemoteProtocolError(f"{what} frame names an invalid channel {ch[:80]!r}")
    return ch


def _reason(m: dict[Any, Any], what: str) -> str:
    reason: str = _get(m, "why", str, what)
    return reason[:MAX_REASON_CHARS]


def _decode_hello(m: dict[Any, Any]) -> Hello:
    version = _uint(m, "v", "hello", 0, 1 << 32)
    node: str = _get(m, "node", str, "hello")
    if not is_node_name(node):
        raise RemoteProtocolError(f"hello names an invalid node {node[:80]!r}")
    raw_channels = _get(m, "ch", list, "hello")
    if len(raw_channels) > 1024:
        raise RemoteProtocolError("hello lists more than 1024 channels")
    channels = []
    seen = set()
    for item in raw_channels:
        if not isinstance(item, dict):
            raise RemoteProtocolError("hello channel entry is not a map")
        name: str = _get(item, "n", str, "hello channel")
        if not is_channel_name(name) or name in seen:
            raise RemoteProtocolError(f"hello lists an invalid or repeated channel {name[:80]!r}")
        seen.add(name)
        resume_raw = item.get("r")
        resume: tuple[int, int] | None = None
        if resume_raw is not None:
            if (not isinstance(resume_raw, list) or len(resume_raw) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_U64
                               for x in resume_raw)):
                raise RemoteProtocolError(f"hello channel {name!r} has a malformed resume point")
            resume = (resume_raw[0], resume_raw[1])
        priority = item.get("p", 0)
        if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > 1 << 31:
            raise RemoteProtocolError(f"hello channel {name!r} has a malformed priority")
        channels.append(ChannelHello(
            name=name, max=_uint(item, "max", "hello channel"), priority=priority,
            committed=_uint(item, "c", "hello channel", 0, MAX_SEQ), resume=resume,
            credit=_uint(item, "cr", "hello channel")))
    checkpoint = m.get("ck")
    if checkpoint is not None and (not isinstance(checkpoint, bytes)
                                   or not 0 < len(checkpoint) <= MAX_CHECKPOINT):
        raise RemoteProtocolError("hello field 'ck' is not a checkpoint line")
    late_hash = m.get("lh", False)
    if not isinstance(late_hash, bool):
        raise RemoteProtocolError("hello field 'lh' has the wrong type")
    return Hello(version=version, node=node, channels=tuple(channels), checkpoint=checkpoint,
                 late_hash=late_hash)


def _decode_msg(m: dict[Any, Any]) -> Msg:
    name: str = _get(m, "n", str, "msg")
    problem = plain_name_problem(name)
    if problem:
        raise RemoteProtocolError(f"msg names a bad file: file name {problem}")
    sha = _sha256(m, "msg") if "h" in m else None
    size = _uint(m, "z", "msg")
    offset = _uint(m, "o", "msg")
    if offset > size:
        raise RemoteProtocolError(f"msg offset {offset} is beyond its size {size}")
    rewind = m.get("rw", False)
    if not isinstance(rewind, bool):
        raise RemoteProtocolError("msg field 'rw' has the wrong type")
    return Msg(ch=_channel(m, "msg"), seq=_uint(m, "s", "msg", 1, MAX_SEQ), name=name, size=size,
               sha256=sha, offset=offset, rewind=rewind)


def _sha256(m: dict[Any, Any], what: str) -> bytes:
    sha: bytes = _get(m, "h", bytes, what)
    if len(sha) != 32:
        raise RemoteProtocolError(f"{what} carries a SHA-256 that is not 32 bytes")
    return sha


def _receipt_fields(item: dict[Any, Any]) -> dict[str, Any]:
    """The optional signed-receipt fields of an ack entry (all or none)."""
    if "rs" not in item:
        return {}
    sig: bytes = _get(item, "rs", bytes, "ack entry")
    if not 1 <= len(sig) <= MAX_SIG_BYTES:
        raise RemoteProtocolError("ack entry receipt signature has a bad length")
    signer: bytes = _get(item, "rc", bytes, "ack entry")
    if len(signer) != 32:
        raise RemoteProtocolError("ack entry receipt signer is not a 32-byte SHA-256")
    batch = _uint(item, "rn", "ack entry", 1, MAX_SEQ)
    index = _uint(item, "ri", "ack entry", 0, batch - 1)
    path = _get(item, "rp", list, "ack entry")
    if len(path) > MAX_PATH or not all(isinstance(p, bytes) and len(p) == 32 for p in path):
        raise RemoteProtocolError("ack entry receipt path is not a list of 32-byte hashes")
    return {"sig": sig, "signer": signer, "batch": batch, "index": index, "path": tuple(path)}


def _decode_ack(m: dict[Any, Any]) -> Ack:
    raw = _get(m, "a", list, "ack")
    if not 1 <= len(raw) <= MAX_ACK_ENTRIES:
        raise RemoteProtocolError(f"ack lists {len(raw)} entries (1..{MAX_ACK_ENTRIES})")
    entries = []
    for item in raw:
        if not isinstance(item, dict):
            raise RemoteProtocolError("ack entry is not a map")
        sha: bytes = _get(item, "h", bytes, "ack entry")
        if len(sha) != 32:
            raise RemoteProtocolError("ack entry carries a SHA-256 that is not 32 bytes")
        names = []
        for key in ("n", "d"):
            name: str = _get(item, key, str, "ack entry")
            problem = plain_name_problem(name)
            if problem:
                raise RemoteProtocolError(f"ack entry names a bad file: file name {problem}")
            names.append(name)
        at = _get(item, "at", (int, float), "ack entry")
        if not 0 <= at < 1e11:
            raise RemoteProtocolError("ack entry field 'at' out of range")
        entries.append(AckEntry(seq=_uint(item, "s", "ack entry", 1, MAX_SEQ), sha256=sha,
                                size=_uint(item, "z", "ack entry"), sent_name=names[0],
                                name=names[1], delivered_at=float(at), **_receipt_fields(item)))
    return Ack(ch=_channel(m, "ack"), entries=tuple(entries))


def _decode_data(m: dict[Any, Any]) -> Data:
    payload: bytes | memoryview = _get(m, "d", (bytes, memoryview), "data")
    if len(payload) > MAX_DATA:
        raise RemoteProtocolError(f"data frame carries {len(payload)} bytes "
                                  f"(at most {MAX_DATA})")
    return Data(ch=_channel(m, "data"), seq=_uint(m, "s", "data", 1, MAX_SEQ), data=payload)


def map_to_frame(m: Any) -> Frame:
    if not isinstance(m, dict):
        raise RemoteProtocolError("frame body is not a msgpack map")
    kind = m.get("t")
    if not isinstance(kind, str):
        raise RemoteProtocolError("frame has no string type key 't'")
    if kind == "data":
        return _decode_data(m)
    if kind == "msg":
        return _decode_msg(m)
    if kind == "ack":
        return _decode_ack(m)
    if kind == "sum":
        return Sum(ch=_channel(m, "sum"), seq=_uint(m, "s", "sum", 1, MAX_SEQ),
                   sha256=_sha256(m, "sum"))
    if kind == "credit":
        return Credit(ch=_channel(m, "credit"), bytes=_uint(m, "b", "credit", 0, 1 << 40))
    if kind == "nack":
        retry = _get(m, "retry", bool, "nack")
        nack_kind = m.get("k", NACK_RETRY)
        if nack_kind not in (NACK_RETRY, NACK_BUSY, NACK_STALE):
            raise RemoteProtocolError("nack field 'k' is not a known kind")
        wait = m.get("w", 0.0)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) \
                or not 0.0 <= wait <= 3600.0:
            raise RemoteProtocolError("nack field 'w' is not 0..3600 seconds")
        resume = _uint(m, "r", "nack") if m.get("r") is not None else None
        return Nack(ch=_channel(m, "nack"), seq=_uint(m, "s", "nack", 1, MAX_SEQ),
                    reason=_reason(m, "nack"), retry=retry, kind=nack_kind, wait=float(wait),
                    resume=resume)
    if kind == "ping":
        return Ping(id=_uint(m, "id", "ping"))
    if kind == "pong":
        return Pong(id=_uint(m, "id", "pong"))
    if kind == "hello":
        return _decode_hello(m)
    if kind == "bye":
        return Bye(reason=_reason(m, "bye"))
    if kind == "ckpt":
        line: bytes = _get(m, "c", bytes, "ckpt")
        if not 0 < len(line) <= MAX_CHECKPOINT:
            raise RemoteProtocolError("ckpt frame field 'c' has a bad length")
        return Checkpoint(line=line)
    raise RemoteProtocolError(f"unknown frame type {kind[:40]!r}")


# A data frame's payload is not copied out of its body: `_data_map` reads the simple
# maps our encoder writes (a fixmap of str keys whose values are str, unsigned ints
# or bin) and returns the bin values as read-only views of the body. Anything else
# (another shape, a limit, a malformed byte) returns None and takes the msgpack
# path, which decides - so both paths accept and refuse exactly the same bodies.
_FAST_MIN = 4096        # smaller bodies: msgpack's copy costs nothing worth a second path
_MAX_STR = 64 * 1024    # decode_body's max_str_len


def _data_map(body: bytes | bytearray, max_bin: int) -> dict[str, Any] | None:
    first = body[0]
    if not 0x80 <= first <= 0x8F:
        return None
    view = memoryview(body).toreadonly()
    end = len(body)
    pos = 1
    m: dict[str, Any] = {}
    for _ in range(first & 0x0F):
        if pos >= end or not 0xA0 <= body[pos] <= 0xBF:
            return None
        klen = body[pos] & 0x1F
        pos += 1 + klen
        if pos > end:
            return None
        try:
            key = str(view[pos - klen:pos], "utf-8")
            tag = body[pos]
            pos += 1
            value: Any
            if tag <= 0x7F:
                value = tag
            elif 0xA0 <= tag <= 0xBF or tag == 0xD9:
                if tag == 0xD9:
                    size, pos = body[pos], pos + 1
                else:
                    size = tag & 0x1F
                if pos + size > end or size > _MAX_STR:
                    return None
                value = str(view[pos:pos + size], "utf-8")
                pos += size
            elif 0xCC <= tag <= 0xCF:
                width = 1 << (tag - 0xCC)
                value = int.from_bytes(view[pos:pos + width], "big")
                pos += width
            elif 0xC4 <= tag <= 0xC6:
                width = 1 << (tag - 0xC4)
                size = int.from_bytes(view[pos:pos + width], "big")
                pos += width
                if pos + size > end or size > max_bin:
                    return None
                value = view[pos:pos + size]
                pos += size
            else:
                return None
        except (IndexError, UnicodeDecodeError):
            return None
        if pos > end:
            return None
        m[key] = value
    return m if pos == end and m.get("t") == "data" else None


def decode_body(body: bytes | bytearray, max_bin: int) -> Frame:
    if len(body) >= _FAST_MIN:
        fast = _data_map(body, max_bin)
        if fast is not None:
            return _decode_data(fast)
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                            max_bin_len=max_bin, max_str_len=_MAX_STR,
                            max_array_len=4096, max_map_len=64, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData,
            RecursionError) as exc:
        raise RemoteProtocolError(f"frame body is not valid msgpack: {exc}") from None
    return map_to_frame(m)
