"""One channel's protocol state, both directions (h2's H2Stream, in small).

Theory of operation
-------------------
The session keeps one `ChannelState` per channel name. Each side of a link is
sender and receiver at once, so a channel has two halves:

* The *receiver* half exists when we configured the channel for this peer
  (`recv_window` is set). It tracks the message in progress (seq, size,
  offset) and checks every Msg and Data frame against it and against the
  credit we granted. After we Nack a message the channel is *discarding*:
  every frame of it is dropped (and the credit of dropped data is given back
  with the next output) until the sender's next Msg marked `rewind`.
  `DiscardUntilRewind` is the one home of that rule: the channel applies it to
  frames, and the owner (linkd.net.receiver) to the message events it had
  already queued for its spool when its nack reached the session.
* The *sender* half exists when the peer's hello offered the channel
  (`send_window` is set). It spends the credit the peer grants, refuses to
  send more data than a message announced, remembers which messages are on
  the wire (sent, neither acked nor nacked), and marks the first Msg after a
  Nack (or after we abandoned a message mid-way) as `rewind`.

Violations by the peer raise RemoteProtocolError; misuse by our own code
raises LocalProtocolError. No method here queues frames: the session does.
"""

from __future__ import annotations

import dataclasses

from ..errors import LocalProtocolError, RemoteProtocolError
from . import frames as F
from .events import Event, MessageComplete, MessageData, MessageStart
from .flow import ReceiveWindow, SendWindow
from .framing import CHUNK_SIZE


