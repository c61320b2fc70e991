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
        self.a = S.Session(node="alpha", peer="bravo", channels=a_channels or chans(), now=now,
                           **kw)
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


def test_a_side_that_only_pongs_measures_its_rtt_with_a_ping_riding_on_a_pong():
    """The dialler (rtt_refresh set) never pings for itself on an idle link: the
    listener pings first. Its pong to the first ping carries a ping of its own; the
    next pongs do not, until its measurement is rtt_refresh old."""
    p = Pair(heartbeat_interval=5.0, heartbeat_timeout=15.0)
    p.a = S.Session(node="alpha", peer="bravo", channels=chans(), now=0.0,
                    heartbeat_interval=5.0, heartbeat_timeout=15.0, rtt_refresh=30.0)
    p.b = S.Session(node="bravo", peer="alpha", channels=chans(), now=0.0,
                    heartbeat_interval=4.5, heartbeat_timeout=15.0, heartbeat_grid=1.0)
    p.pump()
    p.take("a"), p.take("b")
    rtts = []
    t = 0.0
    while t < 65.0:
        t = p.b.get_timer()
        assert p.b.handle_timer(t) == []             # bravo's ping ...
        p.now = t
        p.pump()                                     # ... answered at once
        rtts += [ev for ev in p.take("a") if isinstance(ev, S.RttMeasured)]
        assert p.a.get_timer() > t + 4.0             # alpha is never send-idle
    assert p.b.heartbeat.rtt is not None
    assert p.a.heartbeat._next_id - 1 == 3           # at 0 s (about), 30 s and 60 s
    assert len(rtts) == 3


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


# -- exact behaviours, pinned against surviving mutants (docs/DEVELOPMENT.md) ------------

def opened(**kw):
    p = Pair(**kw)
    p.pump()
    p.take("a"), p.take("b")
    return p


def frames_of(wire):
    from linkd.proto.framing import FrameDecoder
    d = FrameDecoder()
    d.feed(wire)
    out = []
    while (f := d.next_frame()) is not None:
        out.append(f)
    return out


def test_end_of_stream_without_bye_is_the_peers_error_and_answered_with_a_bye():
    a = opened().a
    (closed,) = a.receive_data(b"", 1.0)
    assert closed == S.SessionClosed("connection closed by the peer without a goodbye",
                                     error=True, by_peer=True)
    assert a.close_reason == closed.reason and a.state is S.State.CLOSED
    assert frames_of(a.data_to_send(1.0)) == [F.Bye(closed.reason)]
    assert a.receive_data(encode_frame(F.Ping(1)), 2.0) == []   # late bytes are ignored
    assert a.data_to_send(2.0) == b"" and a.get_timer() is None


def test_handshake_timeout_blames_the_peer_and_says_why():
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=0, handshake_timeout=3)
    a.data_to_send(0)
    (closed,) = a.handle_timer(3.0)
    assert closed == S.SessionClosed("handshake timeout: no hello from the peer", error=True,
                                     by_peer=True)
    assert frames_of(a.data_to_send(3.0)) == [F.Bye(closed.reason)]
    assert a.handle_timer(100.0) == []


def test_a_refusal_during_the_handshake_is_an_error_with_the_peers_reason():
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=0)
    a.data_to_send(0)
    (closed,) = a.receive_data(encode_frame(F.Bye("unknown node")), 0)
    assert closed == S.SessionClosed("refused by the peer: unknown node", error=True, by_peer=True)
    assert a.close_reason == "unknown node" and a.data_to_send(0) == b""


def test_our_bye_is_the_last_frame_we_send():
    # review: control frames go ahead of bulk ones, so a msg and its data queued
    # before the close followed the bye; a peer closing on the bye left them unread
    p = opened()
    p.a.send_msg("data", 1, "x.bin", 3, b"\0" * 32)
    p.a.send_data("data", b"abc")
    p.a.close("shutdown: peer is shutting down")
    assert frames_of(p.a.data_to_send(0)) == [F.Bye("shutdown: peer is shutting down")]


