"""The compact part of a channel's queue: the seqs that are queued but not loaded.

Theory of operation
-------------------
`Outbound` keeps a *window* of loaded items (`Claimed`, a few hundred bytes
each) for the lowest queued seqs -- what the sender needs next -- and only the
number of everything above it: a `QueueIndex` holds those seqs in ascending
order in an `array('q')`, beside their sizes (-1 where not yet known), so a
queued file costs 16 bytes, not a Python object (issue 13: 100,000 queued files
used to cost ~150 MB and a full read of their records before READY).

Every seq here is above every seq in the window. The window is filled from the
front (`pop_first`), new claims are appended at the end, and the rare removal
of a seq deep in the queue (renumbering, tests) costs one `memmove`. Removing
the front only moves `_head`; the arrays are compacted once half of them is
dead, so draining the queue stays O(1) per file.

Sizes are counted only where known: a recovered seq's size is unknown until
`measure()` (lstat of its `.data`, a bounded batch at a time, after READY) or
until it is loaded, so `bytes` can be short of the truth for a few seconds
after start-up (`unmeasured` says by how many files).

Not thread-safe by itself: `Outbound` changes it only from the call holding
the channel's lock; readers on the event loop (counts) may see a value that is
one step old, never a torn structure worse than that.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator

_RUN = 8192                  # seqs sorted at once when sorting a listing (bounded garbage)
_COMPACT_AT = 4096           # dead entries at the front before the arrays are compacted


class SeqRuns:
    """Seqs collected in any order (a directory listing), kept as sorted runs of
    _RUN, then read once in ascending order: 8 bytes a seq, and never more than
    _RUN of them as Python ints (sorted() of 100,000 seqs makes 3.6 MB of them)."""

    __slots__ = ("_runs", "_buf")

    def __init__(self) -> None:
        self._runs: list[array[int]] = []
        self._buf: list[int] = []

    def add(self, seq: int) -> None:
        self._buf.append(seq)
        if len(self._buf) >= _RUN:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._runs.append(array("q", sorted(self._buf)))
            self._buf = []

    def drain(self) -> Iterator[int]:
        """Every seq, ascending (once: each run is let go as soon as it is read)."""
        self._flush()
        runs, self._runs = self._runs, []
        return heapq.merge(*[iter(run) for run in runs])


class QueueIndex:
    """Queued seqs above the loaded window, ascending, with their sizes."""

    __slots__ = ("_seqs", "_sizes", "_head", "_cursor", "count", "bytes", "unmeasured")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._seqs: array[int] = array("q")
        self._sizes: array[int] = array("q")
        self._head = 0           # entries before it are gone (popped from the front)
        self._cursor = 0         # every entry before it has a known size
        self.count = 0           # live entries (one attribute: read from the event loop)
        self.bytes = 0           # sum of the known sizes
        self.unmeasured = 0      # entries whose size is not known yet

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __contains__(self, seq: int) -> bool:
        seqs = self._seqs
        i = bisect_left(seqs, seq, self._head)
        return i < len(seqs) and seqs[i] == seq

    def first(self) -> int | None:
        try:
            return self._seqs[self._head] if self else None
        except IndexError:       # compacted under our feet (a reader on the event loop)
            return None

    def last(self) -> int | None:
        return self._seqs[-1] if self else None

    def seqs(self, start: int = 0) -> array[int]:
        """A copy of the queued seqs >= start, ascending."""
        return self._seqs[bisect_left(self._seqs, start, self._head):]

    # -- changes -------------------------------------------------------------
    def extend_unmeasured(self, seqs: array[int]) -> None:
        """Append ascending seqs above everything here, sizes not known yet. Takes
        `seqs` over (no copy) when the index is empty: the caller lets it go."""
        if not seqs:
            return
        if self and seqs[0] <= self._seqs[-1]:
            raise ValueError("seqs must be above the queue's last one")
        if not self._seqs:
            self._seqs, self._sizes, self._head, self._cursor = \
                seqs, array("q", [-1]) * len(seqs), 0, 0
        else:
            self._seqs.extend(seqs)
            self._sizes.extend(array("q", [-1]) * len(seqs))
        self.unmeasured += len(seqs)
        self.count += len(seqs)

    def add(self, seq: int, size: int) -> None:
        """Insert one seq of known size (at the end, in the common case)."""
        seqs = self._seqs
        if not self or seq > seqs[-1]:
            i = len(seqs)
            seqs.append(seq)
            self._sizes.append(size)
        else:
            i = bisect_left(seqs, seq, self._head)
            if i < len(seqs) and seqs[i] == seq:
                raise ValueError(f"seq {seq} is queued already")
            seqs.insert(i, seq)
            self._sizes.insert(i, size)
            if i < self._cursor:
                self._cursor += 1
        self.bytes += size
        self.count += 1

    def pop_first(self) -> tuple[int, int]:
        """Remove the lowest seq: (seq, its size or -1 if not known)."""
        if not self:
            raise IndexError("the queue index is empty")
        i = self._head
        seq, size = self._seqs[i], self._sizes[i]
        self._forget_size(size)
        self._head = i + 1
        self._cursor = max(self._cursor, self._head)
        if self._head >= _COMPACT_AT and 2 * self._head >= len(self._seqs):
            self._compact()
        return seq, size

    def remove(self, seq: int) -> bool:
        """Remove `seq` wherever it is; False if it is not here."""
        seqs = self._seqs
        i = bisect_left(seqs, seq, self._head)
        if i >= len(seqs) or seqs[i] != seq:
            return False
        if i == self._head:
            self.pop_first()
            return True
        self._forget_size(self._sizes[i])
        del seqs[i]
        del self._sizes[i]
        if i < self._cursor:
            self._cursor -= 1
        return True

    def measure(self, size_of: Callable[[int], int], limit: int) -> int:
        """Learn up to `limit` unknown sizes with `size_of(seq)`; returns how many
        remain unknown."""
        seqs, sizes = self._seqs, self._sizes
        i, done = max(self._cursor, self._head), 0
        while i < len(seqs) and done < limit:
            if sizes[i] < 0:
                size = max(0, size_of(seqs[i]))
                sizes[i] = size
                self.bytes += size
                self.unmeasured -= 1
                done += 1
            i += 1
        self._cursor = i
        return self.unmeasured

    def _forget_size(self, size: int) -> None:
        self.count -= 1
        if size < 0:
            self.unmeasured -= 1
        else:
            self.bytes -= size

    def _compact(self) -> None:
        head = self._head
        self._seqs = self._seqs[head:]
        self._sizes = self._sizes[head:]
        self._cursor = max(0, self._cursor - head)
        self._head = 0
