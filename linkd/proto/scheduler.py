"""Which channel's next chunk goes out: priority first, nobody starves.

Among the channels that are ready to send, the highest `priority` wins and
equal priorities take turns (round robin). Every time a ready channel is
passed over its `skipped` count grows; one that has been passed over
`starvation_limit` times gets the next turn, so a low-priority bulk channel
still receives at least about 1/(limit+1) of the turns under constant load.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable


class Scheduler:
    def __init__(self, starvation_limit: int = 16) -> None:
        self.starvation_limit = starvation_limit
        self._skipped: dict[str, int] = {}
        self._turn = 0
        self._last_served: dict[str, int] = {}

    def pick(self, ready: Iterable[tuple[str, int]],
             held: Collection[str] = ()) -> str | None:
        """`ready` holds (channel, priority) pairs; returns the channel to serve, or
        None. A `held` channel (PriorityHold) is served only once it is starving:
        passed over counts for it as for any ready channel."""
        candidates = list(ready)
        starving = [c for c in candidates if self._skipped.get(c[0], 0) >= self.starvation_limit]
        pool = starving or [c for c in candidates if c[0] not in held]
        if not pool:
            return None
        self._turn += 1
        top = max(p for _, p in pool)
        best = [name for name, p in pool if p == top]
        # Round robin among equals: the one served longest ago.
        chosen = min(best, key=lambda n: (self._last_served.get(n, 0), n))
        for name, _ in candidates:
            if name == chosen:
                self._skipped[name] = 0
            else:
                self._skipped[name] = self._skipped.get(name, 0) + 1
        self._last_served[chosen] = self._turn
        return chosen

    def forget(self, channel: str) -> None:
        self._skipped.pop(channel, None)
        self._last_served.pop(channel, None)


class PriorityHold:
    """Lower priorities wait while a higher one has a message in flight.

    Sending a priority message's bytes first is not enough on a busy host: its
    delivery (the peer's commit, fsyncs, the ack) then competes for the CPU and
    the disk with the bulk bytes sent right after it. So while a channel has a
    message sent and not yet acknowledged, channels of lower priority send
    nothing, but for at most `share` of the time: a token bucket of `burst`
    seconds of holding, refilled at `share` seconds per second, so that a
    stream of urgent messages never starves a bulk transfer (it keeps at least
    1 - `share` of the time; `share` 0: nothing ever waits). Pure: the caller
    passes the time. `[link] priority_hold` sets the share (default 0.25).
    """

    EPSILON = 1e-6          # below this much credit a hold is over
    START = 0.002           # a new hold needs this much (no holds of a timer tick)

    def __init__(self, share: float = 0.25, burst: float = 0.25) -> None:
        if not 0.0 <= share < 1.0 or burst < 0.0:
            raise ValueError("share must be in [0, 1) and burst >= 0")
        self.share = share
        self.burst = burst
        self.credit = burst
        self._last: float | None = None
        self.holding = False
        self.held_s = 0.0           # time held in all (the status board's counter)

    def set_share(self, share: float) -> None:
        """A new share (a reload); the credit stays (at most one burst either way)."""
        if not 0.0 <= share < 1.0:
            raise ValueError("share must be in [0, 1)")
        self.share = share
        if share == 0.0:
            self.holding = False

    def update(self, now: float, want: bool) -> bool:
        """Account the time since the last call (held or not) and say whether to
        hold now; `want`: a higher priority has a message in flight, has nothing to
        send itself, and a lower one has (so the hold alone keeps the link idle:
        time spent sending the higher priority's own bytes costs no credit)."""
        if self._last is not None:
            elapsed = max(0.0, now - self._last)
            if self.holding:
                self.held_s += elapsed
            rate = self.share - (1.0 if self.holding else 0.0)
            # Debt, bounded: a sender wakes late (timers round up to a millisecond,
            # a busy host adds more), and what a hold overran is paid back, or the
            # share would not hold; but a caller back after a long stall (a flush
            # blocked on a full TCP window) owes at most `burst`, so it holds again
            # within burst / share seconds (1 s at the default), not 4x the stall.
            self.credit = max(-self.burst, min(self.burst, self.credit + elapsed * rate))
        self._last = now
        # (a hold goes on while a microsecond of credit is left: a sliver left by
        # rounding would give an ends_at() equal to now, and a sender waking then
        # would loop; and starts only with START: each hold is a timer wake-up)
        floor = self.EPSILON if self.holding else self.START
        self.holding = want and self.share > 0.0 and self.credit > floor
        return self.holding

    def ends_at(self) -> float:
        """While holding: when the credit runs out (look again then); else inf."""
        if not self.holding or self._last is None:
            return float("inf")
        return self._last + self.credit / (1.0 - self.share)