def test_our_close_queues_one_bye_and_then_nothing():
    p = opened()
    p.a.close("reload")
    p.a.close("again")
    assert p.a.close_reason == "reload"
    wire = p.a.data_to_send(0)
    assert frames_of(wire) == [F.Bye("reload")]
    assert p.b.receive_data(wire, 0) == [S.SessionClosed("peer said goodbye: reload",
                                                         error=False, by_peer=True)]
    assert p.b.close_reason == "reload"


def test_after_our_goodbye_the_peers_own_goodbye_is_still_noticed():
    # both sides stopping at once: each said goodbye before reading the other's, and
    # neither need linger for the other's close once both goodbyes are read
    p = opened()
    p.a.close("shutdown: peer is shutting down")
    p.b.close("shutdown: peer is shutting down")
    from_b = p.b.data_to_send(0)
    p.a.data_to_send(0)
    assert not p.a.peer_said_bye
    late = encode_frame(F.Ping(7)) + encode_frame(F.Credit("data", 5))
    assert p.a.receive_data(late, 1.0) == [] and not p.a.peer_said_bye
    # late bytes are still ignored, the goodbye among them only noticed (here a byte
    # at a time: the decoder keeps its place across reads)
    for i in range(len(from_b)):
        assert p.a.receive_data(from_b[i:i + 1], 1.0) == []
    assert p.a.peer_said_bye and p.a.state is S.State.CLOSED
    assert p.a.data_to_send(1.0) == b"" and p.a.close_reason == "shutdown: peer is shutting down"


def test_after_our_goodbye_garbage_is_dropped_and_no_goodbye_is_seen():
    p = opened()
    p.a.close("reload")
    p.a.data_to_send(0)
    assert p.a.receive_data(b"\xff" * 64, 1.0) == []
    assert p.a.receive_data(encode_frame(F.Bye("late")), 1.0) == []
    assert not p.a.peer_said_bye        # past garbage nothing is read any more


def test_a_goodbye_the_peer_said_first_counts_as_said():
    p = opened()
    p.b.close("reload")
    p.pump()
    assert p.a.peer_said_bye and p.a.state is S.State.CLOSED


def test_hello_carries_channels_and_checkpoint_to_the_peer():
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=0, checkpoint=b"ck-line")
    b = S.Session(node="bravo", peer="alpha", channels=chans(names=("data",)), now=0)
    (ev,) = b.receive_data(a.data_to_send(0), 0)
    assert ev.hello.checkpoint == b"ck-line" and ev.hello.version == F.PROTOCOL_VERSION
    assert b.peer_hello == ev.hello and set(b.peer_channels) == {"alerts", "data"}
    assert b.peer_channels["data"].credit == 1 << 20
    assert b.credit("data") == 1 << 20 and b.credit("nope") == 0
    a.receive_data(b.data_to_send(0), 0)
    assert a.credit("data") == 1 << 20 and a.credit("alerts") == 0


def test_control_frames_overtake_bulk_frames():
    p = opened()
    p.a.send_msg("data", 1, "f", 4, b"\0" * 32)
    p.a.send_data("data", b"abcd")
    p.a.grant("data", 5)
    p.a.send_checkpoint(b"ck")
    before = p.a.pending_output
    assert before > 0
    got = frames_of(p.a.data_to_send(0))
    assert [type(f) for f in got] == [F.Checkpoint, F.Credit, F.Msg, F.Data]
    assert got[1] == F.Credit("data", 5) and p.a.pending_output == 0
    p.pump()


def test_grants_add_up_into_one_credit_frame_and_zero_grants_nothing():
    p = opened()
    p.a.grant("data", 3)
    p.a.grant("data", 4)
    p.a.grant("data", 0)
    assert frames_of(p.a.data_to_send(0)) == [F.Credit("data", 7)]
    assert p.a.data_to_send(0) == b""
    with pytest.raises(LocalProtocolError):
        p.a.grant("data", -1)
    with pytest.raises(LocalProtocolError):
        p.a.grant("nope", 1)


