"""The session's state table (linkd.proto.state), driven pair by pair and in sequences.

Every (state, input) pair is put to a real Session: a legal pair moves it to the
table's state, an ignored pair changes nothing, an illegal input from the peer
closes the session with a bye naming the rule, an illegal call from our own code
raises LocalProtocolError and changes nothing.
"""

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from linkd.errors import LocalProtocolError, RemoteProtocolError
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.proto.framing import encode_frame
from linkd.proto.state import (
    IGNORED,
    LOCAL_INPUTS,
    PEER_INPUTS,
    PEER_RULES,
    TIMER_INPUTS,
    TRANSITIONS,
    Input,
    State,
    next_state,
)

SHA = b"\1" * 32
ENTRY = F.AckEntry(1, SHA, 10, "f", "f", 1.0)
BIG = 1e6


def chans():
    return [F.ChannelHello(name=n, max=1 << 20, credit=1 << 16) for n in ("alerts", "data")]


# Per timer input, timeouts such that only that deadline can pass at `TIMER_AT`.
TIMER_AT = 20.0
TIMER_KW = {
    Input.HANDSHAKE_TIMEOUT: dict(handshake_timeout=10, heartbeat_interval=BIG,
                                  heartbeat_timeout=BIG),
    Input.HEARTBEAT_TIMEOUT: dict(handshake_timeout=BIG, heartbeat_interval=BIG,
                                  heartbeat_timeout=15),
    Input.PING_DUE: dict(handshake_timeout=BIG, heartbeat_interval=10, heartbeat_timeout=BIG),
}
DEFAULT_KW = dict(handshake_timeout=BIG, heartbeat_interval=BIG, heartbeat_timeout=BIG)


def session_in(state, inp):
    """A Session (alpha, peer bravo) in `state`; when OPEN or CLOSED it has message 1 of
    "alerts" (100 bytes) in progress, so send_data has something to send (for
    SEND_SUM: an empty message whose Msg went without its SHA-256)."""
    kw = TIMER_KW.get(inp, DEFAULT_KW)
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=0.0, **kw)
    if state is not State.HANDSHAKE:
        b = S.Session(node="bravo", peer="alpha", channels=chans(), now=0.0)
        a.receive_data(b.data_to_send(0.0), 0.0)
        if inp is Input.SEND_SUM:
            a.send_msg("alerts", 1, "a", 0, None)
        else:
            a.send_msg("alerts", 1, "a", 100, SHA)
        if state is State.CLOSED:
            a.close("done")
    a.data_to_send(0.0)
    assert a.state is state
    return a


def apply(s, inp):
    """Feed `inp` to the session; returns the events (or None for a call)."""
    peer_frames = {
        Input.PEER_HELLO: encode_frame(F.Hello(F.PROTOCOL_VERSION, "bravo", tuple(chans()),
                                               late_hash=True)),
        Input.PEER_BYE: encode_frame(F.Bye("going")),
        Input.PEER_FRAME: encode_frame(F.Ping(7)),
        Input.PEER_EOF: b"",
        Input.PEER_VIOLATION: b"\0\0\0\0",          # an empty frame
    }
    if inp in peer_frames:
        return s.receive_data(peer_frames[inp], 1.0)
    if inp in TIMER_INPUTS:
        return s.handle_timer(TIMER_AT)
    calls = {
        Input.CLOSE: lambda: s.close("bye"),
        Input.SEND_MSG: lambda: s.send_msg("data", 1, "f", 10, SHA),
        Input.SEND_DATA: lambda: s.send_data("alerts", b"x" * 10),
        Input.SEND_SUM: lambda: s.send_sum("alerts", 1, SHA),
        Input.ABANDON: lambda: s.abandon("alerts"),
        Input.SEND_ACK: lambda: s.send_ack("data", [ENTRY]),
        Input.SEND_NACK: lambda: s.send_nack("data", 1, "no", True),
        Input.GRANT: lambda: s.grant("data", 10),
        Input.SEND_CHECKPOINT: lambda: s.send_checkpoint(b"line"),
    }
    calls[inp]()
    return None


PAIRS = list(itertools.product(State, Input))


def test_the_table_classifies_every_pair_once():
    assert PEER_INPUTS | TIMER_INPUTS | LOCAL_INPUTS == set(Input)
    assert not IGNORED & TRANSITIONS.keys()
    for state, inp in PAIRS:
        if (state, inp) in PEER_RULES:
            assert inp in PEER_INPUTS and (state, inp) not in TRANSITIONS
        legal = (state, inp) in TRANSITIONS or (state, inp) in IGNORED
        if inp in PEER_INPUTS and not legal:
            assert (state, inp) in PEER_RULES
    # Nothing leaves CLOSED; timers never raise; peer input is never ignored before CLOSED.
    assert all(new is State.CLOSED for (old, _), new in TRANSITIONS.items()
               if old is State.CLOSED)
    for state, inp in PAIRS:
        if inp in TIMER_INPUTS:
            next_state(state, inp)
        if inp in PEER_INPUTS and state is not State.CLOSED:
            assert (state, inp) not in IGNORED


