"""One inotify instance for the whole daemon; pick-up subscribes folders to it.

The kernel allows 128 inotify instances per user by default
(fs.inotify.max_user_instances), shared with every other program of that user:
one instance per peer stopped working past ~100 peers, and those peers fell
back to listing their folders every two seconds. So the daemon opens one
instance, each channel's out/ folder is one watch on it (the default watch
limit is tens of thousands), and the events are dispatched by watch descriptor.

What wakes a subscriber (the mask):
  IN_MOVED_TO, IN_CLOSE_WRITE  a file renamed in, or a writer finished;
  IN_CREATE                    a hard link (`ln`) or a symlink: no other event
                               follows them (a `cp` in progress wakes pick-up
                               early; examine sees the writer and waits);
  IN_MOVE_SELF, IN_DELETE_SELF, IN_IGNORED
                               the folder itself went: the watch is dropped and
                               the subscriber told it is `lost`, so that pick-up
                               watches whatever folder is at that path now;
  IN_Q_OVERFLOW                events were lost: every subscriber is woken.
IN_MODIFY wakes no one: with IN_CREATE, IN_CLOSE_WRITE and IN_MOVED_TO it keeps a
subscriber's `writing` (name -> (time.monotonic(), kind)) up to date, the files a
writer may still hold open, which pick-up consults where it cannot take a lease
(spool/pickup.py). A queue overflow loses events, so it keeps the marks and adds one
under the empty name (OVERFLOW, no file's name): pick-up then asks a longer quiet
period of every file in out/ at that moment, and the overflow is logged. IN_MODIFY is one event per
write() of a producer writing in place (~5 µs each here: 0.3-0.5 s of CPU for 256
MiB written 4 KiB at a time), so it is watched only by a daemon that may lease any
file (CAP_LEASE, leases enabled), which needs no marks.
"""

from __future__ import annotations

import errno
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio

from .. import log as logmod
from ..spool.fs import fs_type as fs_type  # re-exported (statfs f_type)
from ..spool.outbound_items import CREATED, OVERFLOW, SUSPECT, WRITTEN

try:
    import inotify_simple
except ImportError:  # pragma: no cover - the dependency is declared; be robust anyway
    inotify_simple = None

# on_event(kind): "event" (something arrived), "lost" (the watched folder itself was
# moved or deleted: the watch is gone) or "overflow" (events were lost: check the
# folder is still the one watched, then list it)
Subscriber = Callable[[str], None]

