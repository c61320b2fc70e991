"""Pick-up without a lease: when is a file in out/ handed over?

A read lease (`F_SETLEASE F_RDLCK`) tells pick-up for sure whether anyone still
has a file open for writing (spool/pickup.py). Only the file's owner, or a process
with CAP_LEASE, may take one: for a producer of another user and a daemon without
CAP_LEASE, the watcher's inotify marks (net/watcher.py; `Outbound.writing`, name ->
(time.monotonic(), kind)) and a quiet period stand in:

* WRITTEN (IN_MODIFY, no IN_CLOSE_WRITE since): its writer still holds it; it waits
  for the close however long the writer pauses, or until it is unchanged for
  WRITER_GIVEUP (a close we missed; a truncate() by path, which no close follows);
* CREATED (IN_CREATE only) and still empty: a writer yet to write; it waits up to
  CREATED_SETTLE (a created file that is not empty, never written here, came in
  whole: a hard link, `linkctl send`);
* SUSPECT: it was in out/ when events may have been lost (start-up, a folder
  watched anew, an inotify queue overflow): it must be quiet for OVERFLOW_SETTLE;
* any file must then be unchanged for SETTLE seconds.

A quiet-period wait is a Quiet: the files after it in arrival order wait for it
too (taken first, a later file overtook it: out of hand-over order), unless it
changes while it waits (then it is being written, not handed over: it holds no
one, or a file rewritten again and again would stall every later file).
"""

from __future__ import annotations

import os
import time

from .outbound_items import (
    CREATED,
    CREATED_SETTLE,
    OVERFLOW_SETTLE,
    SETTLE,
    SUSPECT,
    WRITER_GIVEUP,
    WRITER_RETRY,
    WRITTEN,
    Quiet,
)


def writer_wait(writing: dict[str, tuple[float, int]], name: str,
                st: os.stat_result) -> float | None:
    """How long to wait before looking at `name` again, or None to take it now (the
    rules at the top)."""
    now = time.monotonic()
    changed = time.time() - max(st.st_mtime, st.st_ctime)
    settle = SETTLE
    mark = writing.get(name)
    if mark is not None:
        at, kind = mark
        if kind == WRITTEN and changed < WRITER_GIVEUP:
            return WRITER_RETRY
        if kind == CREATED and st.st_size == 0 and now - at < CREATED_SETTLE:
            return WRITER_RETRY
        if kind == SUSPECT:
            settle = OVERFLOW_SETTLE
    if changed < settle:
        return Quiet(min(settle - changed + 0.01, WRITER_RETRY * 4))
    return None


def holds_order(quiet_seen: dict[str, tuple[int, int, int]], name: str,
                st: os.stat_result, wait: float) -> float:
    """`wait`, as a Quiet (holding the files after it) only while the file stays as it
    was when first seen waiting (`quiet_seen`: name -> (size, mtime, ctime))."""
    if not isinstance(wait, Quiet):
        return wait
    now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    seen = quiet_seen.setdefault(name, now)
    if seen != now:
        quiet_seen[name] = now
        return float(wait)
    return wait
