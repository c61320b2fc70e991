"""Operator control: the persistent pause state and the status socket's changing endpoints.

Theory of operation
-------------------
`PauseState` is a small JSON file, `<state_dir>/paused.json`::

    {"version": 1, "peers": {"europol": {"all": false, "channels": ["bulk"]}}}

It is read once at start and rewritten atomically on every change (write a
dot-file opened O_NOFOLLOW|O_EXCL, fsync, rename over, fsync the folder), so a
crash leaves either the old or the new state, never half of one. A peer is
paused as a whole (`all`) or channel by channel; `is_paused(peer, channel)` is
true if either is. Only sending stops: receiving goes on (CONTRACT §1).
Listeners registered with `subscribe` are called after every change; the
daemon uses that to update the status board and to wake the sender
(`daemon.on_pause_changed(peer)`, when the daemon has it).

`Controller` answers the status socket's requests that need the daemon:
GET /queue and /failed, and POST /pause, /resume, /retry, /reconnect (the
server has already refused the latter to anyone but root and the daemon's own
user). Its answers are (HTTP status, JSON value); errors carry one line in
`{"error": ...}` for linkctl to print.

Retry moves `failed/<ch>/<name>` back into `out/<ch>/<name>` with
renameat2(RENAME_NOREPLACE) (a file of that name already waiting in out/ is
never replaced; link+unlink where the file system lacks it), then removes the
`.reason`; pick-up sees it like any dropped file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .spool.fs import fsync_dir
from .status.server import Streamed

PAUSE_FILE = "paused.json"
RENAME_NOREPLACE = 1
AT_FDCWD = -100

Listener = Callable[[str, str | None, bool], None]


class PauseState:
    """Which peers and channels are paused; persisted in `<state_dir>/paused.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / PAUSE_FILE
        self._peers: dict[str, dict[str, Any]] = {}
        self._listeners: list[Listener] = []
        self.load()

    def load(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._peers = {}
            return
        with os.fdopen(fd, "rb") as f:
            raw = f.read(1 << 20)
        try:
            doc = json.loads(raw)
            peers = doc["peers"]
            self._peers = {
                str(name): {"all": bool(entry.get("all")),
                            "channels": sorted({str(c) for c in entry.get("channels", [])})}
                for name, entry in peers.items() if isinstance(entry, dict)}
        except (ValueError, KeyError, TypeError, AttributeError):
            # A damaged file must not stop the daemon; keeping files queued is the safe
            # side, but we cannot know what was paused: start unpaused and say so.
            self._peers = {}
            raise ValueError(f"{self.path} is not a linkd pause file: remove it and "
                             "pause again") from None

    def is_paused(self, peer: str, channel: str | None = None) -> bool:
        entry = self._peers.get(peer)
        if entry is None:
            return False
        return bool(entry["all"]) or (channel is not None and channel in entry["channels"])

    def peer_paused(self, peer: str) -> bool:
        """The peer as a whole (not counting single channels)."""
        entry = self._peers.get(peer)
        return bool(entry and entry["all"])

    def set_paused(self, peer: str, channel: str | None, paused: bool) -> None:
        """Pause or resume a peer (channel None) or one of its channels; persist, notify.

        Resuming a whole peer also resumes its single channels: `linkctl resume --peer P`
        means "send everything to P again"."""
        entry = self._peers.setdefault(peer, {"all": False, "channels": []})
        if channel is None:
            entry["all"] = paused
            if not paused:
                entry["channels"] = []
        else:
            chans = set(entry["channels"])
            chans.add(channel) if paused else chans.discard(channel)
            entry["channels"] = sorted(chans)
        if not entry["all"] and not entry["channels"]:
            del self._peers[peer]
        self._save()
        for listener in list(self._listeners):
            listener(peer, channel, paused)

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(peer, channel, paused)` after every change."""
        self._listeners.append(listener)

    def _save(self) -> None:
        doc = {"version": 1, "peers": self._peers}
        data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        folder = self.path.parent
        temp = folder / f".{PAUSE_FILE}.{os.getpid()}.tmp"
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, self.path)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# --------------------------------------------------------------------------- failed/

_libc: Any = None


def _renameat2(src: Path, dst: Path) -> None:
    """rename(src, dst) that fails with FileExistsError instead of replacing dst."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    func = getattr(_libc, "renameat2", None)
    if func is not None:
        rc = func(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(dst))
    os.link(src, dst)            # no renameat2 here: link refuses an existing name too
    os.unlink(src)




