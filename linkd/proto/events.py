"""The events the session hands its owner (h11's events, h2's events.py).

Theory of operation
-------------------
`Session.receive_data` and `Session.handle_timer` return lists of these,
in the order the peer's frames (or the deadlines) produced them. Each is a
frozen record of something that already happened to the protocol state; the
owner acts on it (writes the spool, resolves a queued file, logs) and tells
the session what it did through the session's methods. `SessionClosed` is
always the last event of a session.
"""

from __future__ import annotations

import dataclasses

from . import frames as F


@dataclasses.dataclass(frozen=True, slots=True)
class PeerHello:
    hello: F.Hello


@dataclasses.dataclass(frozen=True, slots=True)
class MessageStart:
    ch: str
    seq: int
    name: str
    size: int
    sha256: bytes | None          # None: a Sum frame brings it (MessageComplete.sha256)
    offset: int
    rewind: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class MessageData:
    ch: str
    seq: int
    offset: int
    data: bytes | memoryview     # a read-only view of the frame's buffer (frames.Data)


@dataclasses.dataclass(frozen=True, slots=True)
class MessageComplete:
    ch: str
    seq: int
    sha256: bytes | None = None   # from the Sum frame, when the Msg did not carry it


@dataclasses.dataclass(frozen=True, slots=True)
class AckReceived:
    """The peer acknowledges these messages of `ch`, each of which we had put on
    the wire in this session (the session checks that); the owner still has to
    check that each entry names the content it sent."""

    ch: str
    entries: tuple[F.AckEntry, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class NackReceived:
    ch: str
    seq: int
    reason: str
    retry: bool
    kind: str = F.NACK_RETRY
    wait: float = 0.0
    resume: int | None = None       # busy: the receiver's durable offset of `seq`


@dataclasses.dataclass(frozen=True, slots=True)
class CreditReceived:
    ch: str
    bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class RttMeasured:
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class SessionClosed:
    """The session is over. `error` is False for a peer's goodbye or our own close."""

    reason: str
    error: bool
    by_peer: bool


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointReceived:
    """The peer sent its latest signed audit checkpoint (evidence: to be witnessed)."""

    line: bytes


# The events of one incoming message, in order: what the owner applies to its spool.
MessageEvent = MessageStart | MessageData | MessageComplete

Event = (PeerHello | MessageStart | MessageData | MessageComplete | AckReceived | NackReceived
         | CreditReceived | RttMeasured | SessionClosed | CheckpointReceived)
