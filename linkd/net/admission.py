"""Admission of unauthenticated connections, and accept loops that survive EMFILE.

A TCP connection is *unauthenticated* from accept until its peer's hello has
been validated (TLS handshake, certificate, hello). Each one holds a
descriptor and a little memory, so they are bounded (CONTRACT §5):

* in total and per source address, both derived from the descriptor limit
  (RLIMIT_NOFILE) at start, leaving a reserve for the spool, the live
  sessions, inotify and the status socket (`Limits.from_rlimit`);
* in time: one `handshake_timeout` from the TCP connection to the hello
  (linkd.net.supervisor).

A connection over a bound is closed at once, before the TLS handshake: it
costs one descriptor for a few microseconds. A flood of idle connections
therefore holds at most `total` descriptors, and one source at most
`per_source`.

`serve_listener` is the one accept loop (peer listener, status socket,
metrics): out of descriptors (EMFILE, ENFILE) or memory it logs one line
(rate-limited by linkd.log) and waits a little, never a traceback; trio's own
`serve_listeners` logs those with a traceback through the stdlib logger.
"""

from __future__ import annotations

import dataclasses
import errno
import resource
from collections.abc import Awaitable, Callable

import trio
from structlog.typing import FilteringBoundLogger

# accept() failures that mean "no capacity now": wait and accept again
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = (0.05, 1.0)    # seconds: first wait after a capacity error, at most
UNLIMITED_NOFILE = 65536        # what RLIM_INFINITY counts as


@dataclasses.dataclass(frozen=True)
class Limits:
    nofile: int          # the soft descriptor limit the bounds were derived from
    reserve: int         # descriptors kept for the spool, live sessions, inotify, status
    total: int           # unauthenticated connections at once, all sources
    per_source: int      # unauthenticated connections at once from one IP address

    @classmethod
    def from_nofile(cls, nofile: int) -> Limits:
        """A quarter of the descriptors (at least 64) is the reserve; a third of the
        rest (at most 1024) may be unauthenticated, an eighth of that (2..32) from one
        address. 1024 descriptors: 256 total, 32 per source, 512 never touched."""
        reserve = max(64, nofile // 4)
        total = max(4, min(1024, (nofile - reserve) // 3))
        per_source = max(2, min(32, total // 8))
        return cls(nofile, reserve, total, per_source)

    @classmethod
    def from_rlimit(cls) -> Limits:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft <= 0:
            soft = UNLIMITED_NOFILE
        return cls.from_nofile(int(soft))


class Ticket:
    """One admitted unauthenticated connection; `release()` is idempotent."""

    def __init__(self, gate: Gate, source: str) -> None:
        self._gate: Gate | None = gate
        self.source = source

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._release(self.source)


class Gate:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.count = 0
        self.by_source: dict[str, int] = {}
        self.refused = 0

    def admit(self, source: str) -> Ticket | str:
        """A Ticket, or the reason the connection is refused."""
        if self.count >= self.limits.total:
            self.refused += 1
            return (f"too many unauthenticated connections ({self.limits.total}, "
                    f"from RLIMIT_NOFILE {self.limits.nofile})")
        if self.by_source.get(source, 0) >= self.limits.per_source:
            self.refused += 1
            return (f"too many unauthenticated connections from {source} "
                    f"({self.limits.per_source})")
        self.count += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return Ticket(self, source)

    def _release(self, source: str) -> None:
        self.count -= 1
        left = self.by_source.get(source, 1) - 1
        if left > 0:
            self.by_source[source] = left
        else:
            self.by_source.pop(source, None)


async def serve_listener(listener: trio.SocketListener,
                         handler: Callable[[trio.SocketStream], Awaitable[None]],
                         log: FilteringBoundLogger, what: str,
                         accepting: trio.CancelScope | None = None) -> None:
    """Accept forever, one task per connection, closed when its handler returns. A
    capacity error (EMFILE...) is one
    log line and a short wait; a handler's unexpected error is one log line and
    ends only that connection. Cancelling `accepting` stops accepting and closes
    the listening socket (a dialler is then refused by the kernel) while the
    connections already accepted go on: this returns when their handlers have."""
    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop accepting
            log.error("connection_crashed", listener=what, reason=repr(exc))
        finally:            # as trio.serve_listeners does: the stream ends with its handler
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        with accepting or trio.CancelScope():
            async with listener:
                await _accept_loop(listener, guarded, nursery, log, what)


async def _accept_loop(listener: trio.SocketListener,
                       guarded: Callable[[trio.SocketStream], Awaitable[None]],
                       nursery: trio.Nursery, log: FilteringBoundLogger, what: str) -> None:
    delay = ACCEPT_BACKOFF[0]
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            log.error("accept_failed", listener=what, errno=errno.errorcode.get(
                exc.errno or 0, str(exc.errno)),
                reason=f"cannot accept a connection on {what}: "
                       f"{exc.strerror or exc}; retrying in {delay:g}s")
            await trio.sleep(delay)
            delay = min(delay * 2, ACCEPT_BACKOFF[1])
            continue
        delay = ACCEPT_BACKOFF[0]
        nursery.start_soon(guarded, stream)