def test_output_counts_as_activity_for_the_heartbeat():
    p = opened(heartbeat_interval=5.0, heartbeat_timeout=15.0)
    p.a.send_checkpoint(b"x")
    p.a.data_to_send(4.0)
    assert p.a.heartbeat.last_sent == 4.0 and p.a.get_timer() == 9.0
    p.a.data_to_send(6.0)                       # nothing to send: not activity
    assert p.a.heartbeat.last_sent == 4.0
    assert p.a.handle_timer(8.9) == [] and p.a.data_to_send(8.9) == b""
    assert p.a.handle_timer(9.0) == []
    assert [type(f) for f in frames_of(p.a.data_to_send(9.0))] == [F.Ping]
    p.a.receive_data(encode_frame(F.Pong(12345)), 10.0)   # unknown pong: no rtt, but alive
    assert p.a.heartbeat.last_received == 10.0
    assert p.a.receive_data(encode_frame(F.Ping(77)), 10.0) == []
    assert frames_of(p.a.data_to_send(10.0)) == [F.Pong(77)]


def test_acks_and_nacks_must_name_messages_in_flight():
    p = opened()
    for seq in (1, 2, 3):
        p.a.send_msg("data", seq, f"f{seq}", 0, b"\0" * 32)
    p.pump()
    entry = F.AckEntry(1, b"\0" * 32, 0, "f1", "f1", 1.0)
    assert p.a.receive_data(encode_frame(F.Ack("data", (entry,))), 0) == \
        [S.AckReceived("data", (entry,))]
    # nack of 2: 2 and 3 leave the wire; 1 was acked already
    (nack,) = p.a.receive_data(encode_frame(F.Nack("data", 2, "no", True, "busy", 1.5)), 0)
    assert nack == S.NackReceived("data", 2, "no", True, "busy", 1.5)
    assert p.a.remaining("data") is None
    third = F.AckEntry(3, b"\0" * 32, 0, "f3", "f3", 1.0)
    (closed,) = p.a.receive_data(encode_frame(F.Ack("data", (third,))), 0)
    assert "ack for message 3 on 'data', which is not in flight" in closed.reason


def test_a_twice_acked_message_is_a_violation():
    p = opened()
    p.a.send_msg("data", 1, "f", 0, b"\0" * 32)
    entry = F.AckEntry(1, b"\0" * 32, 0, "f", "f", 1.0)
    assert p.a.receive_data(encode_frame(F.Ack("data", (entry,))), 0)
    (closed,) = p.a.receive_data(encode_frame(F.Ack("data", (entry,))), 0)
    assert "not in flight" in closed.reason and p.a.state is S.State.CLOSED


def test_a_nack_keeps_older_messages_in_flight_and_rewinds_the_next_msg():
    p = opened()
    for seq in (1, 2):
        p.a.send_msg("data", seq, "f", 0, b"\0" * 32)
    p.a.receive_data(encode_frame(F.Nack("data", 2, "no", True)), 0)
    entry = F.AckEntry(1, b"\0" * 32, 0, "f", "f", 1.0)
    assert p.a.receive_data(encode_frame(F.Ack("data", (entry,))), 0) == \
        [S.AckReceived("data", (entry,))]
    p.a.data_to_send(0)
    p.a.send_msg("data", 2, "f", 0, b"\0" * 32)
    p.a.send_msg("data", 3, "g", 0, b"\0" * 32)
    msgs = [f for f in frames_of(p.a.data_to_send(0)) if isinstance(f, F.Msg)]
    assert [(m.seq, m.rewind) for m in msgs] == [(2, True), (3, False)]
    (closed,) = p.a.receive_data(encode_frame(F.Nack("data", 9, "no", True)), 0)
    assert "nack for message 9 on 'data', which is not in flight" in closed.reason


@pytest.mark.parametrize("frame, what", [
    (F.Ack("alerts", (F.AckEntry(1, b"\0" * 32, 0, "f", "f", 1.0),)), "ack"),
    (F.Credit("alerts", 1), "credit"),
    (F.Nack("alerts", 1, "no", True), "nack"),
])
def test_frames_about_our_sending_need_a_channel_the_peer_offered(frame, what):
    p = opened(a_channels=chans(names=("data",)))
    (closed,) = p.b.receive_data(encode_frame(frame), 0)
    assert f"{what} for channel 'alerts', which the peer did not offer" in closed.reason