# statfs(2) f_type of file systems where changes made elsewhere raise no inotify event
REMOTE_FS = {
    0x6969: "nfs", 0x517B: "smb", 0xFF534D42: "cifs", 0xFE534D42: "smb2",
    0x65735546: "fuse", 0x01021997: "9p", 0x00C36400: "ceph", 0x5346414F: "afs",
    0x6B414653: "afs", 0x73757245: "coda", 0x7461636F: "ocfs2", 0x01161970: "gfs2",
    0x47504653: "gpfs", 0x0BD00BD0: "lustre", 0x20030528: "orangefs",
    0x19830326: "beegfs",
}
def identity(folder: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of `folder` (not following a symlink), None if it is gone."""
    try:
        st = os.lstat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Watch:
    """One subscription: a folder, as it was when watched, and who to tell."""

    __slots__ = ("folder", "wd", "ident", "on_event", "writing", "lock")

    def __init__(self, folder: Path, wd: int, ident: tuple[int, int] | None,
                 on_event: Subscriber,
                 writing: dict[str, tuple[float, int]] | None = None,
                 lock: threading.Lock | None = None) -> None:
        self.folder, self.wd, self.ident, self.on_event = folder, wd, ident, on_event
        self.writing = writing
        self.lock = lock or threading.Lock()    # `writing` is read in worker threads too

    def current(self) -> bool:
        """Is the folder at this path still the one watched? A folder replaced by a
        rename of its parent, a mount over it, or deleted while something held it
        open raises no event on the watch: a cheap lstat finds out."""
        return self.ident is not None and identity(self.folder) == self.ident


CAP_LEASE = 28
OVERFLOW_LOG_EVERY = 60.0


def has_cap_lease() -> bool:
    """Whether this process may take a lease on any file: CAP_LEASE effective and
    leases enabled (fs.leases-enable). A file system without leases still refuses
    them (pick-up then uses the quiet period alone, as on a network file system)."""
    try:
        with open("/proc/sys/fs/leases-enable") as f:
            if f.read().strip() == "0":
                return False
        # in a user namespace CapEff shows CAP_LEASE, but the kernel asks for it in
        # the host's: only the full identity map is the host's own
        with open("/proc/self/uid_map") as f:
            if f.read().split() != ["0", "0", "4294967295"]:
                return False
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_LEASE & 1)
    except (OSError, ValueError):
        pass
    return False


class FolderWatcher:
    def __init__(self, track_writes: bool | None = None) -> None:
        """`track_writes`: watch IN_MODIFY (see the top); by default only without
        CAP_LEASE."""
        self.log = logmod.get()
        self._notifier: inotify_simple.INotify | None = None
        # several subscribers may share a watch descriptor: the kernel returns the
        # same one for the same folder (a reload restarting a peer's pick-up)
        self._subs: dict[int, list[Watch]] = {}
        self._said: set[tuple[str, Path]] = set()    # (event, folder) logged once each
        self._overflow_logged = -math.inf
        self.mask = 0
        if inotify_simple is None:
            return
        try:
            self._notifier = inotify_simple.INotify()
        except OSError as exc:
            self.log.warning("inotify_unavailable", reason=str(exc))
            return
        f = inotify_simple.flags
        if track_writes is None:
            track_writes = not has_cap_lease()
        self.tracking = track_writes
        self.mask = (f.MOVED_TO | f.CLOSE_WRITE | f.CREATE | f.MOVE_SELF | f.DELETE_SELF
                     | f.ONLYDIR | f.DONT_FOLLOW | (f.MODIFY if track_writes else 0))

    @property
    def available(self) -> bool:
        return self._notifier is not None

    def _once(self, event: str, folder: Path, level: str = "warning", **kw: str) -> None:
        if (event, folder) not in self._said:
            self._said.add((event, folder))
            getattr(self.log, level)(event, folder=str(folder), **kw)

    @staticmethod
    def remote(folder: Path) -> bool:
        """Whether `folder` is on a file system whose changes made elsewhere raise no
        event here (REMOTE_FS)."""
        return (fs_type(folder) or 0) in REMOTE_FS

    def add(self, folder: Path, on_event: Subscriber,
            writing: dict[str, tuple[float, int]] | None = None,
            lock: threading.Lock | None = None) -> Watch | None:
        """Watch `folder`; None if it does not exist (yet) or cannot be watched.
        `writing`: kept up to date with the files a writer may hold open (the top)."""
        if self._notifier is None:
            return None
        remote = REMOTE_FS.get(fs_type(folder) or 0)
        if remote is not None:
            self._once("inotify_not_used", folder, "info", fs=remote,
                       reason="a network file system: pick-up lists it every few "
                       "seconds instead")
            return None
        ident = identity(folder)
        try:
            wd: int = self._notifier.add_watch(str(folder), self.mask)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._once("inotify_watch_failed", folder, reason=str(exc))
            return None
        if ("inotify_watch_failed", folder) in self._said:
            self._said.discard(("inotify_watch_failed", folder))
            self.log.info("inotify_watch_restored", folder=str(folder))
        watch = Watch(folder, wd, ident, on_event, writing, lock)
        self._subs.setdefault(wd, []).append(watch)
        return watch

    def remove(self, watch: Watch) -> None:
        """Drop this subscription; the kernel watch goes with the last one."""
        subs = self._subs.get(watch.wd)
        if subs is None or watch not in subs:
            return
        subs.remove(watch)
        if subs:
            return
        del self._subs[watch.wd]
        if self._notifier is not None:
            try:
                self._notifier.rm_watch(watch.wd)
            except OSError:       # the folder is already gone: so is the watch
                pass

    def dispatch(self, events: list[inotify_simple.Event]) -> None:
        """Tell the subscribers concerned, each once per batch of events."""
        f = inotify_simple.flags
        kinds: dict[int, str] = {}
        rank = {"event": 0, "overflow": 1, "lost": 2}
        for event in events:
            if event.mask & f.Q_OVERFLOW:
                now = time.monotonic()
                for wd, subs in self._subs.items():
                    if rank[kinds.get(wd, "event")] < rank["overflow"]:
                        kinds[wd] = "overflow"
                    for watch in subs:
                        if watch.writing is not None:
                            with watch.lock:
                                watch.writing[OVERFLOW] = (now, SUSPECT)
                if self.tracking and now - self._overflow_logged >= OVERFLOW_LOG_EVERY:
                    self._overflow_logged = now
                    self.log.warning("inotify_overflow", reason=(
                        "the inotify event queue overflowed (many files written in place "
                        "at once?): pick-up waits longer before it takes a file it cannot "
                        "lease; grant linkd CAP_LEASE (systemd/examples/spool-group.conf) "
                        "or have producers rename files into out/"))
            elif event.wd in self._subs:
                if event.name and event.mask & (f.CREATE | f.MODIFY | f.CLOSE_WRITE
                                                | f.MOVED_TO) and not event.mask & f.ISDIR:
                    self._writer(self._subs[event.wd], event.name, event.mask)
                    if not event.mask & ~f.MODIFY:
                        continue            # a write: nothing to pick up yet
                kind = ("lost" if event.mask & (f.MOVE_SELF | f.DELETE_SELF | f.IGNORED)
                        else "event")
                if rank[kind] >= rank[kinds.get(event.wd, "event")]:
                    kinds[event.wd] = kind
        for wd, kind in kinds.items():
            for watch in list(self._subs.get(wd, ())):
                if kind == "lost":
                    self.remove(watch)
                watch.on_event(kind)

    @staticmethod
    def _writer(subs: list[Watch], name: str, mask: int) -> None:
        for watch in subs:
            writing = watch.writing
            if writing is None:
                continue
            with watch.lock:
                FolderWatcher._mark(writing, name, mask)

    @staticmethod
    def _mark(writing: dict[str, tuple[float, int]], name: str, mask: int) -> None:
        f = inotify_simple.flags
        if mask & (f.CLOSE_WRITE | f.MOVED_TO):
            # closed by its writer; or renamed in over the name: a whole file of its
            # own (a writer holding the name's old file writes elsewhere now)
            writing.pop(name, None)
        elif mask & f.MODIFY:
            writing[name] = (time.monotonic(), WRITTEN)
        else:       # created: a writer, or a hard link; a new file under that name
            writing[name] = (time.monotonic(), CREATED)

    def close(self) -> None:
        notifier, self._notifier = self._notifier, None
        self._subs.clear()
        if notifier is not None:
            notifier.close()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read events until cancelled; closes the instance at the end."""
        task_status.started()
        notifier = self._notifier
        if notifier is None:
            return
        try:
            while True:
                await trio.lowlevel.wait_readable(notifier.fileno())
                self.dispatch(notifier.read(timeout=0))
        finally:
            self.close()
