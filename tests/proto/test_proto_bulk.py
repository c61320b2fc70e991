"""The bulk data path through the sans-IO core, pinned by counting (never by timing).

Receiving: the frame decoder copies each byte of a large frame once, from the fed
buffer into the frame's own buffer, keeps nothing of the fed buffer, and hands a data
frame's payload out as a read-only view of that buffer (msgpack does not copy it
again). Its msgpack shortcut for data frames accepts and refuses exactly what msgpack
does. Sending: the payload is copied once, into the output buffer that
data_to_send() hands over, byte for byte as encode_frame would write it.
"""

import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linkd.errors import RemoteProtocolError
from linkd.proto import frames as F
from linkd.proto import framing
from linkd.proto import session as S
from linkd.proto.framing import (
    HEADER,
    LARGE_BODY,
    FrameDecoder,
    encode_data_frame_head,
    encode_frame,
)

CHUNK = 256 * 1024


def data_frames(n: int, size: int = CHUNK) -> list[F.Data]:
    return [F.Data("data", i + 1, bytes([i % 251]) * size) for i in range(n)]


def cuts(wire: bytes, piece: int) -> list[bytes]:
    """`wire` in pieces of about `piece` bytes, like TLS reads."""
    return [wire[i:i + piece] for i in range(0, len(wire), piece)]


@pytest.mark.parametrize("piece", [CHUNK, 100_000, 1 << 20, 3 * 4096 + 7, 1])
def test_each_byte_of_a_large_frame_is_copied_once_and_the_payload_not_again(piece):
    frames = data_frames(3 if piece > 1 else 1, CHUNK if piece > 1 else LARGE_BODY + 5)
    wire = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    got = []
    for chunk in cuts(wire, piece):
        fed = bytearray(chunk)
        decoder.feed(fed)
        fed[:] = b"\xee" * len(fed)     # the reader reuses its buffer: nothing of it is kept
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
    assert got == frames
    bodies = len(wire) - HEADER.size * len(frames)
    assert decoder.copied == bodies     # once each, length prefixes aside
    for frame in got:
        assert isinstance(frame.data, memoryview) and frame.data.readonly
        assert len(frame.data.obj) == len(F.encode_body(frame))   # the frame's own buffer
    assert decoder.buffered == 0


def test_small_frames_keep_their_bytes_types_and_are_not_shortcut():
    decoder = FrameDecoder()
    small = F.Data("data", 1, b"x" * 100)
    decoder.feed(encode_frame(small) + encode_frame(F.Ping(3)))
    assert decoder.next_frame() == small and decoder.next_frame() == F.Ping(3)
    assert decoder.copied == len(F.encode_body(small)) + len(F.encode_body(F.Ping(3)))


def test_a_payload_view_hashes_and_compares_like_bytes():
    (frame,) = data_frames(1)
    decoder = FrameDecoder()
    decoder.feed(encode_frame(frame))
    got = decoder.next_frame()
    assert isinstance(got, F.Data) and got == frame and hash(got) == hash(frame)
    assert hashlib.sha256(got.data).digest() == hashlib.sha256(frame.data).digest()


# -- the msgpack shortcut for data frames agrees with msgpack ------------------------

def slow_decode(body: bytes, max_bin: int) -> object:
    """decode_body without the shortcut: the frame, or 'refused'."""
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                            max_bin_len=max_bin, max_str_len=64 * 1024, max_array_len=4096,
                            max_map_len=64, max_ext_len=0)
        return F.map_to_frame(m)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData,
            RemoteProtocolError):
        return "refused"


def fast_decode(body: bytes, max_bin: int) -> object:
    try:
        return F.decode_body(body, max_bin)
    except RemoteProtocolError:
        return "refused"


values = st.one_of(
    st.text(max_size=40), st.integers(-(1 << 63), (1 << 64) - 1), st.binary(max_size=40),
    st.booleans(), st.none(), st.floats(allow_nan=False),
    st.lists(st.integers(-1000, 1000), max_size=3))
keys = st.sampled_from(["t", "ch", "s", "d", "x", "", "é"])


@st.composite
def data_bodies(draw):
    """Bodies like a data frame's, often valid, sometimes not, always >= 4096 bytes."""
    m = {"t": draw(st.sampled_from(["data", "data", "msg", ""])),
         "ch": draw(st.sampled_from(["data", "a" * 64, "a" * 65, "../x", "dáta"])),
         "s": draw(st.sampled_from([1, 0, 255, 256, 65536, F.MAX_SEQ, F.MAX_SEQ + 1, -1, True])),
         "d": draw(st.sampled_from([b"p" * 5000, b"q" * (F.MAX_DATA + 1), b"r" * 70000]))}
    for k, v in draw(st.lists(st.tuples(keys, values), max_size=3)):
        m[k] = v
    order = draw(st.permutations(list(m)))
    body = bytearray(msgpack.packb({k: m[k] for k in order}, use_bin_type=True))
    for pos, byte in draw(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                   max_size=2)):
        if pos < len(body):
            body[pos] = byte            # a flipped byte in the head: any type, any length
    cut = draw(st.sampled_from([0, 0, 1, 3]))
    return bytes(body[:len(body) - cut]) + draw(st.sampled_from([b"", b"", b"\xc0"]))


