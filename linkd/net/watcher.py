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

A folder on a network or FUSE file system (NFS, SMB/CIFS, 9p, Ceph, AFS,
FUSE...) is not watched: inotify sees only what this host writes there, not
what an application on another host puts into out/. `add` returns None for
it, and pick-up lists it every RESCAN_INTERVAL as if inotify were missing.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from pathlib import Path

import trio

from .. import log as logmod

try:
    import inotify_simple
except ImportError:  # pragma: no cover - the dependency is declared; be robust anyway
    inotify_simple = None

# on_event(lost): lost=True when the watched folder itself was moved or deleted
Subscriber = Callable[[bool], None]

# statfs(2) f_type of file systems where changes made elsewhere raise no inotify event
REMOTE_FS = {
    0x6969: "nfs", 0x517B: "smb", 0xFF534D42: "cifs", 0xFE534D42: "smb2",
    0x65735546: "fuse", 0x01021997: "9p", 0x00C36400: "ceph", 0x5346414F: "afs",
    0x73757245: "coda", 0x7461636F: "ocfs2", 0x01161970: "gfs2", 0x47504653: "gpfs",
    0x0BD00BD0: "lustre",
}
_libc = ctypes.CDLL(None, use_errno=True)


def fs_type(folder: Path) -> int | None:
    """statfs(2) f_type of the file system holding `folder` (None if unknown)."""
    buf = ctypes.create_string_buffer(256)      # struct statfs: f_type is the first word
    if _libc.statfs(str(folder).encode(), buf) != 0:
        return None
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], "little") & 0xFFFFFFFF


class FolderWatcher:
    def __init__(self) -> None:
        self.log = logmod.get()
        self._notifier: inotify_simple.INotify | None = None
        self._subs: dict[int, Subscriber] = {}
        self._remote: set[Path] = set()         # folders not watched (said once each)
        self.mask = 0
        if inotify_simple is None:
            return
        try:
            self._notifier = inotify_simple.INotify()
        except OSError as exc:
            self.log.warning("inotify_unavailable", reason=str(exc))
            return
        f = inotify_simple.flags
        self.mask = f.MOVED_TO | f.CLOSE_WRITE | f.CREATE | f.MOVE_SELF | f.DELETE_SELF

    @property
    def available(self) -> bool:
        return self._notifier is not None

    def add(self, folder: Path, on_event: Subscriber) -> int | None:
        """Watch `folder`; None if it does not exist (yet) or cannot be watched."""
        if self._notifier is None:
            return None
        remote = REMOTE_FS.get(fs_type(folder) or 0)
        if remote is not None:
            if folder not in self._remote:
                self._remote.add(folder)
                self.log.warning("inotify_not_used", folder=str(folder), fs=remote,
                                 reason="a network file system: pick-up lists it every "
                                 "few seconds instead")
            return None
        try:
            wd: int = self._notifier.add_watch(str(folder), self.mask)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                self.log.warning("inotify_watch_failed", folder=str(folder), reason=str(exc))
            return None
        self._subs[wd] = on_event
        return wd

    def remove(self, wd: int) -> None:
        if self._subs.pop(wd, None) is not None and self._notifier is not None:
            try:
                self._notifier.rm_watch(wd)
            except OSError:       # the folder is already gone: so is the watch
                pass

    def dispatch(self, events: list[inotify_simple.Event]) -> None:
        """Tell the subscribers concerned, each once per batch of events."""
        f = inotify_simple.flags
        woken: dict[int, bool] = {}
        for event in events:
            if event.mask & f.Q_OVERFLOW:
                for wd in self._subs:
                    woken.setdefault(wd, False)
            elif event.wd in self._subs:
                lost = bool(event.mask & (f.MOVE_SELF | f.DELETE_SELF | f.IGNORED))
                woken[event.wd] = woken.get(event.wd, False) or lost
        for wd, lost in woken.items():
            on_event = self._subs.get(wd)
            if on_event is None:
                continue
            if lost:
                self.remove(wd)
            on_event(lost)

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
