"""Fuzz targets for the frame decoder and the sans-IO Session (issue 8.10).

Each target takes one bytes input and must either finish or raise only what
the code under test promises: the decoder `RemoteProtocolError` (a peer's bad
bytes), the Session nothing at all (it turns a peer's violation into a
SessionClosed event) and, for calls we make ourselves, `LocalProtocolError`.
Anything else -- an IndexError, a KeyError, a RecursionError, an assertion --
is a crash: atheris (tests/fuzz/run.py) saves the input, and the input is kept
as a regression test (tests/proto/test_fuzz_regressions.py replays the corpus).

Shared by the atheris runner and by the plain replay test, so it imports
nothing but linkd (no atheris).
"""

from __future__ import annotations

import hashlib

from linkd.errors import LocalProtocolError, RemoteProtocolError
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.proto.framing import FrameDecoder, encode_frame

MAX_FRAME = 1 << 20
CHANNELS = ("alerts", "data")


def channels() -> list[F.ChannelHello]:
    return [F.ChannelHello(name=n, max=10 << 20, credit=1 << 20) for n in CHANNELS]


def decoder(data: bytes) -> None:
    """Arbitrary bytes, fed in two pieces, into the length-prefix decoder."""
    dec = FrameDecoder(MAX_FRAME)
    cut = data[0] % (len(data) + 1) if data else 0
    try:
        for piece in (data[:cut], data[cut:]):
            dec.feed(piece)
            while (frame := dec.next_frame()) is not None:
                # what decodes must encode again (round trip)
                again = FrameDecoder(MAX_FRAME)
                again.feed(encode_frame(frame))
                assert again.next_frame() == frame, frame
    except RemoteProtocolError:
        pass


def _hello_bytes() -> bytes:
    peer = S.Session(node="alpha", peer="bravo", channels=channels(), now=0.0)
    return peer.data_to_send(0.0)


HELLO = _hello_bytes()


def receiver(data: bytes) -> None:
    """A valid hello from alpha, then arbitrary bytes, into bravo's Session; also its
    timer, in steps of virtual time taken from the input."""
    s = S.Session(node="bravo", peer="alpha", channels=channels(), now=0.0)
    s.data_to_send(0.0)
    now = 0.0
    events = s.receive_data(HELLO, now)
    assert s.state is S.State.OPEN, events
    step = 997
    for i in range(0, len(data), step):
        now += (data[i] % 8) * 0.5
        s.receive_data(data[i:i + step], now)
        s.handle_timer(now)
        s.data_to_send(now)
        if s.state is S.State.CLOSED:
            break
    s.receive_data(b"", now + 1)          # the peer hangs up


def sender(data: bytes) -> None:
    """bravo sends messages while alpha's side of the wire is driven by the input:
    acks (matching or not), nacks of every kind, credit, pings and byes, as
    well-formed frames, in any order."""
    s = S.Session(node="bravo", peer="alpha", channels=channels(), now=0.0)
    s.data_to_send(0.0)
    s.receive_data(HELLO, 0.0)
    now, pos, seq = 0.0, 0, {c: 0 for c in CHANNELS}

    def take(n: int = 1) -> int:
        nonlocal pos
        chunk = data[pos:pos + n]
        pos += n
        return int.from_bytes(chunk.ljust(n, b"\0"), "big")

    while pos < len(data) and s.state is S.State.OPEN:
        op = take() % 10
        ch = CHANNELS[take() % 2]
        n = take(2)
        frame: F.Frame | None = None
        try:
            if op == 0:                                   # we start a message
                seq[ch] += 1
                body = bytes(n % 300)
                digest = hashlib.sha256(body).digest()
                late = bool(n & 0x8000)                   # its SHA-256 in a Sum after it
                s.send_msg(ch, seq[ch], f"f{seq[ch]}", len(body), None if late else digest, 0)
                while body and s.sendable(ch):
                    piece, body = body[:s.sendable(ch)], body[s.sendable(ch):]
                    s.send_data(ch, piece)
                if s.sum_due(ch):
                    s.send_sum(ch, seq[ch], digest)
            elif op == 1:                                 # we abandon it
                s.abandon(ch)
            elif op == 2:
                frame = F.Ack(ch, (F.AckEntry(n % (seq[ch] + 2), bytes(32), n % 300,
                                              f"f{n}", f"f{n}", float(n)),))
            elif op == 3:
                kind = (F.NACK_RETRY, F.NACK_BUSY, F.NACK_STALE, "other")[n % 4]
                frame = F.Nack(ch, n % (seq[ch] + 2), f"r{n}", bool(n & 1), kind,
                               float(n % 5))
            elif op == 4:
                frame = F.Credit(ch, n * 97)
            elif op == 5:
                frame = F.Ping(n)
            elif op == 6:
                frame = F.Pong(n)
            elif op == 7:
                now += (n % 40) * 0.25
                s.handle_timer(now)
            elif op == 8:
                s.grant(ch, n)
            else:
                frame = F.Bye(f"bye {n}")
        except LocalProtocolError:
            pass                                          # our own illegal call: refused
        if frame is not None:
            s.receive_data(encode_frame(frame), now)
        s.data_to_send(now)


TARGETS = {"decoder": decoder, "receiver": receiver, "sender": sender}
