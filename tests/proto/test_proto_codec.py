"""The frame codec: round trips, byte-at-a-time feeding, limits checked before buffering."""

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from linkd.errors import RemoteProtocolError
from linkd.proto import frames as F
from linkd.proto.framing import FrameDecoder, encode_frame

channel_names = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,20}", fullmatch=True)
file_names = st.text(st.characters(blacklist_characters="/\x00\x7f",
                                   blacklist_categories=("Cs", "Cc")),
                     min_size=1, max_size=40).filter(lambda n: not n.startswith("."))
u64 = st.integers(0, (1 << 64) - 1)
seqs = st.integers(1, F.MAX_SEQ)


@st.composite
def msgs(draw):
    size = draw(st.integers(0, 1 << 40))
    return F.Msg(draw(channel_names), draw(seqs), draw(file_names), size,
                 draw(st.none() | st.binary(min_size=32, max_size=32)),
                 draw(st.integers(0, size)), draw(st.booleans()))


ack_entries = st.builds(F.AckEntry, seqs, st.binary(min_size=32, max_size=32), u64,
                        file_names, file_names, st.floats(0, 1e10))

hellos = st.builds(
    F.Hello, st.just(F.PROTOCOL_VERSION), st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True),
    st.lists(st.builds(F.ChannelHello, channel_names, u64, st.integers(-100, 100),
                       st.integers(0, F.MAX_SEQ),
                       st.none() | st.tuples(u64, u64), u64),
             max_size=5, unique_by=lambda c: c.name).map(tuple),
    st.none(), st.booleans())

frames = st.one_of(
    hellos,
    st.builds(F.Bye, st.text(max_size=100)),
    st.builds(F.Ping, u64), st.builds(F.Pong, u64),
    msgs(),
    st.builds(F.Data, channel_names, seqs, st.binary(max_size=2048)),
    st.builds(F.Sum, channel_names, seqs, st.binary(min_size=32, max_size=32)),
    st.builds(F.Ack, channel_names, st.lists(ack_entries, min_size=1, max_size=5).map(tuple)),
    st.builds(F.Nack, channel_names, seqs, st.text(max_size=100), st.booleans(),
              st.sampled_from([F.NACK_RETRY, F.NACK_BUSY, F.NACK_STALE]),
              st.floats(0, 3600), st.none() | st.integers(0, (1 << 64) - 1)),
    st.builds(F.Credit, channel_names, st.integers(0, 1 << 40)),
)


@given(st.lists(frames, min_size=1, max_size=8))
def test_frames_round_trip_fed_whole_and_byte_at_a_time(sequence):
    wire = b"".join(encode_frame(f) for f in sequence)
    whole = FrameDecoder()
    whole.feed(wire)
    assert [whole.next_frame() for _ in sequence] == sequence
    assert whole.next_frame() is None

    trickle = FrameDecoder()
    got = []
    for i in range(len(wire)):
        trickle.feed(wire[i:i + 1])
        while (frame := trickle.next_frame()) is not None:
            got.append(frame)
    assert got == sequence


def test_oversized_length_is_refused_before_the_body_arrives():
    decoder = FrameDecoder(max_frame=1000)
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        decoder.feed(struct.pack(">I", 1001))
    assert decoder.buffered == 4


def test_zero_length_frame_is_a_violation():
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(b"\0\0\0\0")


ENTRY = {"s": 7, "h": b"h" * 32, "z": 3, "n": "a", "d": "a", "at": 1.0}