def list_failed(layout: Any, peer: str, channels: list[str]) -> list[dict[str, Any]]:
    """Blocking: the files in failed/<ch>/ of `channels`, oldest first per channel."""
    entries: list[dict[str, Any]] = []
    for channel in channels:
        folder = Path(layout.failed_dir(channel))
        try:
            with os.scandir(folder) as it:
                found = [e for e in it if _a_failed_file(e)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        rows = []
        for e in found:
            st = e.stat(follow_symlinks=False)
            try:
                with open(folder / f"{e.name}.reason", "rb") as f:
                    reason = f.read(4096).decode("utf-8", "replace").strip() or None
            except OSError:
                reason = None
            rows.append((st.st_mtime, {
                "peer": peer, "channel": channel, "name": e.name, "size": st.st_size,
                "reason": reason,
                "failed_at": dt.datetime.fromtimestamp(st.st_ctime, dt.UTC)
                .isoformat(timespec="seconds").replace("+00:00", "Z")}))
        entries += [row for _, row in sorted(rows, key=lambda r: (r[0], r[1]["name"]))]
    return entries


def _a_failed_file(entry: os.DirEntry[str]) -> bool:
    """What a failed/ (or quarantine/) folder holds for the operator: anything but a
    folder, a dot-file or a .reason file. Not only regular files: a symbolic link or a
    FIFO dropped into out/ is moved there too, with its reason (an operator trial found
    them uncounted and unlisted)."""
    return not entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".") \
        and not entry.name.endswith(".reason")


def count_files(folder: Path) -> int:
    """Blocking: the entries of `folder` an operator must look at (_a_failed_file)."""
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if _a_failed_file(e))
    except OSError:
        return 0