@pytest.mark.parametrize("frame", [F.Data("zzz", 1, b"x"),
                                   F.Msg("zzz", 1, "f", 1, b"\0" * 32)])
def test_frames_about_our_receiving_need_a_channel_we_configured(frame):
    p = opened()
    (closed,) = p.a.receive_data(encode_frame(frame), 0)
    what = type(frame).__name__.lower()
    assert f"violation: {what} on channel 'zzz', which is not configured for peer bravo" \
        in closed.reason


def test_data_must_belong_to_the_started_message_and_fit_its_size():
    p = opened()
    (closed,) = p.a.receive_data(encode_frame(F.Data("data", 1, b"x")), 0)
    assert "data for message 1 on 'data', which was not started" in closed.reason
    p = opened()
    wire = encode_frame(F.Msg("data", 4, "f", 3, b"\0" * 32, 1))
    events = p.a.receive_data(wire + encode_frame(F.Data("data", 4, b"ab")), 0)
    assert events == [S.MessageStart("data", 4, "f", 3, b"\0" * 32, 1, False),
                      S.MessageData("data", 4, 1, b"ab"), S.MessageComplete("data", 4)]
    events = p.a.receive_data(encode_frame(F.Msg("data", 5, "g", 2, b"\0" * 32))
                              + encode_frame(F.Data("data", 6, b"a")), 0)
    assert "data for message 6" in events[-1].reason
    p = opened()
    events = p.a.receive_data(encode_frame(F.Msg("data", 5, "g", 2, b"\0" * 32))
                              + encode_frame(F.Data("data", 5, b"a"))
                              + encode_frame(F.Data("data", 5, b"bc")), 0)
    assert events[1] == S.MessageData("data", 5, 0, b"a")
    assert "data beyond the announced size of message 5 on 'data'" in events[-1].reason


def test_a_resumed_message_that_is_already_whole_completes_at_once():
    p = opened()
    events = p.a.receive_data(encode_frame(F.Msg("data", 2, "f", 7, b"\0" * 32, 7)), 0)
    assert events == [S.MessageStart("data", 2, "f", 7, b"\0" * 32, 7, False),
                      S.MessageComplete("data", 2)]
    # complete: the next msg may start without rewind
    assert len(p.a.receive_data(encode_frame(F.Msg("data", 3, "g", 1, b"\0" * 32)), 0)) == 1


def test_an_abandoned_message_is_replaced_by_a_rewind_msg():
    p = opened()
    p.a.send_msg("data", 1, "f", 10, b"\0" * 32)
    p.a.send_data("data", b"12345")
    assert p.a.remaining("data") == 5
    p.a.abandon("data")
    assert p.a.remaining("data") is None and p.a.sendable("data") == 0
    p.a.send_msg("data", 2, "g", 3, b"\0" * 32)
    p.a.send_data("data", b"xyz")
    p.pump()
    events = p.take("b")
    assert S.MessageStart("data", 2, "g", 3, b"\0" * 32, 0, True) in events
    assert events[-1] == S.MessageComplete("data", 2)


