"""The session's states and its (state, input) -> state table (h11's _state.py).

Theory of operation
-------------------
A session is in one of three states: HANDSHAKE (our hello is queued, the
peer's has not arrived), OPEN, CLOSED. Everything that can happen to it is an
`Input`: a frame (or the end of the stream) from the peer, a deadline passing,
or a call from our own code. `TRANSITIONS` lists every legal pair and the
state it leads to; `IGNORED` lists the pairs that are legal but do nothing
(say, a late frame after we closed). Every other pair is illegal:

* an illegal input *from the peer* raises RemoteProtocolError, naming the
  rule (`PEER_RULES`); the session turns that into a bye and CLOSED;
* an illegal input *from our own code* raises LocalProtocolError (a bug in
  linkd; the driver also relies on it to stop sending once a session closed
  under it).

The session consults `next_state` before it acts on an input and moves to
the state returned after it acted, so the table is the one place that says
what may happen when. The receiver actions (ack, nack, grant) and the
checkpoint are quiet no-ops on a CLOSED session by contract: a delivered
message is durable whatever happens to the session, and the next session
acknowledges it again when the sender re-sends it.
"""

from __future__ import annotations

import enum

from ..errors import LocalProtocolError, RemoteProtocolError


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class Input(enum.Enum):
    # from the peer (Session.receive_data)
    PEER_HELLO = "hello"
    PEER_BYE = "bye"
    PEER_FRAME = "frame"            # any frame but hello and bye
    PEER_EOF = "end of stream"      # the stream ended without a bye
    PEER_VIOLATION = "violation"    # a malformed frame or one that breaks a rule
    # from time (Session.handle_timer)
    HANDSHAKE_TIMEOUT = "handshake timeout"
    HEARTBEAT_TIMEOUT = "heartbeat timeout"
    PING_DUE = "ping due"
    # from our own code (the Session's methods)
    CLOSE = "close"
    SEND_MSG = "send_msg"
    SEND_DATA = "send_data"
    SEND_SUM = "send_sum"
    ABANDON = "abandon"
    SEND_ACK = "send_ack"
    SEND_NACK = "send_nack"
    GRANT = "grant"
    SEND_CHECKPOINT = "send_checkpoint"


PEER_INPUTS = frozenset({Input.PEER_HELLO, Input.PEER_BYE, Input.PEER_FRAME, Input.PEER_EOF,
                         Input.PEER_VIOLATION})
TIMER_INPUTS = frozenset({Input.HANDSHAKE_TIMEOUT, Input.HEARTBEAT_TIMEOUT, Input.PING_DUE})
LOCAL_INPUTS = frozenset(Input) - PEER_INPUTS - TIMER_INPUTS

HS, OP, CL = State.HANDSHAKE, State.OPEN, State.CLOSED

TRANSITIONS: dict[tuple[State, Input], State] = {
    (HS, Input.PEER_HELLO): OP,           # checked: our version, the expected node
    (HS, Input.PEER_BYE): CL,             # the peer refused us
    (HS, Input.PEER_EOF): CL,
    (HS, Input.PEER_VIOLATION): CL,
    (HS, Input.HANDSHAKE_TIMEOUT): CL,
    (HS, Input.CLOSE): CL,
    (HS, Input.GRANT): HS,                # the credit goes out right after our hello
    (HS, Input.ABANDON): HS,
    (OP, Input.PEER_FRAME): OP,           # each frame is checked against the channel's state
    (OP, Input.PEER_BYE): CL,             # a clean goodbye
    (OP, Input.PEER_EOF): CL,
    (OP, Input.PEER_VIOLATION): CL,
    (OP, Input.HEARTBEAT_TIMEOUT): CL,
    (OP, Input.PING_DUE): OP,
    (OP, Input.CLOSE): CL,
    (OP, Input.SEND_MSG): OP,
    (OP, Input.SEND_DATA): OP,
    (OP, Input.SEND_SUM): OP,
    (OP, Input.ABANDON): OP,
    (OP, Input.SEND_ACK): OP,
    (OP, Input.SEND_NACK): OP,
    (OP, Input.GRANT): OP,
    (OP, Input.SEND_CHECKPOINT): OP,
    (CL, Input.ABANDON): CL,              # forgets the message in progress; harmless
}

IGNORED: frozenset[tuple[State, Input]] = frozenset(
    {(CL, i) for i in PEER_INPUTS}                       # late bytes after the end
    | {(s, i) for s in (HS, OP, CL) for i in TIMER_INPUTS if (s, i) not in TRANSITIONS}
    | {(CL, Input.CLOSE), (CL, Input.SEND_ACK), (CL, Input.SEND_NACK), (CL, Input.GRANT),
       (CL, Input.SEND_CHECKPOINT), (HS, Input.SEND_CHECKPOINT)})

# Why an illegal input from the peer is illegal (the reason in its bye); every illegal
# pair of a peer input has one (tests/proto/test_proto_state.py checks).
PEER_RULES: dict[tuple[State, Input], str] = {
    (HS, Input.PEER_FRAME): "expected hello, got {what}",
    (OP, Input.PEER_HELLO): "second hello",
}


def next_state(state: State, inp: Input, what: str = "") -> State | None:
    """The state `inp` leads to from `state`; None if it is ignored there.

    Raises RemoteProtocolError (a peer input) or LocalProtocolError (ours) if
    the pair is illegal. `what` names the frame, for the peer's reason."""
    if (state, inp) in IGNORED:
        return None
    new = TRANSITIONS.get((state, inp))
    if new is not None:
        return new
    if inp in PEER_INPUTS:
        raise RemoteProtocolError(PEER_RULES[(state, inp)].format(what=what or inp.value))
    raise LocalProtocolError(f"session is {state.value}, not open ({inp.value})")
