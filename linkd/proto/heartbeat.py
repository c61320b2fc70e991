"""Heartbeat deadlines, computed from `now` passed in (aioquic style).

A ping goes out after `interval` seconds without our sending anything; the
session is dead after `timeout` seconds without receiving anything. RTT is
measured from our own pings.
"""

from __future__ import annotations


class Heartbeat:
    def __init__(self, interval: float, timeout: float, now: float) -> None:
        self.interval = interval
        self.timeout = timeout
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
        return self.last_sent + self.interval

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
        return self.rtt