def test_the_sender_refuses_its_own_mistakes():
    p = opened(b_channels=chans(credit=10 << 20))
    with pytest.raises(LocalProtocolError, match="no message in progress"):
        p.a.send_data("data", b"x")
    with pytest.raises(LocalProtocolError, match="no message in progress"):
        p.a.send_data("nope", b"x")
    with pytest.raises(LocalProtocolError, match="does not accept"):
        p.a.send_msg("nope", 1, "f", 1, b"\0" * 32)
    p.a.send_msg("data", 1, "f", CHUNK_SIZE + 10, b"\0" * 32, offset=5)
    assert p.a.remaining("data") == CHUNK_SIZE + 5
    assert p.a.sendable("data") == CHUNK_SIZE
    with pytest.raises(LocalProtocolError, match="not finished"):
        p.a.send_msg("data", 2, "g", 1, b"\0" * 32)
    with pytest.raises(LocalProtocolError, match="chunk size"):
        p.a.send_data("data", b"x" * (CHUNK_SIZE + 1))
    p.a.send_data("data", b"x" * CHUNK_SIZE)
    assert p.a.sendable("data") == 5
    with pytest.raises(LocalProtocolError, match="message size"):
        p.a.send_data("data", b"x" * 6)
    p.a.send_data("data", b"x" * 5)
    assert p.a.remaining("data") == 0 and p.a.sendable("data") == 0
    p.a.send_msg("data", 2, "g", 1, b"\0" * 32)
    p.a.close("bye")
    assert p.a.sendable("data") == 0 and p.a.remaining("data") == 1
    with pytest.raises(LocalProtocolError, match="session is closed"):
        p.a.send_data("data", b"x")


def test_receiver_actions_on_unknown_channels_are_our_bug():
    p = opened()
    with pytest.raises(LocalProtocolError):
        p.a.send_ack("nope", [F.AckEntry(1, b"\0" * 32, 0, "f", "f", 1.0)])
    with pytest.raises(LocalProtocolError):
        p.a.send_nack("nope", 1, "no", True)
    assert not p.a.discarding("nope")


def test_acks_are_split_into_frames_of_at_most_the_limit():
    p = opened()
    entries = [F.AckEntry(i, b"\0" * 32, 0, "f", "f", 1.0)
               for i in range(1, 2 * F.MAX_ACK_ENTRIES + 2)]
    p.a.send_ack("data", entries)
    acks = frames_of(p.a.data_to_send(0))
    assert [len(a.entries) for a in acks] == [F.MAX_ACK_ENTRIES, F.MAX_ACK_ENTRIES, 1]
    assert [e for a in acks for e in a.entries] == entries


def test_a_nack_carries_its_fields_and_cuts_the_reason():
    p = opened()
    p.a.receive_data(encode_frame(F.Msg("data", 1, "f", 5, b"\0" * 32)), 0)
    p.a.send_nack("data", 1, "r" * 5000, False, F.NACK_STALE, 2.5)
    assert p.a.discarding("data") and not p.a.discarding("alerts")
    assert frames_of(p.a.data_to_send(0)) == [F.Nack("data", 1, "r" * F.MAX_REASON_CHARS, False,
                                                     F.NACK_STALE, 2.5)]
    # discarding: data of the nacked message is dropped and its credit returned
    assert p.a.receive_data(encode_frame(F.Data("data", 1, b"abc")), 0) == []
    assert frames_of(p.a.data_to_send(0)) == [F.Credit("data", 3)]
    assert p.a.receive_data(encode_frame(F.Msg("data", 2, "g", 0, b"\0" * 32)), 0) == []
    events = p.a.receive_data(encode_frame(F.Msg("data", 1, "f", 0, b"\0" * 32, 0, True)), 0)
    assert events[0].rewind and not p.a.discarding("data")


def test_a_checkpoint_reaches_the_peer_only_while_open():
    p = Pair()
    p.a.send_checkpoint(b"early")                 # during the handshake: dropped (hello has it)
    p.pump()
    p.take("b")
    p.a.send_checkpoint(b"line")
    p.pump()
    assert p.take("b") == [S.CheckpointReceived(b"line")]


def test_defaults_and_initial_state():
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=100.0)
    assert (a.node, a.peer, a.state) == ("alpha", "bravo", S.State.HANDSHAKE)
    assert a.peer_hello is None and a.peer_channels == {} and a.close_reason is None
    assert a.get_timer() == 110.0                       # handshake_timeout 10 s
    b = S.Session(node="bravo", peer="alpha", channels=chans(), now=100.0)
    # opened by the peer's hello before our own went out: deadlines count from `now`
    a.receive_data(b.data_to_send(100.0), 100.0)
    assert a.get_timer() == 105.0                       # heartbeat_interval 5 s
    assert a.heartbeat.dead_at() == 115.0               # heartbeat_timeout 15 s
    assert a.sendable("data") == 0 and a.remaining("data") is None