def raw(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("body,match", [
    ([1, 2], "not a msgpack map"),
    ({"x": 1}, "no string type"),
    ({"t": "warp"}, "unknown frame type"),
    ({"t": "ack", "ch": "data"}, "lacks field"),
    ({"t": "ack", "ch": "data", "a": []}, "entries"),
    ({"t": "ack", "ch": "data", "a": [{**ENTRY, "s": -1}]}, "out of range"),
    ({"t": "ack", "ch": "data", "a": [{**ENTRY, "s": 1 << 60}]}, "out of range"),
    ({"t": "ack", "ch": "data", "a": [{**ENTRY, "s": True}]}, "wrong type"),
    ({"t": "ack", "ch": "data", "a": [{**ENTRY, "h": b"x"}]}, "SHA-256"),
    ({"t": "ack", "ch": "data", "a": [{**ENTRY, "d": "a/b"}]}, "bad file"),
    ({"t": "ack", "ch": "../etc", "a": [ENTRY]}, "invalid channel"),
    ({"t": "data", "ch": "d", "s": 1, "d": b"x" * (256 * 1024 + 1)}, "at most"),
    ({"t": "nack", "ch": "d", "s": 1, "why": "", "retry": True, "k": "other"}, "kind"),
    ({"t": "nack", "ch": "d", "s": 1, "why": "", "retry": True, "w": -1}, "seconds"),
    ({"t": "nack", "ch": "d", "s": 1, "why": "", "retry": True, "r": -1}, "'r'"),
    ({"t": "nack", "ch": "d", "s": 1, "why": "", "retry": True, "r": "0"}, "'r'"),
    ({"t": "msg", "ch": "d", "s": 1, "n": "a\nb", "z": 1, "h": b"\0" * 32, "o": 0},
     "control character"),
    ({"t": "hello", "v": 2, "node": "a", "ch": [{"n": "x", "max": 1, "c": (1 << 64) - 1,
                                                 "cr": 0}]}, "out of range"),
    ({"t": "msg", "ch": "d", "s": 1, "n": "../x", "z": 1, "h": b"\0" * 32, "o": 0}, "bad file"),
    ({"t": "msg", "ch": "d", "s": 1, "n": ".hidden", "z": 1, "h": b"\0" * 32, "o": 0},
     "bad file"),
    ({"t": "msg", "ch": "d", "s": 1, "n": "a" * 256, "z": 1, "h": b"\0" * 32, "o": 0},
     "bad file"),
    ({"t": "msg", "ch": "d", "s": 1, "n": "ok", "z": 1, "h": b"\0" * 31, "o": 0}, "SHA-256"),
    ({"t": "msg", "ch": "d", "s": 1, "n": "ok", "z": 1, "h": b"\0" * 32, "o": 2}, "beyond"),
    ({"t": "msg", "ch": "d", "s": 0, "n": "ok", "z": 1, "h": b"\0" * 32, "o": 0}, "range"),
    ({"t": "hello", "v": 1, "node": "a/b", "ch": []}, "invalid node"),
    ({"t": "hello", "v": 1, "node": "a", "ch": [{"n": "x", "max": 1, "c": 0, "cr": 0},
                                                 {"n": "x", "max": 1, "c": 0, "cr": 0}]},
     "repeated"),
])
def test_malformed_frames_are_protocol_errors(body, match):
    decoder = FrameDecoder()
    decoder.feed(raw(body))
    with pytest.raises(RemoteProtocolError, match=match):
        decoder.next_frame()


def test_garbage_body_is_a_protocol_error():
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    with pytest.raises(RemoteProtocolError, match="msgpack"):
        decoder.next_frame()


@given(st.binary(min_size=1, max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(blob):
    decoder = FrameDecoder(max_frame=4096)
    try:
        decoder.feed(blob)
        while decoder.next_frame() is not None:
            pass
    except RemoteProtocolError:
        pass


def test_unknown_extra_keys_are_ignored_for_forward_compatibility():
    decoder = FrameDecoder()
    decoder.feed(raw({"t": "ack", "ch": "data", "a": [ENTRY], "future": [1, 2]}))
    assert decoder.next_frame() == F.Ack("data", (F.AckEntry(7, b"h" * 32, 3, "a", "a", 1.0),))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\0b", "a\x1fb", "a\x7fb", ".hidden",
                                  "x" * 256])
def test_a_name_the_spool_would_not_write_is_refused_on_the_wire(name):
    # One rule (linkd.names) for the wire and the spool: what a peer may name, we may write.
    from linkd import names
    from linkd.spool import layout
    assert layout.plain_name_problem is names.plain_name_problem
    assert names.plain_name_problem(name) is not None
    body = msgpack.packb({"t": "msg", "ch": "d", "s": 1, "n": name, "z": 1, "h": b"\0" * 32,
                          "o": 0}, use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match="bad file: file name "):
        F.decode_body(body, 1 << 20)


@pytest.mark.parametrize("name, ok", [("a", True), ("a" * 64, True), ("a" * 65, False),
                                      (".", False), ("..", False), ("a.b-c_D9", True),
                                      ("a b", False), ("a\n", False), ("", False)])
def test_channel_names_follow_one_rule(name, ok):
    from linkd import names
    assert names.is_channel_name(name) is ok
    frame = {"t": "credit", "ch": name, "b": 1}
    if ok:
        assert F.map_to_frame(frame) == F.Credit(name, 1)
    else:
        with pytest.raises(RemoteProtocolError, match="invalid channel"):
            F.map_to_frame(frame)
