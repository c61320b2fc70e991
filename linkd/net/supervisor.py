"""Per-peer supervision: dial with backoff, accept and identify, one session per peer.

* `dial_loop` (peers with `connect`): wait until the peer has no session,
  dial, TLS handshake, check identity, run the session; on any failure back
  off (capped exponential with jitter, reset after a stable session: one
  that stayed open at least heartbeat_timeout) and try again, forever. While
  waiting it sleeps: no CPU. It changes the peer's state only while no
  session holds the slot (a dial that lost the tie-break leaves "connected").
* `handle_inbound` (the listener): TLS handshake within handshake_timeout, in
  which the certificate must name a configured peer (net/tls.py); a client
  naming no configured peer fails the handshake (a TLS alert) and never gets a
  byte of ours.
* `run_session`: the slot. If the peer already has a session, the tie-break
  is deterministic on both sides: a re-dial from the same side replaces the
  old session (the dialler believes it dead); between sessions dialled from
  different sides, the one dialled by the node whose name sorts first wins.
  The loser gets a bare goodbye before any hello is read.

Size: over 400 lines on purpose: dialling, accepting and the slot's tie-break
together decide who holds a peer's one session, and are read together when
that rule changes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Protocol

import trio
from structlog.typing import FilteringBoundLogger

from ..config import Config, LinkConfig
from ..errors import RemoteProtocolError
from ..metrics import connect_failure_kind
from ..proto import frames as F
from ..proto import session as S
from ..proto.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from ..status.board import PeerStatus, StatusBoard
from ..wakeup import Wakeup
from .admission import Gate, Ticket
from .backoff import Backoff
from .connection import IDLE_READ, LINGER, READ_SIZE, SessionRunner
from .peer import PeerLink
from .tls import TLSContexts, TLSRefused, tls_info


class Host(Protocol):
    """What the supervisor needs of the daemon (linkd.daemon.Daemon is one; the
    virtual-time tests give a small fake)."""

    @property
    def cfg(self) -> Config: ...
    @property
    def tls(self) -> TLSContexts: ...
    @property
    def log(self) -> FilteringBoundLogger: ...
    @property
    def links(self) -> Mapping[str, PeerLink]: ...
    @property
    def board(self) -> StatusBoard | None: ...      # None: no connect-failure counts
    @property
    def gate(self) -> Gate | None: ...              # None: no admission limits


def _remote_of(stream: trio.abc.Stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (OSError, AttributeError):   # AttributeError: a non-socket stream (tests)
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def new_wins(node: str, peer: str, existing: SessionRunner, new: SessionRunner) -> bool:
    if existing.dialed_by_us == new.dialed_by_us:
        return True
    first = min(node, peer)
    new_dialer = node if new.dialed_by_us else peer
    return new_dialer == first


async def refuse(stream: trio.abc.Stream, reason: str, linger: float = 0.0) -> None:
    """Say `reason` in a goodbye and close. `linger`: read on (dropping what comes) for
    up to that long, until the peer closes its end; closing with its hello unread
    would reset the connection, and the reset can drop our goodbye on the peer's side
    (used by a stopping daemon, whose refusals are few; a flood is refused at once)."""
    with trio.move_on_after(2):
        try:
            await stream.send_all(encode_frame(F.Bye(reason)))
            with trio.move_on_after(linger):
                while await stream.receive_some(IDLE_READ):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


def _host(remote: str) -> str:
    return remote.rsplit(":", 1)[0].strip("[]")


async def read_hello(runner: SessionRunner, peer: str) -> str | None:
    """Read the peer's first frame without sending ours: None when it is a valid hello
    from `peer` (kept in runner.preread for the session), else why not."""
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    got = bytearray()
    deadline = runner.handshake_deadline
    if deadline is None:
        deadline = trio.current_time() + runner.link.cfg.link.handshake_timeout
    try:
        with trio.fail_at(deadline):
            while True:
                data = await runner.stream.receive_some(READ_SIZE)
                if not data:
                    return "connection closed before its hello"
                got += data
                decoder.feed(data)
                frame = decoder.next_frame()
                if frame is not None:
                    break
        S.check_hello(frame, peer)
    except trio.TooSlowError:
        return "handshake timeout: no hello from the peer"
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        return f"connection lost before its hello: {exc.__cause__ or exc}"
    except RemoteProtocolError as exc:
        return f"protocol violation: {exc}"
    runner.preread = bytes(got)
    return None


def _alive(link: PeerLink, existing: SessionRunner) -> bool:
    """The live session heard from its peer within two heartbeat intervals."""
    session = existing.session
    if session is None or session.state is not S.State.OPEN:
        return False
    lcfg = link.cfg.link
    window = min(lcfg.heartbeat_timeout, 2 * lcfg.heartbeat_interval)
    return bool(trio.current_time() - session.heartbeat.last_received < window)


async def _refuse_runner(link: PeerLink, runner: SessionRunner, reason: str, *, error: bool,
                         bye: str | None = None, linger: float = 0.0) -> None:
    (link.log.warning if error else link.log.info)(
        "session_refused", peer=link.name, remote=runner.remote, reason=reason)
    runner.reason, runner.error = reason, error
    await refuse(runner.stream, bye or reason, linger)


async def _refused_late(daemon: Host, link: PeerLink, runner: SessionRunner) -> bool:
    """Refuse a session about to take the slot when, while it waited, a SIGHUP removed
    its peer or the daemon began to stop. Its handshake was under way when the
    goodbyes were said: a session taking the slot now would get none (the stop would
    wait for it, then cut it)."""
    if link.removed:
        await refuse(runner.stream, "peer is no longer configured")
        return True
    if getattr(daemon, "stopping", False):
        await _refuse_runner(link, runner, "shutting down", error=False, bye=BYE_SHUTDOWN,
                             linger=LINGER)
        return True
    return False


async def run_session(daemon: Host, link: PeerLink, runner: SessionRunner) -> None:
    existing = link.active
    if existing is not None and new_wins(daemon.cfg.node.name, link.name, existing, runner):
        # A live session is replaced only by a connection whose own hello is valid
        # (CONTRACT §5): read it first, without sending ours.
        problem = await read_hello(runner, link.name)
        if problem is not None:
            await _refuse_runner(link, runner, f"not replacing the live session: {problem}",
                                 error=True, bye=problem)
            return
        existing = link.active
        if existing is not None and _host(existing.remote) != _host(runner.remote):
            alive = _alive(link, existing)
            link.log.warning(
                "peer_identity_conflict", peer=link.name, remote=runner.remote,
                existing_remote=existing.remote, existing_alive=alive,
                reason=f"two hosts present the identity of {link.name}: {existing.remote} "
                       f"(connected) and {runner.remote} (new)" + (
                           "; keeping the live session" if alive else
                           "; the connected one is silent, replacing it"))
            if alive:
                await _refuse_runner(
                    link, runner, f"duplicate session: {link.name} is connected and alive "
                                  f"from {existing.remote}", error=True)
                return
    async with link.slot_lock:
        if await _refused_late(daemon, link, runner):
            return
        existing = link.active
        if existing is not None:
            if not new_wins(daemon.cfg.node.name, link.name, existing, runner):
                dialer = daemon.cfg.node.name if existing.dialed_by_us else link.name
                reason = f"duplicate session: keeping the one dialled by {dialer}"
                await _refuse_runner(link, runner, reason, error=False)  # the link is up
                return
            if not runner.preread:      # the slot was taken while we waited for the lock
                problem = await read_hello(runner, link.name)
                if problem is not None:
                    await _refuse_runner(link, runner,
                                         f"not replacing the live session: {problem}",
                                         error=True, bye=problem)
                    return
            await existing.close("replaced by a newer session")
            await link.wait_idle()
            if await _refused_late(daemon, link, runner):   # (a stop, a reload meanwhile)
                return
        link.take_slot(runner)
    try:
        reason, error = await runner.run()
    finally:
        link.release_slot(runner)
        runner.reported.set()   # (set before the lines below, which run without a pause)
    if runner.was_open:
        level = link.log.warning if error else link.log.info
        level("link_down", peer=link.name, remote=runner.remote, reason=reason,
              clean=not error)
    else:
        if error and reason.startswith(_REFUSED_STOPPING):
            error = False   # refused by a peer that is stopping: a restart, not a fault
        (link.log.warning if error else link.log.info)(
            "session_failed", peer=link.name, remote=runner.remote, reason=reason)
    if link.active is None:
        idle = "waiting" if link.peer.connect is None else "backoff"
        link.status.set_state(idle, error=reason if error else None)
    if peer_asked_to_redial(reason):
        redial_now(link)


# A goodbye whose reason starts with one of these means "I am going away on
# purpose and back at once" (a reload rebinding, a restart): the dialling side
# skips its backoff instead of waiting up to reconnect_max.
REDIAL_REASONS = ("reload:", "shutdown:", "reconnect:")
_PEER_BYE = "peer said goodbye: "
_REFUSED_STOPPING = "refused by the peer: shutdown:"
# `linkctl reconnect --force`: the live session ends, both sides dial or wait at once
BYE_RECONNECT = "reconnect: an operator asked for a new session"
BYE_SHUTDOWN = "shutdown: peer is shutting down"


def peer_asked_to_redial(reason: str | None) -> bool:
    """True for the peer's "reload:"/"shutdown:" goodbye, and for our own reload
    closing the session (we renegotiate at once; no backoff for that either)."""
    if not reason:
        return False
    if reason.startswith(("reload:", "reconnect:")):
        return True
    return reason.startswith(_PEER_BYE) and reason[len(_PEER_BYE):].startswith(REDIAL_REASONS)


def _redial_event(link: PeerLink) -> trio.Event:
    event = link.redial
    if event is None:
        event = link.redial = trio.Event()
    return event


def redial_now(link: PeerLink) -> None:
    """Skip the rest of the backoff: the dial loop dials at once (`linkctl reconnect`)."""
    link.redial_pending = True
    _redial_event(link).set()


# --------------------------------------------------------------------------- outages

STILL_DOWN_FIRST = 10.0      # seconds into an outage before the first link_still_down
STILL_DOWN_MAX = 60.0        # then doubling intervals, at most one a minute


def still_down_schedule(first: float = STILL_DOWN_FIRST,
                        cap: float = STILL_DOWN_MAX) -> Iterator[float]:
    """Seconds into an outage at which link_still_down is logged: 10, 30, 70, 130, 190..."""
    at, gap = first, first
    while True:
        yield at
        gap = min(gap * 2, cap)
        at += gap


async def outage_watch(link: PeerLink, poll: float = 1.0, up_poll: float = 60.0) -> None:
    """Log `link_still_down` while the peer is down (CONTRACT §8, §10): an outage is
    never silent. Reads the board every `poll` seconds while down; while connected it
    sleeps until the peer's state changes (PeerStatus.listeners), `up_poll` at most:
    a hub of hundreds of connected peers must not wake each every few seconds. The
    outage is timed from its `down_since`, so noticing it late moves nothing."""
    outage: dt.datetime | None = None
    schedule: Iterator[float] = iter(())
    next_at = 0.0
    started = 0.0
    was_up = False                   # at start a link is down until a session opens
    changed = Wakeup()

    def wake(state: str) -> None:
        changed.set()
    watched: PeerStatus | None = None
    try:
        while True:
            if was_up:
                with trio.move_on_after(up_poll):
                    await changed.wait()
            else:
                await trio.sleep(poll)
            status = link.status
            if status is not watched:        # listen to the status object in use now
                if watched is not None and wake in watched.listeners:
                    watched.listeners.remove(wake)
                watched = status
                status.listeners.append(wake)
            down = status.down_since if status.state != "connected" else None
            was_up = status.state == "connected"
            if down is None:
                outage = None
                continue
            if down != outage:
                outage, schedule, started = down, still_down_schedule(), trio.current_time()
                # an outage older than this task (a restart while down) counts from its start
                started -= max(0.0, (dt.datetime.now(dt.UTC) - down).total_seconds())
                next_at = next(schedule)
            if trio.current_time() - started >= next_at:
                link.log.warning("link_still_down", peer=link.name, state=status.state,
                                 down_since=down.isoformat().replace("+00:00", "Z"),
                                 down_for_s=round(trio.current_time() - started, 1),
                                 attempts=status.attempts, last_error=status.last_error)
                while next_at <= trio.current_time() - started:
                    next_at = next(schedule)
    finally:
        if watched is not None and wake in watched.listeners:
            watched.listeners.remove(wake)


OpenStream = Callable[[str, int], Awaitable[trio.abc.Stream]]


def stable_after(lcfg: LinkConfig) -> float:
    """Seconds a session must stay open for the backoff to start again from the floor.

    A session that dies right after its hello (a peer in a crash loop, a flapping
    link) must not make us redial at `reconnect_min` forever; one that outlived a
    full heartbeat timeout has proven the path works.
    """
    return float(lcfg.heartbeat_timeout)


async def dial_loop(daemon: Host, link: PeerLink, *,
                    open_stream: OpenStream = trio.open_tcp_stream) -> None:
    """`open_stream` is a test seam (MockClock tests inject an unreachable network)."""
    lcfg = daemon.cfg.link
    backoff = Backoff(lcfg.reconnect_min, lcfg.reconnect_max)
    board = daemon.board
    while True:
        await link.wait_idle()
        connect = link.peer.connect
        if connect is None or getattr(daemon, "stopping", False):
            return      # (stopping: the goodbye was said, its link scope ends next)
        host, port = connect
        remote = f"{host}:{port}"
        link.redial_pending = False
        link.status.set_state("connecting")
        link.status.attempts += 1
        outcome = await _dial(daemon, link, host, port, remote, open_stream)
        if outcome is not None:
            if board is not None and outcome.startswith("cannot connect"):
                board.note_connect_failure(link.name, connect_failure_kind(outcome))
            # Only while no other session holds the slot: an attempt that lost the
            # tie-break to the peer's dial-in must not turn "connected" into "backoff".
            if link.active is None:
                link.status.set_state("backoff", error=outcome)
        elif link.last_session_open:
            backoff.reset()
        if link.redial_pending:
            backoff.reset()           # the peer said it is back at once, or an operator asked
            link.redial_pending = False
            continue
        lcfg = daemon.cfg.link          # (a reload's new bounds apply from here)
        backoff.minimum = lcfg.reconnect_min
        backoff.maximum = max(lcfg.reconnect_max, lcfg.reconnect_min)
        delay = backoff.next_delay()
        if link.active is None:
            link.status.set_state(
                "backoff", next_attempt_at=dt.datetime.now(dt.UTC)
                + dt.timedelta(seconds=delay))
        event = link.redial = trio.Event()
        with trio.move_on_after(delay):
            await event.wait()
        if event.is_set():
            backoff.reset()


async def _dial(daemon: Host, link: PeerLink, host: str, port: int, remote: str,
                open_stream: OpenStream = trio.open_tcp_stream) -> str | None:
    """One attempt. Returns a failure reason, or None if a session ran."""
    lcfg = daemon.cfg.link
    link.last_session_open = False
    try:
        with trio.fail_after(lcfg.handshake_timeout):
            tcp = await open_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        # trio's "all attempts to connect ... failed" carries the real errors in its cause.
        cause: BaseException = exc
        if isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
            cause = exc.__cause__.exceptions[-1]
        if not isinstance(cause, OSError):
            cause = exc
        detail = getattr(cause, "strerror", None) or str(cause)
        # trio words it "Error connecting to ('127.0.0.1', 7443): Connection refused"
        detail = detail.split("): ", 1)[1] if detail.startswith("Error connecting to (") \
            and "): " in detail else detail
        reason = f"cannot connect to {remote}: " + (
            "timed out" if isinstance(exc, trio.TooSlowError) else detail)
        link.log.debug("connect_failed", reason=reason)
        return reason
    remote = _remote_of(tcp)
    deadline = trio.current_time() + lcfg.handshake_timeout   # TLS and hello together
    sni = None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        sni = host
    contexts: TLSContexts = daemon.tls
    tls_stream = contexts.client_stream(tcp, link.peer, server_hostname=sni,
                                        configured=list(daemon.cfg.peers))
    try:
        with trio.fail_at(deadline):
            identity = await contexts.finish_handshake(tls_stream)
    except (TLSRefused, trio.TooSlowError) as exc:
        reason = "TLS handshake timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
        link.log.warning("tls_refused", remote=remote, reason=reason, peer=link.name)
        await trio.aclose_forcefully(tls_stream)
        return f"TLS with {remote} refused: {reason}"
    runner = SessionRunner(link, tls_stream, remote=remote, dialed_by_us=True,
                           tls_info=tls_info(tls_stream, identity))
    runner.handshake_deadline = deadline
    await run_session(daemon, link, runner)
    # Only a stable session resets the backoff (see stable_after).
    link.last_session_open = runner.was_open and runner.open_seconds >= stable_after(lcfg)
    if runner.was_open or (runner.reason is not None and not runner.error):
        return None     # a session ran, or we lost the tie-break to a live one
    return runner.reason or "session failed"


def _host_of(stream: trio.abc.Stream) -> str:
    try:
        return str(stream.socket.getpeername()[0])  # type: ignore[attr-defined]
    except (OSError, AttributeError, IndexError):
        return "?"


async def _release_on_open(runner: SessionRunner, ticket: Ticket) -> None:
    await runner.opened.wait()
    ticket.release()


async def handle_inbound(daemon: Host, tcp: trio.SocketStream) -> None:
    """One accepted connection. It counts against the gate (net/admission.py) until
    its hello is validated, and gets one handshake_timeout from the TCP accept for
    the TLS handshake *and* the hello."""
    started = trio.current_time()
    remote = _remote_of(tcp)
    gate = daemon.gate
    ticket: Ticket | None = None
    if gate is not None:
        admitted = gate.admit(_host_of(tcp))
        if isinstance(admitted, str):
            daemon.log.warning("connection_refused", remote=remote, reason=admitted)
            await trio.aclose_forcefully(tcp)
            return
        ticket = admitted
    try:
        await _handle_inbound(daemon, tcp, remote, started, ticket)
    finally:
        if ticket is not None:
            ticket.release()


async def _handle_inbound(daemon: Host, tcp: trio.SocketStream, remote: str, started: float,
                          ticket: Ticket | None) -> None:
    lcfg = daemon.cfg.link
    deadline = started + lcfg.handshake_timeout
    contexts: TLSContexts = daemon.tls
    tls_stream = contexts.server_stream(tcp, list(daemon.cfg.peers))
    try:
        with trio.fail_at(deadline):
            identity = await contexts.finish_handshake(tls_stream)
    except (TLSRefused, trio.TooSlowError) as exc:
        reason = "TLS handshake timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
        daemon.log.warning("tls_refused", remote=remote, reason=reason)
        await trio.aclose_forcefully(tls_stream)
        return
    link = daemon.links.get(identity.peer.name)
    if link is None:
        daemon.log.warning("tls_refused", remote=remote, reason="peer no longer configured")
        await trio.aclose_forcefully(tls_stream)
        return
    runner = SessionRunner(link, tls_stream, remote=remote, dialed_by_us=False,
                           tls_info=tls_info(tls_stream, identity))
    runner.handshake_deadline = deadline
    async with trio.open_nursery() as nursery:
        if ticket is not None:
            nursery.start_soon(_release_on_open, runner, ticket)
        await run_session(daemon, link, runner)
        nursery.cancel_scope.cancel()