def test_credit_granted_during_the_handshake_follows_the_hello():
    a = S.Session(node="alpha", peer="bravo", channels=chans(), now=0.0)
    a.grant("data", 9)
    a.grant("data", 1)
    got = frames_of(a.data_to_send(0.0))
    assert [type(f) for f in got] == [F.Hello, F.Credit] and got[1] == F.Credit("data", 10)


def test_every_control_frame_overtakes_queued_bulk_frames():
    p = opened(heartbeat_interval=5.0)
    p.a.receive_data(encode_frame(F.Msg("data", 1, "in", 5, b"\0" * 32)), 0)
    p.a.send_msg("data", 1, "f", 4, b"\0" * 32)
    p.a.send_data("data", b"abcd")
    p.a.receive_data(encode_frame(F.Ping(3)), 0)
    p.a.send_ack("alerts", [F.AckEntry(1, b"\0" * 32, 0, "f", "f", 1.0)])
    p.a.send_nack("data", 1, "no", True)
    assert p.a.handle_timer(5.0) == []
    assert p.a.get_timer() == 10.0                     # the ping counts as sent at once
    kinds = [type(f) for f in frames_of(p.a.data_to_send(5.0))]
    assert kinds == [F.Pong, F.Ack, F.Nack, F.Ping, F.Msg, F.Data]


def test_a_violation_bye_overtakes_queued_bulk_frames():
    p = opened()
    p.a.send_msg("data", 1, "f", 4, b"\0" * 32)
    p.a.receive_data(encode_frame(F.Hello(2, "bravo", ())), 0)     # a second hello
    kinds = [type(f) for f in frames_of(p.a.data_to_send(0))]
    assert kinds == [F.Bye, F.Msg]


def test_discarded_data_returns_all_its_credit_in_one_grant():
    p = opened()
    p.a.receive_data(encode_frame(F.Msg("data", 1, "f", 9, b"\0" * 32)), 0)
    p.a.send_nack("data", 1, "no", True)
    p.a.data_to_send(0)
    p.a.receive_data(encode_frame(F.Data("data", 1, b"abc"))
                     + encode_frame(F.Data("data", 1, b"defg")), 0)
    p.a.grant("data", 2)
    assert frames_of(p.a.data_to_send(0)) == [F.Credit("data", 9)]


def test_an_ack_for_the_nacked_message_is_a_violation():
    p = opened()
    p.a.send_msg("data", 1, "f", 0, b"\0" * 32)
    p.a.receive_data(encode_frame(F.Nack("data", 1, "no", True)), 0)
    entry = F.AckEntry(1, b"\0" * 32, 0, "f", "f", 1.0)
    (closed,) = p.a.receive_data(encode_frame(F.Ack("data", (entry,))), 0)
    assert "ack for message 1 on 'data', which is not in flight" in closed.reason


def test_an_unknown_pong_measures_nothing():
    p = opened()
    assert p.a.receive_data(encode_frame(F.Pong(12345)), 1.0) == []


def test_a_heartbeat_timeout_says_how_long_the_peer_was_silent():
    p = opened(heartbeat_interval=100.0, heartbeat_timeout=15.0)
    p.a.receive_data(encode_frame(F.Ping(1)), 2.0)
    (closed,) = p.a.handle_timer(17.0)
    assert closed == S.SessionClosed("heartbeat timeout: nothing received for 15.0s",
                                     error=True, by_peer=True)


# -- the late SHA-256 (a big file sent while it is still being hashed) -------------------

def late_message(p, payload, ch="data", seq=1):
    """Send `payload` as message `seq` whose Msg carries no SHA-256; no Sum yet."""
    p.a.send_msg(ch, seq, "big.bin", len(payload), None)
    offset = 0
    while offset < len(payload):
        n = p.a.sendable(ch)
        p.a.send_data(ch, payload[offset:offset + n])
        offset += n
    p.pump()


