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
* A big file's SHA-256 may follow its data (a Sum frame) instead of riding in
  its Msg, when the peer's hello offers it (`late_hash`; docs/PROTOCOL.md §5).
* Heartbeats (linkd.proto.heartbeat): a ping after `heartbeat_interval` of
  send-idleness, death after `heartbeat_timeout` of receive-silence.
* Control frames (acks, credit, pings, pongs, nacks, bye) are queued ahead of
  bulk frames (msg, data) so they are never starved by a big transfer.

Any violation by the peer raises nothing out of `receive_data`: the session
queues a bye with the reason, moves to CLOSED and returns SessionClosed.

Where things live: the states and which input is legal in which state are in
linkd.proto.state (the table); one channel's state, both directions, and the
discard-until-rewind rule (also applied by the owner to the events it queued) in
linkd.proto.channel; the events in
linkd.proto.events (re-exported here, with State, for the owner). This module
only dispatches: frames to channels (a `match` on the frame type), calls to
the table, and it owns the output queues and the timers.

Size: over 400 lines on purpose: it is the one entry of the sans-IO core, every
frame in and every action out (one short method each) passes the state table
here; split, that check would be spread over modules.
"""

from __future__ import annotations

from ..errors import LocalProtocolError, RemoteProtocolError
from . import frames as F
from .channel import ChannelState
from .events import (
    AckReceived,
    CheckpointReceived,
    CreditReceived,
    Event,
    MessageComplete,
    MessageData,
    MessageEvent,
    MessageStart,
    NackReceived,
    PeerHello,
    RttMeasured,
    SessionClosed,
)
from .flow import ReceiveWindow, SendWindow
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_data_frame_head, encode_frame
from .heartbeat import Heartbeat
from .state import Input, State, next_state

__all__ = [
    "AckReceived", "CheckpointReceived", "CreditReceived", "Event", "Input", "MessageComplete",
    "MessageData", "MessageEvent", "MessageStart", "NackReceived", "PeerHello", "RttMeasured",
    "Session", "SessionClosed", "State", "check_hello", "named_reason",
]


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
                 checkpoint: bytes | None = None, heartbeat_grid: float = 0.0,
                 rtt_refresh: float | None = None, late_hash: bool = True) -> None:
        self.node = node
        self.peer = peer
        self.state = State.HANDSHAKE
        self.peer_hello: F.Hello | None = None
        self.late_hash = late_hash      # we take a Msg without its SHA-256 (then a Sum)
        self.peer_channels: dict[str, F.ChannelHello] = {}
        self.close_reason: str | None = None
        # After our own goodbye, the frames that still come are only looked through
        # for the peer's: once it has said goodbye too, it sends nothing more, so the
        # owner can close its end without lingering (both sides stopping at once).
        self.peer_said_bye = False
        self._awaiting_bye = False
        self._decoder = FrameDecoder(max_frame)
        self._control = bytearray()
        self._bulk = bytearray()
        self._handshake_deadline = now + handshake_timeout
        self.heartbeat = Heartbeat(heartbeat_interval, heartbeat_timeout, now,
                                   heartbeat_grid, rtt_refresh)
        self.channels: dict[str, ChannelState] = {}
        for c in channels:
            self._channel(c.name).recv_window = ReceiveWindow(c.credit)
        self._queue(F.Hello(F.PROTOCOL_VERSION, node, tuple(channels), checkpoint,
                            late_hash=late_hash), control=True)

    def _channel(self, ch: str) -> ChannelState:
        """The state of `ch` (created on first use; only for names our own code uses)."""
        state = self.channels.get(ch)
        if state is None:
            state = self.channels[ch] = ChannelState(ch)
        return state

    def _step(self, inp: Input, what: str = "") -> bool:
        """Apply the table: move to the next state; False if `inp` is ignored here."""
        new = next_state(self.state, inp, what)
        if new is None:
            return False
        self.state = new
        return True

    # -- output ---------------------------------------------------------------

    def _queue(self, frame: F.Frame, control: bool) -> None:
        (self._control if control else self._bulk).extend(encode_frame(frame))

    def data_to_send(self, now: float) -> bytes | bytearray:
        """Everything queued, control frames first. The output buffers are handed
        over, not copied (a data frame's payload was copied once, into them)."""
        for state in self.channels.values():
            n = state.take_regrant()
            if n:
                self._queue(F.Credit(state.name, n), control=True)
        if not self._control and not self._bulk:
            return b""
        if not self._bulk:
            out, self._control = self._control, bytearray()
        elif not self._control:
            out, self._bulk = self._bulk, bytearray()
        else:
            out = self._control + self._bulk
            self._control, self._bulk = bytearray(), bytearray()
        self.heartbeat.sent(now)
        return out

    @property
    def pending_output(self) -> int:
        return len(self._control) + len(self._bulk)

    @property
    def has_output(self) -> bool:
        """Whether data_to_send() has anything: queued frames or credit to give back."""
        return bool(self._control or self._bulk) or any(
            state.regrant for state in self.channels.values())

    # -- timers ---------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self.state is State.HANDSHAKE:
            return self._handshake_deadline
        if self.state is State.OPEN:
            return self.heartbeat.next_deadline()
        return None

    def handle_timer(self, now: float) -> list[Event]:
        if self.state is State.HANDSHAKE and now >= self._handshake_deadline:
            # The peer connected (or we reached it) and then said nothing: its fault.
            return [self._fail(Input.HANDSHAKE_TIMEOUT,
                               "handshake timeout: no hello from the peer")]
        if self.state is State.OPEN:
            if self.heartbeat.is_dead(now):
                silent = now - self.heartbeat.last_received
                return [self._fail(Input.HEARTBEAT_TIMEOUT,
                                   f"heartbeat timeout: nothing received for {silent:.1f}s")]
            if now >= self.heartbeat.ping_due():
                self._step(Input.PING_DUE)
                self._queue(F.Ping(self.heartbeat.make_ping(now)), control=True)
                self.heartbeat.sent(now)
        return []

    # -- closing --------------------------------------------------------------

    def _fail(self, inp: Input, reason: str) -> SessionClosed:
        """Close because of the peer (`inp`: its violation, silence or end of stream)."""
        reason = named_reason(reason)
        if self._step(inp):
            self._queue(F.Bye(reason), control=True)
            self.close_reason = reason
        return SessionClosed(reason, error=True, by_peer=True)

    def close(self, reason: str) -> None:
        """A clean goodbye from our side (shutdown, reload). A quiet no-op once closed."""
        reason = named_reason(reason)
        if self._step(Input.CLOSE):
            # The bye is the last frame: bulk frames still queued would follow it (control
            # goes first), and a peer that closes on reading the bye would leave them
            # unread, which resets the connection. Unacknowledged, they are sent again.
            self._bulk = bytearray()
            self._queue(F.Bye(reason), control=True)
            self.close_reason = reason
            self._awaiting_bye = True

    # -- input ----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Bytes from the peer (b"" is the end of the stream); late bytes are ignored
        (after our goodbye they are only looked through for the peer's: `peer_said_bye`).
        Nothing of `data` is kept: the caller may reuse its buffer."""
        if self.state is State.CLOSED:
            if self._awaiting_bye and data:
                self._look_for_bye(data)
            return []
        if not data:
            return [self._fail(Input.PEER_EOF, "connection closed by the peer without a goodbye")]
        self.heartbeat.received(now)
        events: list[Event] = []
        try:
            self._decoder.feed(data)
            while self.state is not State.CLOSED:  # type: ignore[comparison-overlap]
                frame = self._decoder.next_frame()
                if frame is None:
                    break
                events += self._handle(frame, now)
        except RemoteProtocolError as exc:
            events.append(self._fail(Input.PEER_VIOLATION, f"protocol violation: {exc}"))
        return events

    def _look_for_bye(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._decoder.feed(data)
            while (frame := self._decoder.next_frame()) is not None:
                if isinstance(frame, F.Bye):
                    self.peer_said_bye = True
                    break
        except RemoteProtocolError:
            pass        # what it says no longer counts; the owner's linger ends it
        else:
            if not self.peer_said_bye:
                return
        self._awaiting_bye = False

    def _handle(self, frame: F.Frame, now: float) -> list[Event]:
        match frame:
            case F.Hello():
                return self._handle_hello(frame)
            case F.Bye(reason=reason):
                was = self.state
                self.peer_said_bye = True
                self._step(Input.PEER_BYE)
                self.close_reason = reason
                if was is State.HANDSHAKE:
                    return [SessionClosed(f"refused by the peer: {_theirs(reason)}",
                                          error=True, by_peer=True)]
                return [SessionClosed(f"peer said goodbye: {_theirs(reason)}", error=False,
                                      by_peer=True)]
        self._step(Input.PEER_FRAME, type(frame).__name__.lower())
        match frame:
            case F.Data():
                return self._receiving(frame.ch, "data").receive_data(frame)
            case F.Msg():
                if frame.sha256 is None and not self.late_hash:
                    raise RemoteProtocolError(f"msg {frame.seq} on {frame.ch!r} carries no "
                                              "SHA-256, and our hello did not offer 'lh'")
                return self._receiving(frame.ch, "msg").receive_msg(frame)
            case F.Sum():
                return self._receiving(frame.ch, "sum").receive_sum(frame)
            case F.Ack(ch=ch, entries=entries):
                self._sending(ch, "ack").acked(entries)
                return [AckReceived(ch, entries)]
            case F.Credit(ch=ch, bytes=n):
                window = self._sending(ch, "credit").send_window
                assert window is not None
                window.grant(n)
                return [CreditReceived(ch, n)]
            case F.Nack():
                self._sending(frame.ch, "nack").nacked(frame.seq)
                return [NackReceived(frame.ch, frame.seq, frame.reason, frame.retry, frame.kind,
                                     frame.wait, frame.resume)]
            case F.Ping(id=ping_id):
                self._queue(F.Pong(ping_id), control=True)
                if self.heartbeat.wants_rtt(now):       # ours rides with the pong
                    self._queue(F.Ping(self.heartbeat.make_ping(now)), control=True)
                return []
            case F.Pong(id=ping_id):
                rtt = self.heartbeat.pong(ping_id, now)
                return [] if rtt is None else [RttMeasured(rtt)]
            case F.Checkpoint(line=line):
                return [CheckpointReceived(line)]
        raise AssertionError(f"unhandled frame {frame!r}")   # pragma: no cover

    def _handle_hello(self, hello: F.Hello) -> list[Event]:
        opened = next_state(self.state, Input.PEER_HELLO)   # a second hello raises here
        check_hello(hello, self.peer)
        self.peer_hello = hello
        self.peer_channels = {c.name: c for c in hello.channels}
        for c in hello.channels:
            self._channel(c.name).send_window = SendWindow(c.credit)
        assert opened is not None
        self.state = opened
        return [PeerHello(hello)]

    def _sending(self, ch: str, what: str) -> ChannelState:
        """A channel the peer offered (we send on it), for a frame about our sending."""
        state = self.channels.get(ch)
        if state is None or state.send_window is None:
            raise RemoteProtocolError(f"{what} for channel {ch!r}, which the peer did not offer")
        return state

    def _receiving(self, ch: str, what: str) -> ChannelState:
        """A channel we configured for the peer (we receive on it)."""
        state = self.channels.get(ch)
        if state is None or state.recv_window is None:
            raise RemoteProtocolError(f"{what} on channel {ch!r}, which is not configured for "
                                      f"peer {self.peer}")
        return state

    def _local_receiving(self, ch: str) -> ChannelState:
        state = self.channels.get(ch)
        if state is None or state.recv_window is None:
            raise LocalProtocolError(f"channel {ch!r} is not configured for peer {self.peer}")
        return state

    # -- receiver actions -----------------------------------------------------
    # Quiet no-ops on a CLOSED session (the driver's contract, see linkd.proto.state):
    # what they answer is durable on our side and is answered again next session.

    def send_ack(self, ch: str, entries: list[F.AckEntry]) -> None:
        """Acknowledge durably committed messages, naming the content of each.
        LocalProtocolError before the handshake or on a channel we do not receive."""
        if not self._step(Input.SEND_ACK):
            return      # the commit is durable; the next session acks it on a re-send
        self._local_receiving(ch)
        for i in range(0, len(entries), F.MAX_ACK_ENTRIES):
            self._queue(F.Ack(ch, tuple(entries[i:i + F.MAX_ACK_ENTRIES])), control=True)

    def send_checkpoint(self, line: bytes) -> None:
        """Queue our latest signed audit checkpoint for the peer to witness (only when
        OPEN; before that our hello carries it, after it nobody listens)."""
        if self._step(Input.SEND_CHECKPOINT):
            self._queue(F.Checkpoint(line), control=True)

    def send_nack(self, ch: str, seq: int, reason: str, retry: bool, kind: str = F.NACK_RETRY,
                  wait: float = 0.0, resume: int | None = None) -> None:
        """Refuse message `seq`; discard the channel's frames until the sender rewinds.
        `resume` (a busy nack): the durable prefix of `seq` the resend may skip.
        LocalProtocolError before the handshake or on a channel we do not receive."""
        if not self._step(Input.SEND_NACK):
            return
        state = self._local_receiving(ch)
        self._queue(F.Nack(ch, seq, reason[:F.MAX_REASON_CHARS], retry, kind, wait, resume),
                    control=True)
        state.refuse()

    def grant(self, ch: str, n: int) -> None:
        """Give the peer `n` more bytes of credit on `ch` (after they were written out);
        n == 0 does nothing. LocalProtocolError for n < 0 or a channel we do not receive."""
        if not self._step(Input.GRANT):
            return
        if n < 0:
            raise LocalProtocolError(f"negative credit grant ({n}) on {ch!r}")
        if n:
            self._local_receiving(ch).grant(n)

    def discarding(self, ch: str) -> bool:
        """True while we discard `ch`'s frames after our nack (until the sender rewinds)."""
        state = self.channels.get(ch)
        return state is not None and state.discarding

    # -- sender actions -------------------------------------------------------
    # LocalProtocolError unless OPEN: the driver stops its sender on it.

    @property
    def peer_late_hash(self) -> bool:
        """The peer takes a Msg without its SHA-256 (a Sum brings it after the data)."""
        return self.peer_hello is not None and self.peer_hello.late_hash

    def send_msg(self, ch: str, seq: int, name: str, size: int, sha256: bytes | None,
                 offset: int = 0) -> None:
        """Start message `seq`; `sha256` None: send_sum() follows its last data byte
        (only to a peer that takes it: peer_late_hash)."""
        self._step(Input.SEND_MSG)
        state = self.channels.get(ch)
        if state is None:
            raise LocalProtocolError(f"peer does not accept channel {ch!r}")
        if sha256 is None and not self.peer_late_hash:
            raise LocalProtocolError(f"peer {self.peer} needs the SHA-256 in the msg")
        rewind = state.start(seq, size, offset, late=sha256 is None)
        self._queue(F.Msg(ch, seq, name, size, sha256, offset, rewind), control=False)

    def send_sum(self, ch: str, seq: int, sha256: bytes) -> None:
        """The SHA-256 of message `seq`, whose Msg went without it: after its data."""
        self._step(Input.SEND_SUM)
        state = self.channels.get(ch)
        if state is None:
            raise LocalProtocolError(f"peer does not accept channel {ch!r}")
        state.finish_sum(seq)
        self._queue(F.Sum(ch, seq, sha256), control=False)

    def send_data(self, ch: str, data: bytes | memoryview) -> None:
        self._step(Input.SEND_DATA)
        state = self.channels.get(ch)
        if state is None:
            raise LocalProtocolError(f"no message in progress on {ch!r}")
        seq = state.spend(data)
        # As _queue(F.Data(ch, seq, data)) would, byte for byte, copying the payload once.
        self._bulk += encode_data_frame_head(ch, seq, len(data))
        self._bulk += data

    def abandon(self, ch: str) -> None:
        """Stop sending the current message of `ch` mid-way (its file went bad). The
        next Msg on `ch` carries the rewind flag, which tells the peer to drop the
        incomplete message (and to discard anything until then). Legal in any state."""
        self._step(Input.ABANDON)
        self._channel(ch).abandon()

    def credit(self, ch: str) -> int:
        state = self.channels.get(ch)
        return state.credit if state else 0

    def sendable(self, ch: str) -> int:
        """How many data bytes of the current message may go out now (one chunk at most)."""
        state = self.channels.get(ch)
        if state is None or self.state is not State.OPEN:
            return 0
        return state.sendable()

    def remaining(self, ch: str) -> int | None:
        state = self.channels.get(ch)
        if state is None or state.outgoing is None:
            return None
        return state.outgoing.remaining

    def sum_due(self, ch: str) -> bool:
        """The current message of `ch` has all its data out and awaits send_sum()."""
        state = self.channels.get(ch)
        return state is not None and state.outgoing is not None \
            and state.outgoing.sum_due and not state.outgoing.remaining
