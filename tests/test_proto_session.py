"""Two sans-IO Sessions pumped into each other (h11's ConnectionPair), no I/O."""

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linkd.errors import LocalProtocolError
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.proto.framing import CHUNK_SIZE, encode_frame


def chans(credit=1 << 20, names=("alerts", "data")):
    return [F.ChannelHello(name=n, max=10 << 20, credit=credit) for n in names]


class Pair:
    def __init__(self, now=0.0, a_channels=None, b_channels=None, **kw):
        self.now = now
        self.a = S.Session(node="alpha", peer="bravo", channels=a_channels or chans(), now=now, **kw)
        self.b = S.Session(node="bravo", peer="alpha", channels=b_channels or chans(), now=now,
                           **kw)
        self.events = {"a": [], "b": []}

    def pump(self, trickle=False):
        moved = True
        while moved:
            moved = False
            for src, dst, key in ((self.a, self.b, "b"), (self.b, self.a, "a")):
                data = src.data_to_send(self.now)
                if data:
                    moved = True
                    if trickle:
                        for i in range(len(data)):
                            self.events[key] += dst.receive_data(data[i:i + 1], self.now)
                    else:
                        self.events[key] += dst.receive_data(data, self.now)

    def take(self, key):
        events, self.events[key] = self.events[key], []
        return events


def test_hello_exchange_opens_both_sides_and_reports_peer_channels():
    p = Pair()
    p.pump()
    assert p.a.state is S.State.OPEN and p.b.state is S.State.OPEN
    (hello,) = p.take("a")
    assert isinstance(hello, S.PeerHello) and hello.hello.node == "bravo"
    assert [c.name for c in hello.hello.channels] == ["alerts", "data"]


@pytest.mark.parametrize("trickle", [False, True])
def test_a_message_flows_in_chunks_and_completes(trickle):
    p = Pair()
    p.pump()
    p.take("a"), p.take("b")
    payload = bytes(range(256)) * 2000      # 512000 bytes: two full chunks and a bit
    sha = hashlib.sha256(payload).digest()
    p.a.send_msg("data", 1, "x.bin", len(payload), sha)
    offset = 0
    while offset < len(payload):
        n = p.a.sendable("data")
        assert 0 < n <= CHUNK_SIZE
        p.a.send_data("data", payload[offset:offset + n])
        offset += n
    p.pump(trickle=trickle)
    events = p.take("b")
    assert events[0] == S.MessageStart("data", 1, "x.bin", len(payload), sha, 0, False)
    assert b"".join(e.data for e in events if isinstance(e, S.MessageData)) == payload
    assert events[-1] == S.MessageComplete("data", 1)
    entry = F.AckEntry(1, sha, len(payload), "x.bin", "x.bin", 1.0)
    p.b.send_ack("data", [entry])
    p.pump()
    assert p.take("a") == [S.AckReceived("data", (entry,))]


def test_empty_message_completes_at_once():
    p = Pair()
    p.pump()
    p.take("b")
    p.a.send_msg("data", 1, "empty", 0, b"\0" * 32)
    p.pump()
    assert [type(e) for e in p.take("b")] == [S.MessageStart, S.MessageComplete]


def test_credit_limits_the_sender_until_the_receiver_grants_more():
    p = Pair(b_channels=chans(credit=1000))
    p.pump()
    p.a.send_msg("data", 1, "f", 5000, b"\0" * 32)
    assert p.a.sendable("data") == 1000
    p.a.send_data("data", b"x" * 1000)
    assert p.a.sendable("data") == 0
    with pytest.raises(LocalProtocolError):
        p.a.send_data("data", b"x")
    p.pump()
    p.b.grant("data", 3000)
    p.pump()
    assert p.a.sendable("data") == 3000
    assert S.CreditReceived("data", 3000) in p.take("a")


def test_data_beyond_granted_credit_closes_the_session():
    p = Pair(b_channels=chans(credit=10))
    p.pump()
    p.b.take = None
    p.a.send_msg("data", 1, "f", 100, b"\0" * 32)
    p.a.channels["data"].send_window.available = 100      # a misbehaving sender
    p.a.send_data("data", b"y" * 100)
    p.pump()
    closed = [e for e in p.events["b"] if isinstance(e, S.SessionClosed)]
    assert closed and "credit" in closed[0].reason and closed[0].error
    assert p.b.state is S.State.CLOSED


def test_nack_discards_until_rewind_and_returns_credit():
    p = Pair()
    p.pump()
    p.take("a"), p.take("b")
    sha = b"\1" * 32
    p.a.send_msg("data", 1, "one", 10, sha)
    p.a.send_data("data", b"a" * 10)
    p.pump()
    p.take("b")
    p.a.send_msg("data", 2, "two", 10, sha)     # pipelined before the nack arrives
    p.a.send_data("data", b"b" * 10)
    p.b.send_nack("data", 1, "sha256 mismatch", retry=True)
    p.pump()
    back = p.take("a")
    assert S.NackReceived("data", 1, "sha256 mismatch", True, "", 0.0) in back
    assert S.CreditReceived("data", 10) in back   # the discarded bytes' credit came back
    assert p.take("b") == []                      # the stale msg 2 was discarded
    p.a.send_msg("data", 1, "one", 10, sha)
    p.a.send_data("data", b"a" * 10)
    p.pump()
    events = p.take("b")
    assert events[0] == S.MessageStart("data", 1, "one", 10, sha, 0, True)
    assert events[-1] == S.MessageComplete("data", 1)


