"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes.

Theory of operation
-------------------
The decoder checks the announced length against the limit *before* it
buffers the body, so a hostile peer cannot make us hold more than one
maximum-sized frame (plus what one `feed` brought). `next_frame()` returns
None when it needs more data.

`feed()` cuts the byte stream into whole frame bodies as it goes and keeps
nothing of the fed buffer (the caller may reuse it); `next_frame()` decodes
the bodies one at a time, in order. So that bulk data is copied once between
the TLS layer and the disk:

* a body that is whole in the fed buffer is copied out of it at once;
* a large body (LARGE_BODY or more: a data frame carries up to 256 KiB) that
  is not gets a bytearray of its own as soon as its length prefix is read,
  and the bytes that follow are copied into it straight from the fed buffers;
* only a small body cut between feeds is gathered in a bytearray first (two
  copies of a few bytes).

Either way each byte of a large frame is copied once, and a data frame's
payload is handed out as a read-only view of the frame's own buffer
(frames.decode_body), not copied again by msgpack.

`copied` counts the body bytes copied while framing (the tests pin the
one-copy property with it, not with a clock). A length violation is raised by
`feed()` when nothing decoded is waiting before it, otherwise by the next
`next_frame()`: the session closes either way.
"""

from __future__ import annotations

import collections
import struct

from ..errors import RemoteProtocolError
from .frames import Frame, decode_body, encode_body, encode_data_head

HEADER = struct.Struct(">I")
CHUNK_SIZE = 256 * 1024
DEFAULT_MAX_FRAME = (1 << 20) + 64 * 1024   # 1 MiB of payload + header room
LARGE_BODY = 64 * 1024                       # bodies this big get a buffer of their own


def encode_frame(frame: Frame) -> bytes:
    body = encode_body(frame)
    return HEADER.pack(len(body)) + body


def encode_data_frame_head(ch: str, seq: int, size: int) -> bytes:
    """encode_frame(Data(ch, seq, d)) without `d` (of `size` bytes), which follows it."""
    head = encode_data_head(ch, seq, size)
    return HEADER.pack(len(head) + size) + head


class FrameDecoder:
    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()     # the next frame's length prefix and (small) body
        self._body: bytearray | None = None   # a large frame's own buffer, being filled
        self._filled = 0
        self._ready: collections.deque[bytes | bytearray] = collections.deque()
        self._error: RemoteProtocolError | None = None
        self._buffered = 0          # bytes fed and not yet returned as frames
        self.copied = 0             # body bytes copied while framing (see the top)

    def _length(self, prefix: bytes | bytearray) -> int:
        n: int = HEADER.unpack_from(prefix)[0]
        if n > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {n} bytes announced, over the limit of {self.max_frame}")
        if n == 0:
            raise RemoteProtocolError("empty frame")
        return n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buffered += len(data)
        try:
            self._cut(memoryview(data))
        except RemoteProtocolError as exc:
            if not self._ready:
                raise
            self._error = exc       # the frames before it come first... up to next_frame

    def _cut(self, view: memoryview) -> None:
        buf = self._buf
        while view:
            body = self._body
            if body is not None:
                take = min(len(view), len(body) - self._filled)
                body[self._filled:self._filled + take] = view[:take]
                self.copied += take
                self._filled += take
                view = view[take:]
                if self._filled == len(body):
                    self._ready.append(body)
                    self._body = None
                continue
            if len(buf) < 4:
                take = 4 - len(buf)
                buf += view[:take]
                view = view[take:]
                if len(buf) < 4:
                    return
                n = self._length(buf)
                if n >= LARGE_BODY and len(view) < n:
                    # Not whole in this feed: give it its own buffer now, so that its
                    # bytes are copied once, straight from the fed buffers.
                    self._body, self._filled = bytearray(n), 0
                    buf.clear()
                    continue
            else:
                (n,) = HEADER.unpack_from(buf)
            take = min(len(view), 4 + n - len(buf))
            if len(buf) == 4 and take == n:
                # A whole body in the fed buffer: one copy, straight out of it.
                self._ready.append(bytes(view[:n]))
            else:
                buf += view[:take]          # a small body cut between feeds: two copies
                self.copied += take
                if len(buf) < 4 + n:
                    return
                with memoryview(buf) as whole:
                    self._ready.append(bytes(whole[4:]))
            self.copied += n
            buf.clear()
            view = view[take:]

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned as frames (length prefixes included)."""
        return self._buffered

    def next_frame(self) -> Frame | None:
        if self._error is not None:
            raise self._error
        if not self._ready:
            return None
        body = self._ready.popleft()
        self._buffered -= 4 + len(body)
        return decode_body(body, self.max_frame)