def violation(p, key="b"):
    closed = [e for e in p.events[key] if isinstance(e, S.SessionClosed)]
    return closed[0].reason if closed else None


@pytest.mark.parametrize("size", [0, 10, CHUNK_SIZE + 5])
def test_a_message_without_its_sha256_completes_only_with_the_sum_after_its_data(size):
    p = opened()
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    sha = hashlib.sha256(payload).digest()
    assert p.a.peer_late_hash and p.b.peer_late_hash       # both offer it by default
    late_message(p, payload)
    events = p.take("b")
    assert events[0] == S.MessageStart("data", 1, "big.bin", size, None, 0, False)
    assert b"".join(e.data for e in events if isinstance(e, S.MessageData)) == payload
    assert not any(isinstance(e, S.MessageComplete) for e in events)    # not without the sum
    assert p.a.sum_due("data")
    with pytest.raises(LocalProtocolError, match="not finished"):
        p.a.send_msg("data", 2, "next", 1, sha)            # the Sum comes first
    p.a.send_sum("data", 1, sha)
    assert not p.a.sum_due("data")
    p.pump()
    assert p.take("b") == [S.MessageComplete("data", 1, sha)]
    with pytest.raises(LocalProtocolError, match="not awaiting its sum"):
        p.a.send_sum("data", 1, sha)                       # once
    p.a.send_msg("data", 2, "next", 0, sha)                # then the channel goes on
    p.pump()
    assert p.take("b")[-1] == S.MessageComplete("data", 2)


def test_a_sum_before_the_last_data_byte_is_a_violation():
    p = opened()
    p.a.send_msg("data", 1, "big.bin", 10, None)
    p.a.send_data("data", b"12345")
    p.a.channels["data"].outgoing.remaining = 0            # pretend, to send the sum early
    p.a.send_sum("data", 1, b"\0" * 32)
    p.pump()
    assert "before its last data byte" in violation(p)


@pytest.mark.parametrize("sha, seq", [(b"\1" * 32, 1), (None, 2)])
def test_a_sum_for_a_message_that_awaits_none_is_a_violation(sha, seq):
    p = opened()
    p.a.send_msg("data", 1, "one", 0, sha)
    p.pump()
    p.a.channels["data"].outgoing.sum_due = False
    p.a._queue(F.Sum("data", seq, b"\0" * 32), control=False)
    p.pump()
    assert f"sum for message {seq} on 'data', which is not awaiting one" in violation(p)


def test_a_msg_while_the_previous_awaits_its_sum_is_a_violation_unless_it_rewinds():
    p = opened()
    late_message(p, b"abc")
    p.a.channels["data"].outgoing.sum_due = False          # pretend, to start the next one
    p.a.send_msg("data", 2, "two", 1, b"\0" * 32)
    p.pump()
    assert "starts before message 1 is complete" in violation(p)
    q = opened()
    late_message(q, b"abc")
    q.a.abandon("data")                                    # our file went bad mid-way
    q.a.send_msg("data", 1, "big.bin", 0, b"\2" * 32)      # rewinds
    q.pump()
    assert violation(q) is None
    assert q.take("b")[-1] == S.MessageComplete("data", 1)


def test_a_sum_after_our_nack_is_discarded_with_the_rest():
    p = opened()
    late_message(p, b"abc")
    p.take("b")
    p.b.send_nack("data", 1, "no room", True, F.NACK_BUSY, 1.0)
    p.a.send_sum("data", 1, b"\0" * 32)                    # crossed the nack on the wire
    p.pump()
    assert violation(p) is None and violation(p, "a") is None
    assert p.take("b") == []


def test_the_late_sha256_is_only_for_a_peer_that_offers_it():
    p = opened(late_hash=False)
    assert not p.a.peer_late_hash
    with pytest.raises(LocalProtocolError, match="needs the SHA-256 in the msg"):
        p.a.send_msg("data", 1, "big.bin", 10, None)
    p.a._queue(F.Msg("data", 1, "big.bin", 10, None), control=False)   # a peer that does
    p.pump()
    assert "carries no SHA-256, and our hello did not offer 'lh'" in violation(p)
