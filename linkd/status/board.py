"""The status board: plain data about peers and channels (CONTRACT §6).

Theory of operation
-------------------
`StatusBoard` is plain data with no knowledge of sessions, spools or time
sources: the daemon mutates it (peer states, counters) from its own tasks, and
the server (server.py) only reads it. Because trio is single-threaded and the
board is never touched from worker threads, no locking is needed; `document()`
builds a fresh snapshot on every request.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import (
    StatusSocketError,  # noqa: F401 (re-exported)
)

STATES = ("connected", "connecting", "backoff", "waiting")





def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(when: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC with a "Z"; naive datetimes are taken to be UTC already."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class ChannelStats:
    """Counters of one channel of one peer, since the daemon started (CONTRACT §10).

    `queued`/`queued_bytes` are set by the daemon from the outbound spool; the
    `note_*` helpers count acknowledged (sent) and delivered (received) files.
    `failed` is the number of files in failed/<channel>/ now (recounted from the
    folder, so it survives a restart). `paused`, `held`, `in_flight` and
    `oldest_queued_at` are filled by the sender (None: nothing to say);
    `inbound_error` by the receiver: why it could not store the last message it
    received (disk full...), until a message is stored again. `awaiting_ack`
    (messages sent whole that the peer has not acknowledged yet) is read when a
    document is built, from `unacked_source`: set by the live session to a function
    of the channel's name giving (messages, bytes, seconds since the oldest was
    sent or None), None while there is no session.
    """

    name: str
    queued: int = 0
    queued_bytes: int = 0
    sent: int = 0
    sent_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    failed: int = 0
    quarantined: int = 0
    last_sent_at: dt.datetime | None = None
    last_received_at: dt.datetime | None = None
    paused: bool = False
    held: str | None = None                     # why the channel's files wait, e.g. not offered
    in_flight: dict[str, Any] | None = None     # {name, seq, size, sent_bytes}
    oldest_queued_at: float | None = None       # time.time() the oldest queued file was claimed
    inbound_error: str | None = None            # the receiver's storage failed: why
    unacked_source: Callable[[str], tuple[int, int, float | None]] | None = \
        dataclasses.field(default=None, repr=False, compare=False)

    @property
    def oldest_queued_age_s(self) -> float | None:
        """Seconds since the oldest queued file was claimed, as of now: it grows while
        nothing moves (a paused channel, a link down), which is what the queue-age
        alarms watch for."""
        at = self.oldest_queued_at
        return None if at is None else round(max(0.0, time.time() - at), 3)

    def unacked(self) -> tuple[int, int, float | None]:
        """(messages awaiting the peer's ack, their bytes, the oldest one's age in
        seconds or None)."""
        source = self.unacked_source
        if source is None:
            return 0, 0, None
        count, size, age = source(self.name)
        return count, size, None if age is None else round(age, 3)

    def note_sent(self, size: int, when: dt.datetime | None = None) -> None:
        self.sent += 1
        self.sent_bytes += size
        self.last_sent_at = when or _utcnow()

    def note_received(self, size: int, when: dt.datetime | None = None) -> None:
        self.received += 1
        self.received_bytes += size
        self.last_received_at = when or _utcnow()
        self.inbound_error = None               # it stores again

    def document(self) -> dict[str, Any]:
        age = self.oldest_queued_age_s
        unacked, unacked_bytes, unacked_age = self.unacked()
        return {"name": self.name, "queued": self.queued, "queued_bytes": self.queued_bytes,
                "sent": self.sent, "sent_bytes": self.sent_bytes, "received": self.received,
                "received_bytes": self.received_bytes, "failed": self.failed,
                "quarantined": self.quarantined, "last_sent_at": _iso(self.last_sent_at),
                "last_received_at": _iso(self.last_received_at),
                "oldest_queued_age_s": None if age is None else round(float(age), 3),
                "paused": self.paused, "held": self.held,
                "in_flight": None if self.in_flight is None else dict(self.in_flight),
                "awaiting_ack": unacked, "awaiting_ack_bytes": unacked_bytes,
                "oldest_unacked_age_s": unacked_age,
                "inbound_error": self.inbound_error}


@dataclasses.dataclass
class PeerStatus:
    """One configured peer. The daemon increments `reconnects` and sets `rtt_ms` itself.

    An *outage* runs from the moment the peer is not connected until the next
    link_up: `down_since` and `attempts` (dials) cover all of it, whatever the
    state changes in between; `last_error` is the outage's latest error and is
    forgotten at link_up (CONTRACT §6).
    """

    name: str
    state: str                              # one of STATES
    since: dt.datetime
    remote: str | None = None               # "IP:PORT" while connected
    rtt_ms: float | None = None             # None until the first pong of a session
    reconnects: int = 0
    last_error: str | None = None
    tls: dict[str, Any] | None = None       # version, cipher, group, peer_subject, peer_not_after
    next_attempt_at: dt.datetime | None = None
    channels: dict[str, ChannelStats] = dataclasses.field(default_factory=dict)
    down_since: dt.datetime | None = None
    attempts: int = 0
    last_error_at: dt.datetime | None = None
    paused: bool = False
    cert_not_after: dt.datetime | str | None = None  # the peer's certificate, last seen
    quarantined: int = 0                    # files in quarantine/ now
    priority_held_s: float = 0.0            # lower priorities held back ([link] priority_hold)
    # channel -> files left in the folders of a channel no longer configured
    left_behind: dict[str, int] = dataclasses.field(default_factory=dict)
    # called with the new state whenever `state` changes (the outage watch waits on it)
    listeners: list[Callable[[str], None]] = dataclasses.field(
        default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.state != "connected" and self.down_since is None:
            self.down_since = self.since

    def set_state(self, state: str, *, remote: str | None = None,
                  tls: dict[str, Any] | None = None, error: str | None = None,
                  now: dt.datetime | None = None,
                  next_attempt_at: dt.datetime | None = None) -> None:
        """Move to `state`. `since` changes only with the state. Anything but
        "connected" forgets remote, tls and rtt; `error` (if given) is kept in
        `last_error` until the link is up again; `next_attempt_at` is kept only
        in "backoff". "connected" ends the outage (down_since, attempts, last_error)."""
        if state not in STATES:
            raise ValueError(f"unknown peer state {state!r}")
        when = now or _utcnow()
        changed = state != self.state
        if changed:
            self.state, self.since = state, when
        if state == "connected":
            self.remote = remote if remote is not None else self.remote
            self.tls = tls if tls is not None else self.tls
            if self.tls and self.tls.get("peer_not_after"):
                self.cert_not_after = self.tls["peer_not_after"]
            self.down_since = self.last_error = self.last_error_at = None
            self.attempts = 0
        else:
            self.remote = self.tls = self.rtt_ms = None
            if self.down_since is None:
                self.down_since = when
        self.next_attempt_at = next_attempt_at if state == "backoff" else None
        if error is not None:
            self.note_error(error, when)
        if changed:
            for listener in list(self.listeners):
                listener(state)

    def note_error(self, error: str, now: dt.datetime | None = None) -> None:
        """Record the outage's latest error (ignored while connected)."""
        if self.state != "connected":
            self.last_error, self.last_error_at = error, now or _utcnow()

    def channel(self, name: str) -> ChannelStats:
        """The channel's stats, created (empty) if new."""
        if name not in self.channels:
            self.channels[name] = ChannelStats(name)
        return self.channels[name]

    def document(self) -> dict[str, Any]:
        tls = None if self.tls is None else {
            k: _iso(v) if isinstance(v, dt.datetime) else v for k, v in self.tls.items()}
        rtt = None if self.rtt_ms is None else round(float(self.rtt_ms), 3)
        cert = self.cert_not_after
        return {"name": self.name, "state": self.state, "since": _iso(self.since),
                "remote": self.remote, "rtt_ms": rtt, "reconnects": self.reconnects,
                "down_since": _iso(self.down_since), "attempts": self.attempts,
                "last_error": self.last_error, "last_error_at": _iso(self.last_error_at),
                "paused": self.paused,
                "cert_not_after": _iso(cert) if isinstance(cert, dt.datetime) else cert,
                "quarantined": self.quarantined,
                "priority_held_s": round(self.priority_held_s, 3),
                "left_behind": dict(self.left_behind),
                "tls": tls, "next_attempt_at": _iso(self.next_attempt_at),
                "channels": [c.document() for c in self.channels.values()]}


