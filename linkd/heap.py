"""Giving the heap back once the daemon is quiet (PERFORMANCE.md §3.1, page faults).

`tune_malloc()` (cli/linkd_main.py) keeps freed frame buffers in the heap so that a
transfer reuses them instead of faulting fresh pages in: ~2,400 page faults per GiB
received instead of ~120,000. The price is that glibc then keeps what the peak
held: after a transfer a daemon's RSS stayed at its peak (55 MiB) instead of falling
back (51 MiB). An operator watching RSS cannot tell that from a leak.

`IdleTrim` calls `malloc_trim(0)` once the daemon has been quiet for `QUIET` seconds
after being busy: it reads the process's own CPU time at each housekeeping pass, and
a pass that used more than `BUSY_SHARE` of a core counts as busy. One trim per busy
period, never during one: a hub of idle peers (~3 % of a core) trims once after its
start-up and then never. The trim takes a few milliseconds in a worker thread (it
holds malloc's locks meanwhile). Bursts more than QUIET apart each get a trim, and
the next burst faults its frame buffers in again: ~1,000 page faults for a 4 MiB
credit window, a millisecond or two, against the ~120,000 per GiB `tune_malloc()`
removed.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

QUIET = 10.0        # seconds of quiet after a busy period before the heap is trimmed
BUSY_SHARE = 0.10   # share of one core over a pass above which the pass was busy


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None         # not glibc: nothing to give back this way
    return fn


def trim() -> bool:
    """Blocking: return the free memory of every malloc arena to the kernel.
    True if memory was released; False if none was, or there is no malloc_trim."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


class IdleTrim:
    """Decides when to trim (see the module docstring). `due()` is called at each
    housekeeping pass; when it returns True the caller trims (in a thread)."""

    def __init__(self, cpu: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic,
                 quiet: float = QUIET, busy_share: float = BUSY_SHARE) -> None:
        self.cpu, self.clock = cpu, clock
        self.quiet, self.busy_share = quiet, busy_share
        self._cpu, self._at = cpu(), clock()
        self._busy_until: float | None = None   # end of the last busy pass, untrimmed
        self.trims = 0

    def due(self) -> bool:
        cpu, now = self.cpu(), self.clock()
        used, took = cpu - self._cpu, now - self._at
        self._cpu, self._at = cpu, now
        if took > 0 and used > self.busy_share * took:
            self._busy_until = now
            return False
        if self._busy_until is not None and now - self._busy_until >= self.quiet:
            self._busy_until = None
            self.trims += 1
            return True
        return False