@pytest.mark.parametrize("state, inp", PAIRS, ids=[f"{s.value}-{i.name}" for s, i in PAIRS])
def test_every_state_input_pair_does_what_the_table_says(state, inp):
    s = session_in(state, inp)
    if (state, inp) in IGNORED:
        events = apply(s, inp)
        assert s.state is state
        assert events in ([], None)
        assert s.data_to_send(TIMER_AT) == b""
    elif (state, inp) in TRANSITIONS:
        events = apply(s, inp)
        assert s.state is TRANSITIONS[(state, inp)]
        if inp in PEER_INPUTS | TIMER_INPUTS and s.state is State.CLOSED:
            assert isinstance(events[-1], S.SessionClosed) and events[-1].by_peer
            assert events[-1].error is not (inp is Input.PEER_BYE and state is State.OPEN)
    elif inp in PEER_INPUTS:
        events = apply(s, inp)
        closed = events[-1]
        assert isinstance(closed, S.SessionClosed) and closed.error and closed.by_peer
        assert PEER_RULES[(state, inp)].format(what="ping") in closed.reason
        assert s.state is State.CLOSED
        assert b"bye" in s.data_to_send(TIMER_AT)
    else:
        assert inp in LOCAL_INPUTS
        with pytest.raises(LocalProtocolError, match=f"session is {state.value}, not open"):
            apply(s, inp)
        assert s.state is state
        assert s.data_to_send(TIMER_AT) == b""


def test_illegal_inputs_raise_by_who_broke_the_rule():
    with pytest.raises(RemoteProtocolError, match="expected hello, got credit"):
        next_state(State.HANDSHAKE, Input.PEER_FRAME, "credit")
    with pytest.raises(RemoteProtocolError, match="^second hello$"):
        next_state(State.OPEN, Input.PEER_HELLO)
    with pytest.raises(RemoteProtocolError, match="^expected hello, got frame$"):
        next_state(State.HANDSHAKE, Input.PEER_FRAME)
    with pytest.raises(LocalProtocolError, match="session is closed, not open"):
        next_state(State.CLOSED, Input.SEND_MSG)
    assert next_state(State.CLOSED, Input.SEND_ACK) is None
    assert next_state(State.HANDSHAKE, Input.PEER_HELLO) is State.OPEN


class SessionAgainstTheTable(RuleBasedStateMachine):
    """Random sequences of inputs: the session's state always equals the table's."""

    def __init__(self):
        super().__init__()
        self.s = S.Session(node="alpha", peer="bravo", channels=chans(), now=0.0, **DEFAULT_KW)
        self.model = State.HANDSHAKE
        self.seq = 0

    def expect(self, inp, what="ping"):
        try:
            new = next_state(self.model, inp, what)
        except RemoteProtocolError:
            new = State.CLOSED
        except LocalProtocolError:
            with pytest.raises(LocalProtocolError):
                apply(self.s, inp)
            return
        if inp is Input.SEND_MSG and new is State.OPEN:
            self.seq += 1
            self.s.send_msg("data", self.seq, "f", 0, SHA)
        elif inp is Input.SEND_DATA and new is State.OPEN:
            self.s.send_data("data", b"")
        elif inp is Input.SEND_SUM and new is State.OPEN:
            self.seq += 1
            self.s.send_msg("data", self.seq, "f", 0, None)
            self.s.send_sum("data", self.seq, SHA)
        else:
            apply(self.s, inp)
        if new is not None:
            self.model = new

    @rule(inp=st.sampled_from(sorted(PEER_INPUTS | LOCAL_INPUTS - {Input.SEND_DATA},
                                     key=lambda i: i.name)))
    def feed(self, inp):
        self.expect(inp)

    @precondition(lambda self: self.model is not State.OPEN or self.seq)
    @rule()
    def send_data(self):
        self.expect(Input.SEND_DATA)

    @invariant()
    def state_matches(self):
        assert self.s.state is self.model
        self.s.data_to_send(1.0)


SessionAgainstTheTable.TestCase.settings = settings(max_examples=150, stateful_step_count=12,
                                                    deadline=None)
test_random_sequences_follow_the_table = SessionAgainstTheTable.TestCase
