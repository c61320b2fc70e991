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
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from ..metrics import connect_failure_kind
from ..proto import frames as F
from ..proto.framing import encode_frame
from .backoff import Backoff
from .connection import SessionRunner
from .tls import TLSContexts, TLSRefused, tls_info


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


async def refuse(stream: trio.abc.Stream, reason: str) -> None:
    with trio.move_on_after(2):
        try:
            await stream.send_all(encode_frame(F.Bye(reason)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


async def run_session(daemon: Any, link: Any, runner: SessionRunner) -> None:
    async with link.slot_lock:
        if link.removed:        # a SIGHUP removed the peer while this session waited
            await refuse(runner.stream, "peer is no longer configured")
            return
        existing = link.active
        if existing is not None:
            if not new_wins(daemon.cfg.node.name, link.name, existing, runner):
                dialer = daemon.cfg.node.name if existing.dialed_by_us else link.name
                reason = f"duplicate session: keeping the one dialled by {dialer}"
                link.log.info("session_refused", remote=runner.remote, reason=reason)
                runner.reason, runner.error = reason, False    # not a fault: the link is up
                await refuse(runner.stream, reason)
                return
            await existing.close("replaced by a newer session")
            await link.wait_idle()
        link.take_slot(runner)
    try:
        reason, error = await runner.run()
    finally:
        link.release_slot(runner)
    if runner.was_open:
        level = link.log.warning if error else link.log.info
        level("link_down", peer=link.name, remote=runner.remote, reason=reason,
              clean=not error)
        link.status.rtt_ms = link.status.rtt_ms
    else:
        link.log.warning("session_failed", peer=link.name, remote=runner.remote, reason=reason)
    if link.active is None:
        idle = "waiting" if link.peer.connect is None else "backoff"
        link.status.set_state(idle, error=reason if error else None)
    if peer_asked_to_redial(reason):
        redial_now(link)


# A goodbye whose reason starts with one of these means "I am going away on
# purpose and back at once" (a reload rebinding, a restart): the dialling side
# skips its backoff instead of waiting up to reconnect_max.
REDIAL_REASONS = ("reload:", "shutdown:")
_PEER_BYE = "peer said goodbye: "


def peer_asked_to_redial(reason: str | None) -> bool:
    """True for the peer's "reload:"/"shutdown:" goodbye, and for our own reload
    closing the session (we renegotiate at once; no backoff for that either)."""
    if not reason:
        return False
    if reason.startswith("reload:"):
        return True
    return reason.startswith(_PEER_BYE) and reason[len(_PEER_BYE):].startswith(REDIAL_REASONS)


def _redial_event(link: Any) -> trio.Event:
    event = getattr(link, "_redial", None)
    if event is None:
        event = link._redial = trio.Event()
    return event


def redial_now(link: Any) -> None:
    """Skip the rest of the backoff: the dial loop dials at once (`linkctl reconnect`)."""
    link._redial_pending = True
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


async def outage_watch(link: Any, poll: float = 1.0) -> None:
    """Log `link_still_down` while the peer is down (CONTRACT §8, §10): an outage is
    never silent. Polls the board (cheap, a second's resolution is plenty)."""
    outage: dt.datetime | None = None
    schedule: Iterator[float] = iter(())
    next_at = 0.0
    started = 0.0
    while True:
        await trio.sleep(poll)
        status = link.status
        down = status.down_since if status.state != "connected" else None
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


OpenStream = Callable[[str, int], Awaitable[trio.abc.Stream]]


def stable_after(lcfg: Any) -> float:
    """Seconds a session must stay open for the backoff to start again from the floor.

    A session that dies right after its hello (a peer in a crash loop, a flapping
    link) must not make us redial at `reconnect_min` forever; one that outlived a
    full heartbeat timeout has proven the path works.
    """
    return float(lcfg.heartbeat_timeout)


async def dial_loop(daemon: Any, link: Any, *,
                    open_stream: OpenStream = trio.open_tcp_stream) -> None:
    """`open_stream` is a test seam (MockClock tests inject an unreachable network)."""
    lcfg = daemon.cfg.link
    backoff = Backoff(lcfg.reconnect_min, lcfg.reconnect_max)
    board = getattr(daemon, "board", None)
    while True:
        await link.wait_idle()
        connect = link.peer.connect
        if connect is None:
            return
        host, port = connect
        remote = f"{host}:{port}"
        link._redial_pending = False
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
        if getattr(link, "_redial_pending", False):
            backoff.reset()           # the peer said it is back at once, or an operator asked
            link._redial_pending = False
            continue
        delay = backoff.next_delay()
        if link.active is None:
            link.status.set_state(
                "backoff", next_attempt_at=dt.datetime.now(dt.UTC)
                + dt.timedelta(seconds=delay))
        event = link._redial = trio.Event()
        with trio.move_on_after(delay):
            await event.wait()
        if event.is_set():
            backoff.reset()


async def _dial(daemon: Any, link: Any, host: str, port: int, remote: str,
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
        reason = f"cannot connect to {remote}: " + (
            "timed out" if isinstance(exc, trio.TooSlowError) else
            (getattr(cause, "strerror", None) or str(cause)))
        link.log.debug("connect_failed", reason=reason)
        return reason
    remote = _remote_of(tcp)
    sni = None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        sni = host
    contexts: TLSContexts = daemon.tls
    tls_stream = contexts.client_stream(tcp, link.peer, server_hostname=sni)
    try:
        with trio.fail_after(lcfg.handshake_timeout):
            identity = await contexts.finish_handshake(tls_stream)
    except (TLSRefused, trio.TooSlowError) as exc:
        reason = "TLS handshake timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
        link.log.warning("tls_refused", remote=remote, reason=reason, peer=link.name)
        await trio.aclose_forcefully(tls_stream)
        return f"TLS with {remote} refused: {reason}"
    runner = SessionRunner(link, tls_stream, remote=remote, dialed_by_us=True,
                           tls_info=tls_info(tls_stream, identity))
    await run_session(daemon, link, runner)
    # Only a stable session resets the backoff (see stable_after).
    link.last_session_open = runner.was_open and runner.open_seconds >= stable_after(lcfg)
    if runner.was_open or (runner.reason is not None and not runner.error):
        return None     # a session ran, or we lost the tie-break to a live one
    return runner.reason or "session failed"


async def handle_inbound(daemon: Any, tcp: trio.SocketStream) -> None:
    remote = _remote_of(tcp)
    lcfg = daemon.cfg.link
    contexts: TLSContexts = daemon.tls
    tls_stream = contexts.server_stream(tcp, list(daemon.cfg.peers))
    try:
        with trio.fail_after(lcfg.handshake_timeout):
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
    await run_session(daemon, link, runner)