@settings(max_examples=1000, deadline=None)
@given(data_bodies(), st.sampled_from([1 << 20, 4096, 70000]))
def test_the_data_frame_shortcut_decodes_exactly_what_msgpack_decodes(body, max_bin):
    assert fast_decode(body, max_bin) == slow_decode(body, max_bin)


def packed(**fields) -> bytes:
    m = {"t": "data", "ch": "data", "s": 1, "d": b"p" * 5000, **fields}
    return msgpack.packb(m, use_bin_type=True)


@pytest.mark.parametrize("body, max_bin", [
    (packed(), 4096),                                   # a bin over the frame limit
    (packed(), 1 << 20),                                # ... and under it
    (packed(x="é" * 200), 1 << 20),                     # str8 text, non-ASCII
    (packed()[:-1], 1 << 20),                           # truncated
    (packed() + b"\x00", 1 << 20),                      # trailing bytes
    (packed(s=-1), 1 << 20), (packed(s=True), 1 << 20), (packed(s=(1 << 64) - 1), 1 << 20),
    (packed(ch=b"data"), 1 << 20), (packed(d="text" * 2000), 1 << 20),
    (packed(t="msg"), 1 << 20), (packed(ch="a" * 65), 1 << 20),
    (packed(x=None, y=1.5, z=[1]), 1 << 20),            # types the shortcut leaves to msgpack
    (packed(d=b"q" * (F.MAX_DATA + 1)), 1 << 20),
    (packed().replace(b"\xa2ch", b"\xa2c\xff"), 1 << 20),  # a key that is not UTF-8
])
def test_the_shortcut_and_msgpack_agree_at_every_limit(body, max_bin):
    assert fast_decode(body, max_bin) == slow_decode(body, max_bin)


def test_the_shortcut_is_taken_for_our_data_frames():
    (frame,) = data_frames(1)
    body = F.encode_body(frame)
    assert F._data_map(body, 1 << 20) is not None
    assert isinstance(F.decode_body(body, 1 << 20).data, memoryview)


# -- sending: one copy, into the buffer that is handed over ---------------------------

@given(st.sampled_from(["d", "data", "a" * 64]),
       st.sampled_from([1, 127, 128, 255, 256, 65535, 65536, 1 << 32, F.MAX_SEQ]),
       st.sampled_from([0, 1, 255, 256, 65535, 65536, CHUNK]))
def test_a_data_frame_head_is_what_encode_frame_writes_before_the_payload(ch, seq, size):
    payload = b"z" * size
    assert encode_data_frame_head(ch, seq, size) + payload == encode_frame(
        F.Data(ch, seq, payload))


def opened_pair() -> tuple[S.Session, S.Session]:
    chans = [F.ChannelHello(name="data", max=1 << 30, credit=4 << 20)]
    a = S.Session(node="alpha", peer="bravo", channels=chans, now=0.0)
    b = S.Session(node="bravo", peer="alpha", channels=chans, now=0.0)
    b.receive_data(a.data_to_send(0.0), 0.0)
    a.receive_data(b.data_to_send(0.0), 0.0)
    assert a.state is S.State.OPEN and b.state is S.State.OPEN
    return a, b


def test_send_data_copies_the_payload_once_into_the_buffer_data_to_send_hands_over(
        monkeypatch):
    a, b = opened_pair()
    payload = bytes(range(256)) * 1024
    a.send_msg("data", 1, "x", 2 * len(payload), hashlib.sha256(payload * 2).digest())

    def no_msgpack(frame):
        raise AssertionError(f"the payload went through msgpack: {type(frame).__name__}")
    monkeypatch.setattr(framing, "encode_body", no_msgpack)
    a.send_data("data", payload)
    a.send_data("data", memoryview(payload))
    monkeypatch.undo()
    out = a.data_to_send(0.0)
    assert isinstance(out, bytearray)               # handed over, not copied again
    assert out.endswith(encode_frame(F.Data("data", 1, payload)) * 2)
    before = bytes(out)
    a.handle_timer(1e9)                             # a ping: output after the hand-over
    assert a.data_to_send(1e9)
    assert out == before                            # ... goes to another buffer
    events = b.receive_data(out, 0.0)
    assert b"".join(e.data for e in events if isinstance(e, S.MessageData)) == payload * 2


def test_has_output_says_whether_data_to_send_has_anything():
    a, b = opened_pair()
    assert not a.has_output and a.data_to_send(0.0) == b""
    a.grant("data", 10)                             # credit to give back
    assert a.has_output
    assert a.data_to_send(0.0) and not a.has_output
    b.receive_data(encode_frame(F.Ping(7)), 0.0)    # a pong to answer
    assert b.has_output
    b.data_to_send(0.0)
    assert not b.has_output
