"""Pick-up, step 1 of a claim (outbound.py's theory of operation): `examine()`
finds complete files in out/<ch>/ in arrival order and hashes them one at a time
(one descriptor), reading only: it runs without the channel's lock. A read lease
tells whether a writer still has a file open; resource errors raise
ResourceBusy. `PickupMixin` holds these methods of Outbound.

About 400 lines on purpose: examine() is one pass over the backlog, and what it
keeps between passes (not-ready times, quiet periods, the files a quiet one
holds back, why each waits) is read and written only here."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator

from ..errors import FileChanged as FileChanged  # re-exported
from ..errors import ResourceBusy as ResourceBusy
from ..errors import SpoolError as SpoolError
from . import outbound_items, writers
from .files import (
    place_with_reason,
)
from .layout import (
    plain_name_problem,
)
from .outbound_items import (
    _F_GETLEASE,
    _F_SETLEASE,
    _F_SETSIG,
    _GONE,
    CLAIM_BATCH,
    CLAIM_BYTES,
    CREATED,
    FRESH_KEEP,
    OVERFLOW,
    SUSPECT,
    Candidate,
    Claimed,
    Examined,
    FailedFile,
    OutboundState,
    Quiet,
    digest_fd,
    digest_keep,
    is_resource_error,
)


class PickupMixin(OutboundState):
    # -- pick-up, step 1: examine (reads only; no lock needed) --------------
    def _list_out(self) -> list[str]:
        found: list[tuple[int, str]] = []
        sizes: dict[str, int] = {}
        self._sizes_seen = sizes
        try:
            with os.scandir(self._out) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            continue        # sub-folders are ignored (CONTRACT §3)
                        st = entry.stat(follow_symlinks=False)
                        found.append((st.st_ctime_ns, entry.name))
                        sizes[entry.name] = st.st_size
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            return []
        return [name for _, name in sorted(found)]

    def queue_stats(self) -> tuple[int, int, float | None, int, int]:
        """(queued count, queued bytes, oldest claim time, waiting count, waiting bytes)
        in O(1): `waiting` is the pick-up backlog as last listed (out/ is listed
        again on every inotify wake-up and rescan), not a fresh scan of out/. The
        queue is the loaded window plus the index above it, whose sizes may still
        be being measured after a start-up (queue_index.py); the oldest claim is
        the window's."""
        return (len(self._pending) + len(self._rest), self._pending.bytes + self._rest.bytes,
                self._pending.oldest(), len(self._backlog), self._backlog_bytes)

    def _backlog_add(self, names: list[str] | deque[str], front: bool = False) -> None:
        for name in names:
            self._backlog_bytes += self._listed.get(name, 0)
        if front:
            self._backlog.extendleft(reversed(names))
        else:
            self._backlog.extend(names)

    def _waiting_entries(self) -> Iterator[tuple[str, os.stat_result]]:
        """(name, lstat) of each file in out/<ch>/ not yet claimed (one scandir)."""
        try:
            with os.scandir(self._out) as it:
                for entry in it:
                    try:
                        if not entry.name.startswith(".") and entry.is_file(
                                follow_symlinks=False):
                            yield entry.name, entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            pass

    def waiting(self) -> tuple[int, int]:
        """(count, bytes) of files in out/<ch>/ not yet claimed (one scandir)."""
        count = total = 0
        for _name, st in self._waiting_entries():
            total += st.st_size
            count += 1
        return count, total

    def waiting_files(self, limit: int = 100_000) -> list[tuple[str, int, float]]:
        """(name, size, ctime) of files in out/<ch>/ not yet claimed, arrival order."""
        found: list[tuple[float, str, int]] = []
        for name, st in self._waiting_entries():
            found.append((st.st_ctime, name, st.st_size))
            if len(found) >= limit:
                break
        return [(name, size, ctime) for ctime, name, size in sorted(found)]

    def examine(self, peer_max: int | None = None, limit: int = CLAIM_BATCH,
                max_bytes: int = CLAIM_BYTES, relist: bool = False) -> Examined:
        """Find and hash up to `limit` complete files of out/<ch>/ (see the module
        docstring). Files that can never be sent go to failed/ here. ResourceBusy
        when descriptors or memory run out (nothing is failed for that)."""
        self._require()
        if self._refused is not None:
            return Examined([], [])             # recover() looks again (usable is False)
        self._check(self._out, self._q, self._failed)
        now = time.monotonic()
        if relist or not self._backlog:
            queued = set(self._backlog)
            listed_at = time.monotonic()
            # (taken before listing: a file arriving meanwhile, its events lost, is listed)
            lost = self.writing.pop(OVERFLOW, None)
            try:
                listed = self._list_out()
            except BaseException:
                if lost is not None:        # not looked at: still to do
                    self.writing.setdefault(OVERFLOW, lost)
                raise
            if lost is not None:
                # events were lost: what is in out/ now may have a writer unseen (a
                # written mark set meanwhile by the watcher, in the event loop's
                # thread, is kept: the lock)
                with self.writing_lock:
                    for n in listed:
                        if self.writing.get(n, (0, CREATED))[1] == CREATED:
                            self.writing[n] = (listed_at, SUSPECT)
            if self.writing:
                present = set(listed)   # forget the marks of files no longer in out/
                with self.writing_lock:
                    for gone in [n for n, (at, _) in list(self.writing.items())
                                 if n not in present and at < listed_at]:
                        self.writing.pop(gone, None)
            # a fresh listing (inotify woke us: a writer closed, a file came) looks
            # again at once at what waited for a writer: its close may be why we were
            # woken, and a later file must not overtake it (a quiet-period wait keeps
            # its own time: nothing wakes it earlier)
            self._not_ready = {n: t for n, t in self._not_ready.items()
                               if n in self._blocking}
            new = [n for n in listed if n not in queued]
            for n in new:
                self._listed[n] = self._sizes_seen.get(n, 0)
            self._backlog_add(new)
        result = Examined([], [])
        hashed = 0
        kept = 0                # bytes of small files kept for the sender (FRESH_KEEP)
        skipped: list[str] = []
        blocked = False
        while self._backlog and len(result.ready) < limit and hashed < max_bytes:
            name = self._backlog.popleft()
            self._backlog_bytes -= self._listed.get(name, 0)
            again = self._not_ready.get(name)
            if again is not None and again > now:
                skipped.append(name)
                if name in self._blocking:
                    blocked = True      # later files wait for it (Quiet)
                    break
                continue
            try:
                got = self._examine_one(name, peer_max, result.failed, FRESH_KEEP - kept)
            except OSError as exc:
                self._backlog_add([name], front=True)
                self._backlog_add(skipped, front=True)
                skipped = []
                if is_resource_error(exc):
                    raise ResourceBusy(f"picking up {name!r} on {self.layout.peer}/"
                                       f"{self.channel}: {exc.strerror}: will retry") from None
                raise SpoolError(f"cannot pick up {self._out / name}: {exc.strerror}") from None
            if isinstance(got, Candidate):
                self._why.pop(name, None)
                self._not_ready.pop(name, None)
                self._blocking.discard(name)
                self._quiet_seen.pop(name, None)
                if name in self.writing:    # (claimed: a later file of that name is new)
                    with self.writing_lock:
                        self.writing.pop(name, None)
                self._listed.pop(name, None)
                result.ready.append(got)
                hashed += got.size if got.sha256 else 0
                kept += len(got.data) if got.data is not None else 0
            elif isinstance(got, float):
                self._not_ready[name] = now + got
                skipped.append(name)
                self._why.setdefault(name, "being written to")
                if isinstance(got, Quiet):
                    self._blocking.add(name)
                    blocked = True
                    break
                self._blocking.discard(name)
            else:
                self._why.pop(name, None)
                self._not_ready.pop(name, None)
                self._blocking.discard(name)
                self._quiet_seen.pop(name, None)
                self._listed.pop(name, None)
        # files not ready yet stay in the backlog, at its front (they arrived first)
        self._backlog_add(skipped, front=True)
        if blocked:
            # the pass stopped at a file waiting out its quiet period: look again when
            # it is due (the entries behind it may be stale, long due)
            result.retry_after = max(0.05, self._not_ready[skipped[-1]] - now)
            # what was not looked at behind it waits for it (waiting_reason)
            self._blocked_by = skipped[-1]
            if self._why:
                looked = set(skipped)
                for n in [n for n in self._why if n not in looked]:
                    del self._why[n]
        else:
            self._blocked_by = None
            waits = [t - now for t in self._not_ready.values() if t > now]
            result.retry_after = max(0.05, min(waits)) if waits else (
                0.05 if self._not_ready else None)
        result.more = not blocked and len(self._backlog) > len(skipped)
        if len(self._not_ready) > 4 * len(self._backlog) + 64:      # forget vanished names
            keep = set(self._backlog)
            self._not_ready = {n: t for n, t in self._not_ready.items() if n in keep}
            self._blocking &= keep
            self._quiet_seen = {n: v for n, v in self._quiet_seen.items() if n in keep}
            self._why = {n: v for n, v in self._why.items() if n in keep}
        return result

    def waiting_reason(self, name: str) -> str | None:
        """Why the file `name` in out/<ch>/ has not been picked up, as pick-up last
        saw it (None: not looked at yet, or nothing holds it back). For `linkctl
        queue`; read from the status thread (plain dict reads)."""
        why = self._why.get(name)
        if why is not None:
            return why
        ahead = self._blocked_by
        if ahead is not None and ahead != name and name in self._listed:
            return f"after {ahead!r}, which waits: files go in arrival order"
        return None

    def _examine_one(self, name: str, peer_max: int | None, failed: list[FailedFile],
                     keep: int = 0) -> Candidate | float | None:
        """A Candidate (with the content it hashed, if `keep` bytes or fewer); a
        float: not ready, look again in that many seconds; None: gone, or moved to
        failed/."""
        path = self._out / name
        problem = plain_name_problem(name)
        if problem:
            failed.append(self._fail_unclaimed(
                name, None, f"file name {problem}: it cannot be sent under this name; "
                            f"rename it (a plain UTF-8 name) and put it into out/ again"))
            return None
        try:
            st = os.lstat(path)
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            raise
        if stat.S_ISDIR(st.st_mode):
            return None
        if stat.S_ISLNK(st.st_mode):
            failed.append(self._fail_unclaimed(
                name, None, "is a symbolic link: linkd never follows links in the spool; "
                "copy the file into out/ instead"))
            return None
        if not stat.S_ISREG(st.st_mode):
            failed.append(self._fail_unclaimed(name, None, "is not a regular file"))
            return None
        try:
            fd = self.fs.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in _GONE or exc.errno in (errno.ELOOP, errno.ENXIO):
                return None             # gone, or swapped for a link or FIFO: next scan
            if exc.errno in (errno.EACCES, errno.EPERM):
                failed.append(self._fail_unclaimed(name, None, f"cannot read it: "
                                                   f"{exc.strerror}: check its permissions"))
                return None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None             # swapped meanwhile: look again at the next scan
            leased = self._lease(fd)
            if leased is None:
                # someone has it open for writing (a cp running)
                self._why[name] = "a process has it open for writing"
                return 0.2
            if not leased:
                # No lease (another owner's file, and no CAP_LEASE): inotify saw a
                # writer (written, or created, and not closed since) or, failing that,
                # the file must be unchanged for SETTLE seconds. Without the first a
                # writer pausing longer than SETTLE was claimed truncated, and what
                # it wrote after went into a file already sent and deleted.
                wait = writers.writer_wait(self.writing, self._quiet_seen, name, st)
                if wait is not None:
                    self._why[name] = writers.why_waiting(self.writing, name, st)
                    return wait
            problem = self._size_problem(st.st_size, peer_max)
            if problem is not None:
                os.close(fd)
                fd = -1
                failed.append(self._fail_unclaimed(name, st.st_size, problem))
                return None
            if st.st_size >= outbound_items.LATE_HASH:
                # Claimed now, hashed while it is sent (Outbound.digest_late): no
                # writer has it open (the lease), and it is checked again then.
                return Candidate(name, st.st_size, "", st.st_ino, st.st_mtime_ns,
                                 st.st_ctime_ns)
            size, sha256, data = digest_keep(self.fs, fd, keep, st.st_size)
            if leased and fcntl.fcntl(fd, _F_GETLEASE) != fcntl.F_RDLCK:
                self._why[name] = "a process opened it for writing while it was read"
                return 0.2
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (size, st.st_mtime_ns):
                self._why[name] = "written to while it was read"
                return 0.2
            problem = self._size_problem(size, peer_max)
            if problem is not None:
                os.close(fd)
                fd = -1
                failed.append(self._fail_unclaimed(name, size, problem))
                return None
            return Candidate(name, size, sha256, st.st_ino, st.st_mtime_ns, data=data)
        except OSError as exc:
            if is_resource_error(exc):
                raise
            if fd >= 0:
                os.close(fd)
                fd = -1
            failed.append(self._fail_unclaimed(name, None, f"cannot read it: "
                                               f"{exc.strerror or exc}"))
            return None
        finally:
            if fd >= 0:
                os.close(fd)            # closing drops the lease

    def digest_late(self, item: Claimed, stop: Callable[[], bool] = lambda: False) -> str:
        """The pick-up SHA-256 of a big file claimed without one (LATE_HASH), taken
        after its claim while the sender already sends it: as examine() hashes, under
        a read lease, and the file must still be the inode, size and mtime claimed, and
        stay so while it is read. Reads only (no lock); record_sha256() records it.
        FileChanged if the file changed (or a writer has it open); OSError as reading
        goes; `stop()` true ends it early (OSError ECANCELED: the session ended)."""
        fd = self._open_checked(item)
        try:
            leased = self._lease(fd)
            if leased is None:
                raise FileChanged("it was opened for writing after it was queued")
            before = os.fstat(fd)

            def halt() -> bool:
                # A writer opening the file breaks our lease: stop at once (and close,
                # releasing it) rather than keep the writer waiting while the rest of
                # the file is read; it is failed either way. (One fcntl per chunk.)
                if leased and fcntl.fcntl(fd, _F_GETLEASE) != fcntl.F_RDLCK:
                    raise FileChanged("it was opened for writing after it was queued, "
                                      "while it was being hashed")
                return stop()
            size, sha256 = digest_fd(self.fs, fd, halt)
            after = os.fstat(fd)
            if (leased and fcntl.fcntl(fd, _F_GETLEASE) != fcntl.F_RDLCK) or size != item.size \
                    or (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != \
                    (before.st_size, before.st_mtime_ns, before.st_ctime_ns):
                raise FileChanged("it was written to after it was queued, while it was "
                                  "being hashed")
            return sha256
        finally:
            self.fs.close(fd)

    @staticmethod
    def _lease(fd: int) -> bool | None:
        """Take a read lease: True; None if a writer holds the file open; False if
        no lease can be had here (not the owner without CAP_LEASE, or no support)."""
        try:
            # A lease break would signal us with SIGIO, whose default is to end the
            # process: route it to SIGURG, which is ignored by default.
            fcntl.fcntl(fd, _F_SETSIG, int(signal.SIGURG))
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
            return True
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOSYS,
                             errno.ENOTSUP):
                return False
            raise

    def _size_problem(self, size: int, peer_max: int | None) -> str | None:
        if size > self.max_bytes:
            return f"{size} bytes is over this channel's max_message_bytes ({self.max_bytes})"
        if peer_max is not None and size > peer_max:
            return f"{size} bytes is over the peer's max_message_bytes ({peer_max})"
        return None

    def _fail_unclaimed(self, name: str, size: int | None, reason: str) -> FailedFile:
        try:
            path = place_with_reason(self.fs, self._out / name, self._failed, name, reason)
            self.fs.fsync_dir(self._out)
        except FileNotFoundError:
            if os.path.lexists(self._out / name):
                raise SpoolError(f"cannot move {self._out / name} to {self._failed}: "
                                 f"is the folder missing?") from None
            path = self._failed / name   # vanished meanwhile: nothing to keep
        except OSError as exc:
            if is_resource_error(exc):
                raise
            raise SpoolError(f"cannot move {self._out / name} to {self._failed}: "
                             f"{exc.strerror}") from None
        return FailedFile(self.channel, name, size, reason, None, path)