def test_msg_before_the_previous_message_is_complete_is_a_violation():
    p = Pair()
    p.pump()
    p.a.send_msg("data", 1, "one", 10, b"\0" * 32)
    p.a.channels["data"].outgoing.remaining = 0      # pretend, to send the next one early
    p.a.send_msg("data", 2, "two", 10, b"\0" * 32)
    p.pump()
    assert any(isinstance(e, S.SessionClosed) and "before message 1" in e.reason
               for e in p.events["b"])


def test_channel_not_configured_for_the_peer_is_a_violation():
    from linkd.proto.channel import ChannelState
    from linkd.proto.flow import SendWindow
    p = Pair(a_channels=chans(names=("data",)))
    p.pump()
    with pytest.raises(LocalProtocolError):     # an honest sender refuses by itself
        p.b.send_msg("alerts", 1, "x", 1, b"\0" * 32)
    p.b.channels["alerts"] = ChannelState("alerts")   # a peer that ignores our hello
    p.b.channels["alerts"].send_window = SendWindow(100)
    p.b.send_msg("alerts", 1, "x", 1, b"\0" * 32)
    p.pump()
    assert any(isinstance(e, S.SessionClosed) and "not configured" in e.reason
               for e in p.events["a"])
    assert p.a.state is S.State.CLOSED


def test_wrong_node_in_hello_is_refused():
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=0)
    m = S.Session(node="mallory", peer="alpha", channels=chans(), now=0)
    events = a.receive_data(m.data_to_send(0), 0)
    assert isinstance(events[-1], S.SessionClosed) and "mallory" in events[-1].reason


def test_unsupported_version_is_refused_with_a_reason():
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=0)
    events = a.receive_data(encode_frame(F.Hello(1, "bravo", ())), 0)
    assert "unsupported protocol version 1" in events[-1].reason
    bye = a.data_to_send(0)
    assert b"unsupported protocol version" in bye


def test_first_frame_must_be_hello():
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=0)
    events = a.receive_data(encode_frame(F.Ping(1)), 0)
    assert isinstance(events[-1], S.SessionClosed) and "expected hello" in events[-1].reason


def test_handshake_timeout():
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=100.0, handshake_timeout=10)
    assert a.get_timer() == 110.0
    assert a.handle_timer(109.9) == []
    (closed,) = a.handle_timer(110.0)
    assert "handshake timeout" in closed.reason and a.state is S.State.CLOSED


def test_heartbeat_pings_when_idle_measures_rtt_and_declares_silence_dead():
    p = Pair(heartbeat_interval=5.0, heartbeat_timeout=15.0)
    p.pump()
    p.take("a")
    assert p.a.get_timer() == 5.0
    p.now = 5.0
    assert p.a.handle_timer(5.0) == []
    ping = p.a.data_to_send(5.0)
    p.now = 5.25
    p.b.receive_data(ping, 5.25)
    pong = p.b.data_to_send(5.25)
    p.now = 5.5
    events = p.a.receive_data(pong, 5.5)
    assert events == [S.RttMeasured(0.5)]
    # Now bravo goes silent.
    assert p.a.get_timer() == 10.0
    t = 10.0
    while p.a.state is S.State.OPEN:
        events = p.a.handle_timer(t)
        p.a.data_to_send(t)
        t = p.a.get_timer() or t
    assert t == pytest.approx(20.5)
    assert "heartbeat timeout" in events[-1].reason


def test_bye_is_a_clean_close():
    p = Pair()
    p.pump()
    p.take("b")
    p.a.close("shutting down")
    p.pump()
    (closed,) = p.take("b")
    assert closed == S.SessionClosed("peer said goodbye: shutting down", error=False, by_peer=True)


@settings(deadline=None, max_examples=50)
@given(st.lists(st.integers(0, 3 * CHUNK_SIZE), min_size=1, max_size=6),
       st.integers(4096, 1 << 20))
def test_any_sequence_of_messages_arrives_whole_under_any_credit(sizes, credit):
    p = Pair(b_channels=chans(credit=credit))
    p.pump()
    p.take("b")
    received = {}
    for seq, size in enumerate(sizes, 1):
        payload = bytes([seq % 256]) * size
        p.a.send_msg("data", seq, f"f{seq}", size, b"\0" * 32)
        while p.a.remaining("data"):
            n = p.a.sendable("data")
            if n == 0:
                p.pump()
                for e in p.take("b"):
                    if isinstance(e, S.MessageData):
                        received[e.seq] = received.get(e.seq, b"") + e.data
                        p.b.grant("data", len(e.data))
                p.pump()
                continue
            offset = size - p.a.remaining("data")
            p.a.send_data("data", payload[offset:offset + n])
    p.pump()
    for e in p.take("b"):
        if isinstance(e, S.MessageData):
            received[e.seq] = received.get(e.seq, b"") + e.data
    assert {s: received.get(s, b"") for s in range(1, len(sizes) + 1)} == \
        {s: bytes([s % 256]) * size for s, size in enumerate(sizes, 1)}
