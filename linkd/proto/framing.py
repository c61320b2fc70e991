"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes.

The decoder checks the announced length against the limit *before* it
buffers the body, so a hostile peer cannot make us hold more than one
maximum-sized frame. `next_frame()` returns None when it needs more data.
"""

from __future__ import annotations

import struct

from ..errors import RemoteProtocolError
from .frames import Frame, decode_body, encode_body

HEADER = struct.Struct(">I")
CHUNK_SIZE = 256 * 1024
DEFAULT_MAX_FRAME = (1 << 20) + 64 * 1024   # 1 MiB of payload + header room


def encode_frame(frame: Frame) -> bytes:
    body = encode_body(frame)
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None   # body length of the frame being read

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data
        if self._need is None:
            self._check_header()

    def _check_header(self) -> None:
        if len(self._buf) >= 4:
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_frame:
                raise RemoteProtocolError(
                    f"frame of {n} bytes announced, over the limit of {self.max_frame}")
            if n == 0:
                raise RemoteProtocolError("empty frame")
            self._need = n

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> Frame | None:
        if self._need is None:
            self._check_header()
            if self._need is None:
                return None
        n = self._need
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        self._need = None
        self._check_header()
        return decode_body(body, self.max_frame)