class StatusBoard:
    """Everything /status and /metrics report. Peers keep insertion (config) order."""

    def __init__(self, node: str, version: str, started_at: dt.datetime | None = None):
        self.node = node
        self.version = version
        self.started_at = started_at or _utcnow()
        self.peers: dict[str, PeerStatus] = {}
        self.cert_not_after: dt.datetime | None = None     # our own certificate
        self.crl_next_update: dt.datetime | None = None    # [tls].crl, when configured
        self.connect_failures: dict[tuple[str, str], int] = {}   # (peer, reason) -> count
        self.tls_refusals: dict[str, int] = {}                   # reason -> count
        # why the audit log cannot be written ("" if it can): set by the daemon
        self.audit_problem: Callable[[], str] = lambda: ""

    def add_peer(self, name: str, channels: Iterable[str], state: str) -> PeerStatus:
        """Register a peer (or, if known, keep its counters and sync its channels)."""
        peer = self.peers.get(name)
        if peer is None:
            if state not in STATES:
                raise ValueError(f"unknown peer state {state!r}")
            peer = self.peers[name] = PeerStatus(name, state, _utcnow())
        else:
            peer.set_state(state)
        self.sync_channels(name, channels)
        return peer

    def remove_peer(self, name: str) -> None:
        self.peers.pop(name, None)

    def sync_channels(self, peer: str, channels: Iterable[str]) -> None:
        """After a reload: keep counters of kept channels, add new, drop removed;
        order follows `channels`."""
        p = self.peers[peer]
        p.channels = {n: p.channels.get(n) or ChannelStats(n) for n in channels}

    def note_connect_failure(self, peer: str, reason: str) -> None:
        key = (peer, reason)
        self.connect_failures[key] = self.connect_failures.get(key, 0) + 1

    def note_tls_refusal(self, reason: str) -> None:
        self.tls_refusals[reason] = self.tls_refusals.get(reason, 0) + 1

    def document(self) -> dict[str, Any]:
        """The JSON document of GET /status (CONTRACT §6, §10)."""
        return {"node": self.node, "version": self.version,
                "started_at": _iso(self.started_at),
                "peers": [p.document() for p in self.peers.values()],
                "tls": {"cert_not_after": _iso(self.cert_not_after),
                        "crl_next_update": _iso(self.crl_next_update)},
                # while it has failed, every delivery is refused (docs/EVIDENCE.md)
                "audit": {"failed": self.audit_problem() or None}}

    def metrics(self) -> str:
        """Prometheus text exposition format 0.0.4 of the board (no process_* metrics)."""
        from ..metrics import board_exposition
        return board_exposition(self)


