"""Which channel's next chunk goes out: priority first, nobody starves.

Among the channels that are ready to send, the highest `priority` wins and
equal priorities take turns (round robin). Every time a ready channel is
passed over its `skipped` count grows; one that has been passed over
`starvation_limit` times gets the next turn, so a low-priority bulk channel
still receives at least about 1/(limit+1) of the turns under constant load.
"""

from __future__ import annotations

from collections.abc import Iterable


class Scheduler:
    def __init__(self, starvation_limit: int = 16) -> None:
        self.starvation_limit = starvation_limit
        self._skipped: dict[str, int] = {}
        self._turn = 0
        self._last_served: dict[str, int] = {}

    def pick(self, ready: Iterable[tuple[str, int]]) -> str | None:
        """`ready` holds (channel, priority) pairs; returns the channel to serve."""
        candidates = list(ready)
        if not candidates:
            return None
        self._turn += 1
        starving = [c for c in candidates if self._skipped.get(c[0], 0) >= self.starvation_limit]
        pool = starving or candidates
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
