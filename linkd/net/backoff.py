"""Capped exponential backoff with jitter, as a pure value object (urllib3 Retry).

delay(n) = uniform(d/2, d) with d = min(max, min * 2**n): never below half the
floor, never above the ceiling, never giving up. `reset()` after a *stable*
session (open at least heartbeat_timeout: see supervisor.stable_after).
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = max(maximum, minimum)
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.minimum * (2 ** min(self.attempts, 60)))
        self.attempts += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
