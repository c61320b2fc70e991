"""Scheduler (priority, round robin, no starvation) and Backoff (capped, jittered)."""

import collections
import random

from linkd.net.backoff import Backoff
from linkd.proto.scheduler import Scheduler


def test_higher_priority_goes_first():
    s = Scheduler()
    assert s.pick([("bulk", 0), ("alerts", 10)]) == "alerts"


def test_equal_priorities_take_turns():
    s = Scheduler()
    picks = [s.pick([("a", 0), ("b", 0), ("c", 0)]) for _ in range(9)]
    assert collections.Counter(picks) == {"a": 3, "b": 3, "c": 3}


def test_low_priority_is_not_starved_under_constant_high_priority_load():
    s = Scheduler(starvation_limit=16)
    picks = [s.pick([("bulk", 0), ("alerts", 10)]) for _ in range(170)]
    counts = collections.Counter(picks)
    assert counts["bulk"] == 10 and counts["alerts"] == 160
    # and the high-priority channel never waits more than one turn
    longest = max(len(run) for run in "".join("b" if p == "bulk" else "a" for p in picks)
                  .split("a"))
    assert longest == 1


def test_nothing_ready_picks_nothing():
    assert Scheduler().pick([]) is None


def test_backoff_doubles_within_jitter_and_caps():
    b = Backoff(1.0, 60.0, random.Random(7))
    delays = [b.next_delay() for _ in range(12)]
    ceilings = [min(60.0, 2 ** i) for i in range(12)]
    for d, c in zip(delays, ceilings, strict=True):
        assert c / 2 <= d <= c
    assert max(delays) <= 60.0
    b.reset()
    assert 0.5 <= b.next_delay() <= 1.0


def test_backoff_never_gives_up():
    b = Backoff(0.2, 2.0, random.Random(1))
    assert all(1.0 <= b.next_delay() <= 2.0 for _ in range(10_000) if b.attempts > 5)
