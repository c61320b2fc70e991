"""Pick-up without a lease: when is a file in out/ handed over?

A read lease (`F_SETLEASE F_RDLCK`) tells pick-up for sure whether anyone still
has a file open for writing (spool/pickup.py). Only the file's owner, or a process
with CAP_LEASE, may take one: for a producer of another user and a daemon without
CAP_LEASE, the watcher's inotify marks (net/watcher.py; `Outbound.writing`, name ->
(time.monotonic(), kind)) and a quiet period stand in:

* WRITTEN (IN_MODIFY, no IN_CLOSE_WRITE since): its writer still holds it; it waits
  for the close however long the writer pauses, or until it has been quiet for
  WRITER_GIVEUP (a close we missed; a truncate() by path, which no close follows);
* CREATED (IN_CREATE only) and still empty: a writer yet to write (`slow_command >
  out/x`: its first byte may come minutes later); it waits like a written one (a
  created file that is not empty, never written here, came in whole: a hard link,
  `linkctl send`);
* SUSPECT: it was in out/ when events may have been lost (start-up, a folder
  watched anew, an inotify queue overflow): it must be quiet for OVERFLOW_SETTLE;
* any file must then be quiet for SETTLE seconds.

Quiet: unchanged (size, mtime, ctime) for that long: its age by the wall clock when
first seen so (the later of its time stamps; 0 for a time ahead of ours: `touch -d`,
`cp -p` from a host whose clock is ahead, our clock stepped back), plus how long we
have seen it unchanged since, on the monotonic clock (a wall clock stepped forward
must not make a file look quiet). A written mark counts from its last IN_MODIFY.

What this cannot see (only a lease is sure): two writers of one file (the first
close clears the mark), a file renamed while its writer still has it open, a
writer already writing when events were lost that pauses longer than
OVERFLOW_SETTLE.

A quiet-period wait is a Quiet: the files after it in arrival order wait for it
too (taken first, a later file overtook it: out of hand-over order), unless it
changed since we last looked (then it is being written, not handed over: it holds
no one, or a file rewritten again and again would stall every later file).
"""

from __future__ import annotations

import os
import time

from .outbound_items import (
    CREATED,
    OVERFLOW_SETTLE,
    SETTLE,
    SUSPECT,
    WRITER_GIVEUP,
    WRITER_RETRY,
    WRITTEN,
    Quiet,
)

# name -> ((size, mtime_ns, ctime_ns), time.monotonic() it was first seen so, its
# wall-clock age then)
Seen = dict[str, tuple[tuple[int, int, int], float, float]]


def why_waiting(writing: dict[str, tuple[float, int]], name: str, st: os.stat_result) -> str:
    """Why writer_wait() holds `name` back, in words for `linkctl queue` (the same
    rules, read the same way)."""
    mark = writing.get(name)
    kind = mark[1] if mark is not None and time.monotonic() - mark[0] < WRITER_GIVEUP \
        else None
    if kind == WRITTEN:
        return "its writer has not closed it yet"
    if kind == CREATED and st.st_size == 0:
        return "created and still empty: its writer has not written yet"
    if mark is not None and mark[1] == SUSPECT:
        return (f"must be unchanged for {OVERFLOW_SETTLE:.0f} s: its writer could not be "
                f"watched (start-up, or inotify events lost)")
    return f"must be unchanged for {SETTLE:g} s (no read lease on another user's file)"


def writer_wait(writing: dict[str, tuple[float, int]], seen: Seen, name: str,
                st: os.stat_result) -> float | None:
    """How long to wait before looking at `name` again, or None to take it now (the
    rules at the top). `seen` is updated."""
    now = time.monotonic()
    sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    last = seen.get(name)
    changed_here = last is not None and last[0] != sig
    if last is None or changed_here:
        age = max(0.0, time.time() - max(st.st_mtime, st.st_ctime))
        last = seen[name] = (sig, now, age)
    quiet = last[2] + (now - last[1])
    settle = SETTLE
    mark = writing.get(name)
    if mark is not None:
        at, kind = mark
        if kind == WRITTEN and now - at < WRITER_GIVEUP:
            return WRITER_RETRY
        if kind == CREATED and st.st_size == 0 and now - at < WRITER_GIVEUP:
            return WRITER_RETRY
        if kind == SUSPECT:
            settle = OVERFLOW_SETTLE
    if quiet < settle:
        wait = min(settle - quiet + 0.01, WRITER_RETRY * 4)
        return wait if changed_here else Quiet(wait)
    return None
