"""Per-channel credit windows: pure arithmetic (h2's windows, aioquic's Limit).

The receiver grants bytes of data; the sender spends them. A sender never has
more than the granted amount of data in flight, so the receiver's memory is
bounded by its own grants.
"""

from __future__ import annotations

from ..errors import LocalProtocolError, RemoteProtocolError

MAX_WINDOW = 1 << 40


class SendWindow:
    """Credit we may spend (granted by the peer)."""

    def __init__(self, initial: int) -> None:
        self.available = initial

    def grant(self, n: int) -> None:
        if self.available + n > MAX_WINDOW:
            raise RemoteProtocolError(f"credit grant overflows the window ({n} bytes)")
        self.available += n

    def spend(self, n: int) -> None:
        if n > self.available:
            raise LocalProtocolError(f"spending {n} bytes with only {self.available} of credit")
        self.available -= n


class ReceiveWindow:
    """Credit we granted and the peer has not spent yet."""

    def __init__(self, initial: int) -> None:
        self.outstanding = initial

    def consume(self, n: int) -> None:
        if n > self.outstanding:
            raise RemoteProtocolError(
                f"peer sent {n} bytes of data with only {self.outstanding} bytes of credit")
        self.outstanding -= n

    def grant(self, n: int) -> None:
        self.outstanding += n