class DiscardUntilRewind:
    """After our nack, drop everything of one channel until the sender's next message
    marked `rewind` (which is kept). For any ordered stream of a channel's messages."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False

    def start(self) -> None:
        """We nacked: discard from here on."""
        self.active = True

    def passes(self, rewind: bool) -> bool:
        """Whether the next item is kept; `rewind`: it starts a message marked rewind
        (which ends the discarding)."""
        if rewind:
            self.active = False
        return not self.active


@dataclasses.dataclass(slots=True)
class Incoming:
    """The message the peer is sending us on this channel."""

    seq: int
    size: int
    offset: int
    sha_due: bool = False       # its Msg carried no SHA-256: complete once a Sum brings it

    @property
    def complete(self) -> bool:
        return self.offset == self.size and not self.sha_due


@dataclasses.dataclass(slots=True)
class Outgoing:
    """The message we are sending on this channel."""

    seq: int
    remaining: int
    sum_due: bool = False       # its Msg carried no SHA-256: a Sum must follow its data

    @property
    def finished(self) -> bool:
        return not self.remaining and not self.sum_due


class ChannelState:
    def __init__(self, name: str) -> None:
        self.name = name
        # receiver half (set when the channel is configured on our side)
        self.recv_window: ReceiveWindow | None = None
        self.incoming: Incoming | None = None
        self.discard = DiscardUntilRewind()
        self.regrant = 0                # credit to give back with the next output
        # sender half (set when the peer's hello offers the channel)
        self.send_window: SendWindow | None = None
        self.outgoing: Outgoing | None = None
        self.rewind = False             # the next Msg carries the rewind flag
        self.on_wire: set[int] = set()  # msgs sent and neither acked nor nacked

    # -- receiver half: frames from the peer --------------------------------

    @property
    def discarding(self) -> bool:
        return self.discard.active

    def receive_msg(self, msg: F.Msg) -> list[Event]:
        if not self.discard.passes(msg.rewind):
            return []
        current = self.incoming
        if current is not None and not current.complete and not msg.rewind:
            raise RemoteProtocolError(f"msg {msg.seq} on {msg.ch!r} starts before message "
                                      f"{current.seq} is complete")
        self.incoming = Incoming(msg.seq, msg.size, msg.offset, sha_due=msg.sha256 is None)
        events: list[Event] = [MessageStart(msg.ch, msg.seq, msg.name, msg.size, msg.sha256,
                                            msg.offset, msg.rewind)]
        if self.incoming.complete:
            events.append(MessageComplete(msg.ch, msg.seq))
        return events

    def receive_sum(self, frame: F.Sum) -> list[Event]:
        if not self.discard.passes(False):
            return []
        current = self.incoming
        if current is None or current.seq != frame.seq or not current.sha_due:
            raise RemoteProtocolError(f"sum for message {frame.seq} on {frame.ch!r}, which "
                                      "is not awaiting one")
        if current.offset < current.size:
            raise RemoteProtocolError(f"sum for message {frame.seq} on {frame.ch!r} before "
                                      "its last data byte")
        current.sha_due = False
        return [MessageComplete(frame.ch, frame.seq, frame.sha256)]

    def receive_data(self, frame: F.Data) -> list[Event]:
        assert self.recv_window is not None
        n = len(frame.data)
        self.recv_window.consume(n)
        if not self.discard.passes(False):
            self.regrant += n
            return []
        current = self.incoming
        if current is None or current.seq != frame.seq:
            raise RemoteProtocolError(f"data for message {frame.seq} on {frame.ch!r}, "
                                      "which was not started")
        if current.offset + n > current.size:
            raise RemoteProtocolError(f"data beyond the announced size of message {frame.seq} "
                                      f"on {frame.ch!r}")
        offset = current.offset
        current.offset += n
        events: list[Event] = [MessageData(frame.ch, frame.seq, offset, frame.data)]
        if current.complete:
            events.append(MessageComplete(frame.ch, frame.seq))
        return events

    # -- receiver half: our actions -----------------------------------------

    def refuse(self) -> None:
        """We nacked the message in progress: discard the channel until a rewind.
        Credit of its bytes still on their way is returned as they arrive."""
        self.discard.start()
        self.incoming = None

    def grant(self, n: int) -> None:
        self.regrant += n

    def take_regrant(self) -> int:
        """The credit to send now; the window counts it as outstanding again."""
        n, self.regrant = self.regrant, 0
        if n:
            assert self.recv_window is not None
            self.recv_window.grant(n)
        return n

    # -- sender half: frames from the peer ----------------------------------

    def acked(self, entries: tuple[F.AckEntry, ...]) -> None:
        for entry in entries:
            if entry.seq not in self.on_wire:
                raise RemoteProtocolError(f"ack for message {entry.seq} on {self.name!r}, "
                                          f"which is not in flight")
            self.on_wire.discard(entry.seq)

    def nacked(self, seq: int) -> None:
        if seq not in self.on_wire:
            raise RemoteProtocolError(f"nack for message {seq} on {self.name!r}, "
                                      f"which is not in flight")
        # The receiver discards everything of the channel after a nack: the nacked
        # message and those sent after it are no longer on the wire.
        self.on_wire = {s for s in self.on_wire if s < seq}
        self.outgoing = None
        self.rewind = True

    # -- sender half: our actions -------------------------------------------

    def start(self, seq: int, size: int, offset: int, late: bool = False) -> bool:
        """Begin message `seq` (`late`: its SHA-256 follows in a Sum); returns whether
        its Msg carries the rewind flag."""
        if self.send_window is None:
            raise LocalProtocolError(f"peer does not accept channel {self.name!r}")
        current = self.outgoing
        if current is not None and not current.finished:
            raise LocalProtocolError(f"message {current.seq} on {self.name!r} is not finished")
        rewind, self.rewind = self.rewind, False
        self.outgoing = Outgoing(seq, size - offset, sum_due=late)
        self.on_wire.add(seq)
        return rewind

    def finish_sum(self, seq: int) -> None:
        """The Sum of message `seq` goes out: after its last data byte, once."""
        current = self.outgoing
        if current is None or current.seq != seq or current.remaining or not current.sum_due:
            raise LocalProtocolError(f"message {seq} on {self.name!r} is not awaiting its sum")
        current.sum_due = False

    def spend(self, data: bytes | memoryview) -> int:
        """Account for `data` of the message in progress; returns its seq."""
        current = self.outgoing
        if current is None:
            raise LocalProtocolError(f"no message in progress on {self.name!r}")
        if len(data) > current.remaining or len(data) > CHUNK_SIZE:
            raise LocalProtocolError("data beyond the message size or the chunk size")
        assert self.send_window is not None
        self.send_window.spend(len(data))
        current.remaining -= len(data)
        return current.seq

    def abandon(self) -> None:
        self.outgoing = None
        self.rewind = True

    @property
    def credit(self) -> int:
        return self.send_window.available if self.send_window else 0

    def sendable(self) -> int:
        """Data bytes of the current message that may go out now (one chunk at most)."""
        if self.outgoing is None:
            return 0
        return min(self.outgoing.remaining, self.credit, CHUNK_SIZE)
