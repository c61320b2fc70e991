"""Write the seed corpus (tests/fuzz/corpus/<target>/) from real Sessions.

Two Sessions (alpha, bravo) are pumped into each other through a whole
exchange: hello, messages of several sizes on two channels (one resumed at an
offset, one abandoned and rewound), acks, a nack of each kind, credit, ping and
pong, goodbye. Every frame alpha puts on the wire is recorded:

* decoder/   each frame alone, and the whole stream (hello included);
* receiver/  what bravo receives after alpha's hello (the receiver target
             feeds alpha's hello itself), whole and cut in halves;
* sender/    a few op strings for the sender target (see targets.sender).

Deterministic; run it again after a wire change: python tests/fuzz/make_corpus.py
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from targets import CHANNELS, channels

from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.proto.framing import FrameDecoder

HERE = Path(__file__).resolve().parent


def record() -> list[bytes]:
    """The frames (as wire bytes) alpha sends to bravo in one realistic session."""
    now = 0.0
    a = S.Session(node="alpha", peer="bravo", channels=channels(), now=now)
    b = S.Session(node="bravo", peer="alpha", channels=channels(), now=now)
    wire: list[bytes] = []

    def pump() -> None:
        moved = True
        while moved:
            moved = False
            out = a.data_to_send(now)
            if out:
                wire.append(out)
                b.receive_data(out, now)
                moved = True
            back = b.data_to_send(now)
            if back:
                a.receive_data(back, now)
                moved = True

    pump()
    for seq, (ch, size) in enumerate([("data", 0), ("alerts", 10), ("data", 3000)], 1):
        body = bytes(i % 251 for i in range(size))
        a.send_msg(ch, seq, f"file-{seq}.txt", size, hashlib.sha256(body).digest(), 0)
        while body:
            n = a.sendable(ch)
            a.send_data(ch, body[:n])
            body = body[n:]
        pump()
        entry = F.AckEntry(seq, hashlib.sha256(bytes(i % 251 for i in range(size))).digest(),
                           size, f"file-{seq}.txt", f"file-{seq}.txt", 1.5)
        b.send_ack(ch, [entry])
        pump()
    late = b"hashed while sent"
    a.send_msg("alerts", 5, "late.bin", len(late), None, 0)    # its SHA-256 after the data
    a.send_data("alerts", late)
    a.send_sum("alerts", 5, hashlib.sha256(late).digest())
    pump()
    a.send_msg("data", 4, "resumed.bin", 100, bytes(32), 60)   # a resume at an offset
    a.send_data("data", bytes(40))
    a.abandon("data")                                          # and abandoned
    a.send_msg("data", 4, "resumed.bin", 5, bytes(32), 0)      # rewound
    a.send_data("data", b"hello")
    for kind in (F.NACK_RETRY, F.NACK_BUSY, F.NACK_STALE):
        a.send_nack("alerts", 9, f"refused ({kind or 'retry'})", True, kind, 1.0)
    a.grant("alerts", 12345)
    pump()
    now = 30.0
    a.handle_timer(now)                                        # a ping
    pump()
    a.close("shutting down")
    pump()
    frames: list[bytes] = []
    for chunk in wire:
        dec = FrameDecoder(1 << 24)
        dec.feed(chunk)
        start = 0
        while dec.next_frame() is not None:
            end = len(chunk) - dec.buffered
            frames.append(bytes(chunk[start:end]))
            start = end
    return frames


def main() -> None:
    frames = record()
    corpus = HERE / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    seeds: dict[str, list[bytes]] = {
        "decoder": [*dict.fromkeys(f for f in frames if len(f) < 4096), b"".join(frames[:8])],
        "receiver": [],
        "sender": [bytes([0, 1, 0, 50, 2, 1, 0, 1]), bytes([0, 0, 0, 9, 3, 0, 0, 1, 7, 0, 0, 9]),
                   bytes([0, 1, 1, 0, 4, 1, 0, 3, 0, 1, 0, 2, 3, 1, 0, 1, 1, 1, 0, 0]),
                   bytes([5, 0, 0, 1, 6, 0, 0, 1, 7, 0, 0, 39, 8, 1, 0, 1, 9, 0, 0, 0])],
    }
    stream = b"".join(frames[1:])                              # after alpha's hello
    seeds["receiver"] = [stream, stream[:len(stream) // 2], stream[len(stream) // 2:],
                         *[f for f in frames[1:] if len(f) < 4096][:20]]
    for target, items in seeds.items():
        folder = corpus / target
        folder.mkdir(parents=True)
        for i, item in enumerate(items):
            (folder / f"seed-{i:03d}").write_bytes(item)
    total = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    print(f"wrote {sum(len(v) for v in seeds.values())} seeds ({total} bytes) to {corpus}; "
          f"channels {', '.join(CHANNELS)}")


if __name__ == "__main__":
    main()
