"""Session: one linkd session over one byte stream, with no I/O.

Theory of operation
-------------------
Bytes from the peer go in through `receive_data(data, now)`, which returns
events; bytes for the peer come out of `data_to_send(now)`; time goes in
through `handle_timer(now)` at `get_timer()`. The owner (linkd.net) moves the
bytes and acts on the events; the session decides everything that is pure
protocol:

* States: HANDSHAKE (our hello is queued; the peer's has not arrived),
  OPEN, CLOSED. The first peer frame must be a hello naming the expected
  node and our protocol version, within `handshake_timeout`.
* Each side is sender and receiver at once. As *receiver* the session tracks
  per channel the message in progress (seq, size, offset) and checks every
  data frame against it and against the credit we granted. After we Nack a
  message, every frame of that channel is discarded (and its credit given
  back) until the sender's next Msg marked `rewind`.
* As *sender* it spends the credit the peer grants, refuses (locally) to
  send more data than announced, and marks the first Msg after a Nack as
  `rewind`.
* Heartbeats (linkd.proto.heartbeat): a ping after `heartbeat_interval` of
  send-idleness, death after `heartbeat_timeout` of receive-silence.
* Control frames (acks, credit, pings, pongs, nacks, bye) are queued ahead of
  bulk frames (msg, data) so they are never starved by a big transfer.

Any violation by the peer raises nothing out of `receive_data`: the session
queues a bye with the reason, moves to CLOSED and returns SessionClosed.
"""

from __future__ import annotations

import dataclasses
import enum

from ..errors import LocalProtocolError, RemoteProtocolError
from . import frames as F
from .flow import ReceiveWindow, SendWindow
from .framing import CHUNK_SIZE, DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from .heartbeat import Heartbeat


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


# -- events -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class PeerHello:
    hello: F.Hello


@dataclasses.dataclass(frozen=True, slots=True)
class MessageStart:
    ch: str
    seq: int
    name: str
    size: int
    sha256: bytes
    offset: int
    rewind: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class MessageData:
    ch: str
    seq: int
    offset: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class MessageComplete:
    ch: str
    seq: int


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


Event = (PeerHello | MessageStart | MessageData | MessageComplete | AckReceived | NackReceived
         | CreditReceived | RttMeasured | SessionClosed | CheckpointReceived)


@dataclasses.dataclass(slots=True)
class _Incoming:
    seq: int
    size: int
    offset: int


@dataclasses.dataclass(slots=True)
class _Outgoing:
    seq: int
    remaining: int


def named_reason(reason: str) -> str:
    """Every bye and violation names the rule broken: never an empty reason, nor one
    whose detail is empty ("frame body is not valid msgpack: ")."""
    text = reason.strip()
    if not text:
        return "no reason given"
    return f"{text} (no detail)" if text.endswith(":") else text


def _theirs(reason: str) -> str:
    return reason if reason.strip() else "(the peer gave no reason)"


def check_hello(frame: F.Frame, peer: str) -> None:
    """Raise RemoteProtocolError unless `frame` is a hello from `peer` in our version
    (also used before a session exists: a replacement is validated first)."""
    if not isinstance(frame, F.Hello):
        raise RemoteProtocolError(f"expected hello, got {type(frame).__name__.lower()}")
    if frame.version != F.PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {frame.version} "
                                  f"(this linkd speaks {F.PROTOCOL_VERSION})")
    if frame.node != peer:
        raise RemoteProtocolError(f"hello names node {frame.node!r}, expected {peer!r}")