def retry_failed(layout: Any, channel: str, names: list[str]) -> list[tuple[str, str | None]]:
    """Blocking: move each named failed file back into out/<channel>/; (name, problem)."""
    failed, out = Path(layout.failed_dir(channel)), Path(layout.out_dir(channel))
    results: list[tuple[str, str | None]] = []
    for name in names:
        if not name or "/" in name or name.startswith(".") or name.endswith(".reason"):
            results.append((name, "not a file name in failed/"))
            continue
        src, dst = failed / name, out / name
        try:
            try:
                st = os.lstat(src)
            except FileNotFoundError:
                results.append((name, f"not in {failed}"))
                continue
            if not stat.S_ISREG(st.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                results.append((name, f"{src} is {what}, which linkd never sends: put a copy "
                                      f"of the file itself into {out} and delete this one"))
                continue
            _renameat2(src, dst)
        except FileExistsError:
            results.append((name, f"{dst} already exists: move it away first"))
            continue
        except OSError as exc:
            results.append((name, f"cannot move it to {out}: {exc.strerror or exc}"))
            continue
        try:
            os.unlink(failed / f"{name}.reason")
        except FileNotFoundError:
            pass
        results.append((name, None))
    if any(problem is None for _, problem in results):
        fsync_dir(out)
        fsync_dir(failed)
    return results


# --------------------------------------------------------------------------- endpoints


class Controller:
    """The status server's link to the daemon (see the module docstring)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def _peer(self, params: dict[str, Any]) -> tuple[Any, str | None]:
        name = params.get("peer")
        if not isinstance(name, str) or not name:
            return None, "name a peer (--peer P)"
        link = self.daemon.links.get(name)
        if link is None:
            known = ", ".join(self.daemon.links) or "none"
            return None, f"no peer named {name!r} (configured: {known})"
        return link, None

    @staticmethod
    def _channel(link: Any, params: dict[str, Any]) -> tuple[str | None, str | None]:
        channel = params.get("channel")
        if channel in (None, ""):
            return None, None
        if not isinstance(channel, str) or channel not in link.channels:
            known = ", ".join(link.channels)
            return None, f"peer {link.name} has no channel {channel!r} (configured: {known})"
        return channel, None

    async def handle(self, method: str, path: str, params: dict[str, Any],
                     privileged: bool) -> tuple[int, Any]:
        if path == "/queue":
            return await self.queue(params)
        if path == "/failed":
            return await self.failed(params)
        link, problem = self._peer(params)
        if problem:
            return 400 if "name a peer" in problem else 404, {"error": problem}
        if path in ("/pause", "/resume"):
            channel, problem = self._channel(link, params)
            if problem:
                return 404, {"error": problem}
            paused = path == "/pause"
            await trio.to_thread.run_sync(self.daemon.pauses.set_paused, link.name, channel,
                                          paused)
            # an operator's act: in the log and the audit trail (docs/EVIDENCE.md)
            event = ("paused" if paused else "resumed") if channel is None else \
                ("channel_paused" if paused else "channel_resumed")
            link.log.info(event, peer=link.name, **({"channel": channel} if channel else {}))
            hook = getattr(self.daemon, "on_pause_changed", None)
            if hook is not None:
                result = hook(link.name)
                if hasattr(result, "__await__"):
                    await result
            what = f"{link.name}/{channel}" if channel else link.name
            return 200, {"message": f"{'paused' if paused else 'resumed'} sending to {what}"}
        if path == "/reconnect":
            return await self.reconnect(link, bool(params.get("force")))
        if path == "/retry":
            return await self.retry(link, params)
        return 404, {"error": f"unknown endpoint {path}"}

    def _unknown_channel(self, peer: str | None, channel: str | None) -> str | None:
        """Why `channel` names nothing (of `peer`, or of any peer), or None (a typo
        listed nothing and said "empty", exit 0: it looked like all clear)."""
        if channel is None:
            return None
        known = sorted({c for name, link in self.daemon.links.items() if peer in (None, name)
                        for c in link.channels})
        if channel in known:
            return None
        which = f"peer {peer} has no channel" if peer is not None else "no peer has a channel"
        return f"{which} {channel!r} (configured: {', '.join(known) or 'none'})"

    async def queue(self, params: dict[str, Any]) -> tuple[int, Any]:
        peer, channel = params.get("peer") or None, params.get("channel") or None
        if peer is not None and peer not in self.daemon.links:
            return 404, {"error": f"no peer named {peer!r}"}
        problem = self._unknown_channel(peer, channel)
        if problem:
            return 404, {"error": problem}
        source = getattr(self.daemon, "queue_chunks", None)
        if source is None:
            return 200, []
        return 200, Streamed(source(peer, channel))

    async def failed(self, params: dict[str, Any]) -> tuple[int, Any]:
        peer, channel = params.get("peer") or None, params.get("channel") or None
        links = list(self.daemon.links.values())
        if peer is not None:
            links = [link for link in links if link.name == peer]
            if not links:
                return 404, {"error": f"no peer named {peer!r}"}
        problem = self._unknown_channel(peer, channel)
        if problem:
            return 404, {"error": problem}
        entries: list[dict[str, Any]] = []
        for link in links:
            chans = [c for c in link.channels if channel is None or c == channel]
            entries += await trio.to_thread.run_sync(list_failed, link.layout, link.name, chans)
        return 200, entries

    async def reconnect(self, link: Any, force: bool = False) -> tuple[int, Any]:
        """Skip the backoff; `force`: end the live session first (a new one asks the
        peer what it holds, e.g. when it has stopped acknowledging: ack_overdue)."""
        from .net.supervisor import BYE_RECONNECT, redial_now
        if force and link.active is not None:
            await link.active.close(BYE_RECONNECT)
            if link.peer.connect is None:
                return 200, {"message": f"ended the session with {link.name}; it dials us "
                                        "again"}
            redial_now(link)
            return 200, {"message": f"ended the session with {link.name}; dialling it again "
                                    "now"}
        if link.peer.connect is None:
            return 409, {"error": f"peer {link.name} has no connect address: it dials us, "
                                  "so there is nothing to redial (--force ends its session)"}
        if link.active is not None:
            return 200, {"message": f"{link.name} is already connected (--force ends the "
                                    "session and starts a new one)"}
        redial_now(link)
        return 200, {"message": f"dialling {link.name} now"}

    async def retry(self, link: Any, params: dict[str, Any]) -> tuple[int, Any]:
        channel, problem = self._channel(link, params)
        if problem:
            return 404, {"error": problem}
        names = params.get("names") or []
        every = bool(params.get("all"))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return 400, {"error": "names must be a list of file names"}
        chans = [channel] if channel else list(link.channels)
        if not every and channel is None:
            return 400, {"error": "name the channel (--channel C) of the files to retry"}
        results: list[dict[str, Any]] = []
        for ch in chans:
            todo = names
            if every:
                todo = [f["name"] for f in await trio.to_thread.run_sync(
                    list_failed, link.layout, link.name, [ch])]
            for name, err in await trio.to_thread.run_sync(retry_failed, link.layout, ch, todo):
                results.append({"peer": link.name, "channel": ch, "name": name,
                                "retried": err is None, "error": err})
                if err is None:
                    link.log.info("message_retried", peer=link.name, channel=ch, name=name)
        refresh = getattr(self.daemon, "refresh_folder_counts", None)
        if refresh is not None:
            await refresh(link)
        return 200, results
