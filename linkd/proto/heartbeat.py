"""Heartbeat deadlines, computed from `now` passed in (aioquic style).

A ping goes out after `interval` seconds without our sending anything; the
session is dead after `timeout` seconds without receiving anything. RTT is
measured from our own pings.

`grid` (seconds, 0 for none) brings each ping forward to the last multiple of
`grid` at or before its time: every session of a process with the same grid
then pings at the same instants, so a hub of many idle peers wakes once per
grid step for all the pings due in it, not once per peer (a wake-up from idle
costs ~0.5 ms of CPU here, whatever it carries). A ping goes out at most `grid`
early.

`rtt_refresh` (seconds, None for never): a side whose own pings are rare (the
peer pings first, and our pongs keep us from being send-idle) measures the RTT
by sending a ping with the pong it owes, when its last measurement is older
than this: no wake-up of its own on either side.
"""

from __future__ import annotations

import math


class Heartbeat:
    def __init__(self, interval: float, timeout: float, now: float, grid: float = 0.0,
                 rtt_refresh: float | None = None) -> None:
        if not 0.0 <= grid < interval:
            raise ValueError(f"heartbeat grid {grid} is not within [0, interval {interval})")
        self.interval = interval
        self.timeout = timeout
        self.grid = grid
        self.rtt_refresh = rtt_refresh
        self.rtt_at: float | None = None    # when self.rtt was measured
        self.last_sent = now
        self.last_received = now
        self._next_id = 1
        self._outstanding: dict[int, float] = {}
        self.rtt: float | None = None

    def sent(self, now: float) -> None:
        self.last_sent = now

    def received(self, now: float) -> None:
        self.last_received = now

    def ping_due(self) -> float:
        due = self.last_sent + self.interval
        if self.grid:
            due = math.floor(due / self.grid) * self.grid
        return due

    def dead_at(self) -> float:
        return self.last_received + self.timeout

    def next_deadline(self) -> float:
        return min(self.ping_due(), self.dead_at())

    def is_dead(self, now: float) -> bool:
        return now >= self.dead_at()

    def make_ping(self, now: float) -> int:
        ping_id = self._next_id
        self._next_id += 1
        self._outstanding[ping_id] = now
        # Only the newest few matter; a silent peer must not grow this.
        for old in [k for k in self._outstanding if k <= ping_id - 8]:
            del self._outstanding[old]
        return ping_id

    def pong(self, ping_id: int, now: float) -> float | None:
        started = self._outstanding.pop(ping_id, None)
        if started is None:
            return None
        self.rtt = max(0.0, now - started)
        self.rtt_at = now
        return self.rtt

    def wants_rtt(self, now: float) -> bool:
        """Answering the peer's ping: send one of ours with the pong (see the top)?"""
        if self.rtt_refresh is None:
            return False
        if self._outstanding and now - max(self._outstanding.values()) < self.rtt_refresh:
            return False        # one is on its way (or lost: asked again after a while)
        return self.rtt_at is None or now - self.rtt_at >= self.rtt_refresh