class Session:
    def __init__(self, *, node: str, peer: str, channels: list[F.ChannelHello], now: float,
                 heartbeat_interval: float = 5.0, heartbeat_timeout: float = 15.0,
                 handshake_timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME,
                 checkpoint: bytes | None = None) -> None:
        self.node = node
        self.peer = peer
        self.state = State.HANDSHAKE
        self.local_channels = {c.name: c for c in channels}
        self.peer_hello: F.Hello | None = None
        self.peer_channels: dict[str, F.ChannelHello] = {}
        self.close_reason: str | None = None
        self._decoder = FrameDecoder(max_frame)
        self._control = bytearray()
        self._bulk = bytearray()
        self._handshake_deadline = now + handshake_timeout
        self.heartbeat = Heartbeat(heartbeat_interval, heartbeat_timeout, now)
        # receiver side
        self._recv_windows = {c.name: ReceiveWindow(c.credit) for c in channels}
        self._incoming: dict[str, _Incoming] = {}
        self._discarding: set[str] = set()
        self._regrant: dict[str, int] = {}
        # sender side
        self._send_windows: dict[str, SendWindow] = {}
        self._outgoing: dict[str, _Outgoing] = {}
        self._rewind: set[str] = set()
        self._on_wire: dict[str, set[int]] = {}   # msgs sent and neither acked nor nacked
        self._queue(F.Hello(F.PROTOCOL_VERSION, node, tuple(channels), checkpoint), control=True)

    # -- output ---------------------------------------------------------------

    def _queue(self, frame: F.Frame, control: bool) -> None:
        (self._control if control else self._bulk).extend(encode_frame(frame))

    def data_to_send(self, now: float) -> bytes:
        for ch, n in self._regrant.items():
            if n:
                self._queue(F.Credit(ch, n), control=True)
                self._recv_windows[ch].grant(n)
        self._regrant.clear()
        if not self._control and not self._bulk:
            return b""
        out = bytes(self._control) + bytes(self._bulk)
        self._control.clear()
        self._bulk.clear()
        self.heartbeat.sent(now)
        return out

    @property
    def pending_output(self) -> int:
        return len(self._control) + len(self._bulk)

    # -- timers ---------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self.state is State.HANDSHAKE:
            return self._handshake_deadline
        if self.state is State.OPEN:
            return self.heartbeat.next_deadline()
        return None

    def handle_timer(self, now: float) -> list[Event]:
        if self.state is State.HANDSHAKE and now >= self._handshake_deadline:
            return [self._fail("handshake timeout: no hello from the peer", by_peer=True)]
        if self.state is State.OPEN:
            if self.heartbeat.is_dead(now):
                silent = now - self.heartbeat.last_received
                return [self._fail(f"heartbeat timeout: nothing received for {silent:.1f}s",
                                   by_peer=True)]
            if now >= self.heartbeat.ping_due():
                self._queue(F.Ping(self.heartbeat.make_ping(now)), control=True)
                self.heartbeat.sent(now)
        return []

    # -- closing --------------------------------------------------------------

    def _fail(self, reason: str, *, by_peer: bool) -> SessionClosed:
        reason = named_reason(reason)
        if self.state is not State.CLOSED:
            self._queue(F.Bye(reason), control=True)
            self.state = State.CLOSED
            self.close_reason = reason
        return SessionClosed(reason, error=True, by_peer=by_peer)

    def close(self, reason: str) -> None:
        """A clean goodbye from our side (shutdown, reload)."""
        reason = named_reason(reason)
        if self.state is not State.CLOSED:
            self._queue(F.Bye(reason), control=True)
            self.state = State.CLOSED
            self.close_reason = reason

    # -- input ----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        if not data:
            return [self._fail("connection closed by the peer without a goodbye", by_peer=True)]
        self.heartbeat.received(now)
        try:
            self._decoder.feed(data)
            while self.state is not State.CLOSED:  # type: ignore[comparison-overlap]
                frame = self._decoder.next_frame()
                if frame is None:
                    break
                self._handle(frame, now, events)
        except RemoteProtocolError as exc:
            events.append(self._fail(f"protocol violation: {exc}", by_peer=True))
        return events

    def _handle(self, frame: F.Frame, now: float, events: list[Event]) -> None:
        if self.state is State.HANDSHAKE:
            if not isinstance(frame, F.Hello):
                if isinstance(frame, F.Bye):
                    self.state = State.CLOSED
                    self.close_reason = frame.reason
                    events.append(SessionClosed(f"refused by the peer: {_theirs(frame.reason)}",
                                                error=True, by_peer=True))
                    return
                raise RemoteProtocolError(f"expected hello, got {type(frame).__name__.lower()}")
            self._handle_hello(frame, events)
            return
        kind = type(frame)
        if kind is F.Data:
            self._handle_data(frame, events)  # type: ignore[arg-type]
        elif kind is F.Msg:
            self._handle_msg(frame, events)  # type: ignore[arg-type]
        elif kind is F.Ack:
            assert isinstance(frame, F.Ack)
            self._sending_channel(frame.ch, "ack")
            on_wire = self._on_wire.get(frame.ch, set())
            for entry in frame.entries:
                if entry.seq not in on_wire:
                    raise RemoteProtocolError(f"ack for message {entry.seq} on {frame.ch!r}, "
                                              f"which is not in flight")
                on_wire.discard(entry.seq)
            events.append(AckReceived(frame.ch, frame.entries))
        elif kind is F.Credit:
            assert isinstance(frame, F.Credit)
            self._sending_channel(frame.ch, "credit").grant(frame.bytes)
            events.append(CreditReceived(frame.ch, frame.bytes))
        elif kind is F.Nack:
            assert isinstance(frame, F.Nack)
            self._sending_channel(frame.ch, "nack")
            on_wire = self._on_wire.get(frame.ch, set())
            if frame.seq not in on_wire:
                raise RemoteProtocolError(f"nack for message {frame.seq} on {frame.ch!r}, "
                                          f"which is not in flight")
            # The receiver discards everything of the channel after a nack: the nacked
            # message and those sent after it are no longer on the wire.
            self._on_wire[frame.ch] = {s for s in on_wire if s < frame.seq}
            self._outgoing.pop(frame.ch, None)
            self._rewind.add(frame.ch)
            events.append(NackReceived(frame.ch, frame.seq, frame.reason, frame.retry,
                                       frame.kind, frame.wait))
        elif kind is F.Ping:
            assert isinstance(frame, F.Ping)
            self._queue(F.Pong(frame.id), control=True)
        elif kind is F.Pong:
            assert isinstance(frame, F.Pong)
            rtt = self.heartbeat.pong(frame.id, now)
            if rtt is not None:
                events.append(RttMeasured(rtt))
        elif kind is F.Bye:
            assert isinstance(frame, F.Bye)
            self.state = State.CLOSED
            self.close_reason = frame.reason
            events.append(SessionClosed(f"peer said goodbye: {_theirs(frame.reason)}", error=False,
                                        by_peer=True))
        elif kind is F.Checkpoint:
            assert isinstance(frame, F.Checkpoint)
            events.append(CheckpointReceived(frame.line))
        elif kind is F.Hello:
            raise RemoteProtocolError("second hello")

    def _handle_hello(self, hello: F.Hello, events: list[Event]) -> None:
        check_hello(hello, self.peer)
        self.peer_hello = hello
        self.peer_channels = {c.name: c for c in hello.channels}
        self._send_windows = {c.name: SendWindow(c.credit) for c in hello.channels}
        self.state = State.OPEN
        events.append(PeerHello(hello))

    def _sending_channel(self, ch: str, what: str) -> SendWindow:
        window = self._send_windows.get(ch)
        if window is None:
            raise RemoteProtocolError(f"{what} for channel {ch!r}, which the peer did not offer")
        return window

    def _receiving_channel(self, ch: str, what: str) -> None:
        if ch not in self.local_channels:
            raise RemoteProtocolError(f"{what} on channel {ch!r}, which is not configured for "
                                      f"peer {self.peer}")

    def _handle_msg(self, msg: F.Msg, events: list[Event]) -> None:
        self._receiving_channel(msg.ch, "msg")
        if msg.ch in self._discarding:
            if not msg.rewind:
                return
            self._discarding.discard(msg.ch)
        current = self._incoming.get(msg.ch)
        if current is not None and current.offset < current.size and not msg.rewind:
            raise RemoteProtocolError(f"msg {msg.seq} on {msg.ch!r} starts before message "
                                      f"{current.seq} is complete")
        self._incoming[msg.ch] = _Incoming(msg.seq, msg.size, msg.offset)
        events.append(MessageStart(msg.ch, msg.seq, msg.name, msg.size, msg.sha256, msg.offset,
                                   msg.rewind))
        if msg.offset == msg.size:
            events.append(MessageComplete(msg.ch, msg.seq))

    def _handle_data(self, frame: F.Data, events: list[Event]) -> None:
        self._receiving_channel(frame.ch, "data")
        n = len(frame.data)
        self._recv_windows[frame.ch].consume(n)
        if frame.ch in self._discarding:
            self._regrant[frame.ch] = self._regrant.get(frame.ch, 0) + n
            return
        current = self._incoming.get(frame.ch)
        if current is None or current.seq != frame.seq:
            raise RemoteProtocolError(f"data for message {frame.seq} on {frame.ch!r}, "
                                      "which was not started")
        if current.offset + n > current.size:
            raise RemoteProtocolError(f"data beyond the announced size of message {frame.seq} "
                                      f"on {frame.ch!r}")
        offset = current.offset
        current.offset += n
        events.append(MessageData(frame.ch, frame.seq, offset, frame.data))
        if current.offset == current.size:
            events.append(MessageComplete(frame.ch, frame.seq))

    # -- receiver actions -----------------------------------------------------

    def send_ack(self, ch: str, entries: list[F.AckEntry]) -> None:
        """Acknowledge durably committed messages, naming the content of each."""
        if self.state is State.CLOSED:
            return      # the commit is durable; the next session acks it on a re-send
        self._require_open()
        for i in range(0, len(entries), F.MAX_ACK_ENTRIES):
            self._queue(F.Ack(ch, tuple(entries[i:i + F.MAX_ACK_ENTRIES])), control=True)

    def send_checkpoint(self, line: bytes) -> None:
        """Queue our latest signed audit checkpoint for the peer to witness."""
        if self.state is State.OPEN:
            self._queue(F.Checkpoint(line), control=True)

    def send_nack(self, ch: str, seq: int, reason: str, retry: bool, kind: str = F.NACK_RETRY,
                  wait: float = 0.0) -> None:
        """Refuse message `seq`; discard the channel's frames until the sender rewinds."""
        if self.state is State.CLOSED:
            return
        self._require_open()
        self._queue(F.Nack(ch, seq, reason[:F.MAX_REASON_CHARS], retry, kind, wait),
                    control=True)
        self._discarding.add(ch)
        current = self._incoming.pop(ch, None)
        if current is not None:
            # Credit for bytes of this message still on their way is returned as they arrive.
            pass

    def grant(self, ch: str, n: int) -> None:
        """Give the peer `n` more bytes of credit on `ch` (after they were written out)."""
        if n <= 0 or self.state is State.CLOSED:
            return
        self._regrant[ch] = self._regrant.get(ch, 0) + n

    # -- sender actions -------------------------------------------------------

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"session is {self.state.value}, not open")

    def send_msg(self, ch: str, seq: int, name: str, size: int, sha256: bytes,
                 offset: int = 0) -> None:
        self._require_open()
        if ch not in self._send_windows:
            raise LocalProtocolError(f"peer does not accept channel {ch!r}")
        current = self._outgoing.get(ch)
        if current is not None and current.remaining:
            raise LocalProtocolError(f"message {current.seq} on {ch!r} is not finished")
        rewind = ch in self._rewind
        self._rewind.discard(ch)
        self._queue(F.Msg(ch, seq, name, size, sha256, offset, rewind), control=False)
        self._outgoing[ch] = _Outgoing(seq, size - offset)
        self._on_wire.setdefault(ch, set()).add(seq)

    def abandon(self, ch: str) -> None:
        """Stop sending the current message of `ch` mid-way (its file went bad). The
        next Msg on `ch` carries the rewind flag, which tells the peer to drop the
        incomplete message (and to discard anything until then)."""
        self._outgoing.pop(ch, None)
        self._rewind.add(ch)

    def credit(self, ch: str) -> int:
        window = self._send_windows.get(ch)
        return window.available if window else 0

    def sendable(self, ch: str) -> int:
        """How many data bytes of the current message may go out now (one chunk at most)."""
        current = self._outgoing.get(ch)
        if current is None or self.state is not State.OPEN:
            return 0
        return min(current.remaining, self.credit(ch), CHUNK_SIZE)

    def remaining(self, ch: str) -> int | None:
        current = self._outgoing.get(ch)
        return current.remaining if current else None

    def send_data(self, ch: str, data: bytes) -> None:
        self._require_open()
        current = self._outgoing.get(ch)
        if current is None:
            raise LocalProtocolError(f"no message in progress on {ch!r}")
        if len(data) > current.remaining or len(data) > CHUNK_SIZE:
            raise LocalProtocolError("data beyond the message size or the chunk size")
        self._send_windows[ch].spend(len(data))
        self._queue(F.Data(ch, current.seq, data), control=False)
        current.remaining -= len(data)
