"""`linkctl send`: queue files the Maildir way, and optionally wait for the peer's ack.

Each file is copied to a dot-name inside out/<channel>/, fsync'd, then
hard-linked to its real name (which fails rather than replace a file of the
same name still queued) and the dot-name removed; the directory is fsync'd.

`--wait` follows each file by its inode, which a rename keeps: the daemon
moves it out/<ch>/NAME -> its claimed store -> deleted (or sent/) on the
peer's acknowledgement, or -> failed/<ch>/ with a .reason. The places are
checked in that order, so a move between two checks is never missed.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..spool import SpoolLayout, plain_name_problem
from ..spool.fs import fsync_dir
from .safe import printable
from .status_client import http_get

POLL = 0.05




def queue_file(out_dir: Path, source: Path) -> tuple[str, int]:
    """Queue one file; return (name, inode)."""
    name = source.name
    temp = out_dir / f".{name}.linkctl.{os.getpid()}.tmp"
    with open(source, "rb") as src, open(temp, "xb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    try:
        os.link(temp, out_dir / name)
    except FileExistsError:
        os.unlink(temp)
        raise
    ino = os.stat(temp).st_ino
    os.unlink(temp)
    fsync_dir(out_dir)
    return name, ino


def _inodes(directory: Path) -> dict[int, str]:
    try:
        with os.scandir(directory) as it:
            return {e.inode(): e.name for e in it if e.is_file(follow_symlinks=False)}
    except FileNotFoundError:
        return {}


def _readable(folder: Path) -> bool:
    """Whether this user can list `folder` (True if it does not exist: nothing to list)."""
    try:
        os.stat(folder)
    except FileNotFoundError:
        return True
    except PermissionError:
        return False            # a folder above it is closed to this user
    return os.access(folder, os.R_OK | os.X_OK)


def _queue_dirs(layout: SpoolLayout, channel: str) -> list[Path]:
    """Where claimed files wait: the spool's queue/<ch>/ (CONTRACT rev. 2) and, for a
    daemon of the previous layout, its state-dir claim folder."""
    dirs = [layout.peer_dir / "queue" / channel]
    claimed = getattr(layout, "claimed_dir", None)
    if claimed is not None:
        dirs.append(Path(claimed(channel)))
    return dirs


def outcome(layout: SpoolLayout, channel: str, ino: int,
            name: str | None = None) -> tuple[str, str | None]:
    """('waiting'|'failed'|'done', reason) of the file queued as inode `ino` (and
    `name`: in out/ another file of that inode is not it)."""
    waiting = _inodes(layout.out_dir(channel))
    if ino in waiting and (name is None or waiting[ino] == name):
        return "waiting", None
    for queue_dir in _queue_dirs(layout, channel):
        if ino in _inodes(queue_dir):
            return "waiting", None
    failed = _inodes(layout.failed_dir(channel))
    if ino in failed:
        reason_file = layout.failed_dir(channel) / f"{failed[ino]}.reason"
        try:
            reason = reason_file.read_text().strip()
        except OSError:
            reason = "moved to failed/"
        return "failed", reason
    return "done", None


def run_send(cfg: Config, peer_name: str, channel: str, files: list[str], wait: bool,
             timeout: float | None) -> int:
    peer = cfg.peer(peer_name)
    if peer is None:
        known = ", ".join(p.name for p in cfg.peers) or "none"
        print(f"linkctl: no peer named {peer_name!r} in {cfg.path} (configured: {known})",
              file=sys.stderr)
        return 1
    if peer.channel(channel) is None:
        known = ", ".join(c.name for c in peer.channels)
        print(f"linkctl: peer {peer_name} has no channel {channel!r} in {cfg.path} "
              f"(configured: {known})", file=sys.stderr)
        return 1
    layout = SpoolLayout(cfg.node.spool_dir, cfg.node.state_dir, peer_name)
    out_dir = layout.out_dir(channel)
    sources = [Path(f) for f in files]
    for source in sources:
        if not source.is_file():
            print(f"linkctl: {_clean(source)}: no such regular file", file=sys.stderr)
            return 1
        problem = plain_name_problem(source.name)
        if problem:
            print(f"linkctl: {_clean(source)}: cannot be sent under this name ({problem}); "
                  "rename it first", file=sys.stderr)
            return 1
    if not out_dir.is_dir():
        print(f"linkctl: {out_dir} does not exist: start linkd once to create the spool",
              file=sys.stderr)
        return 1
    if wait:
        # Refused before anything is queued: a producer in spool_group may write into
        # out/ but not read where the daemon keeps its files (queue/, failed/), so it
        # could not follow them; failing after queueing invites a retry, a duplicate.
        for folder in [*_queue_dirs(layout, channel), layout.failed_dir(channel)]:
            if not _readable(folder):
                print(f"linkctl: --wait follows each file through {folder}, which this user "
                      f"cannot read: run it as the daemon's user or root, or send without "
                      f"--wait and follow with `linkctl queue`; nothing was queued",
                      file=sys.stderr)
                return 1
    queued: list[tuple[str, int]] = []
    # An inode number is free for reuse once its file is deleted: a file of ours that
    # the daemon delivered (and deleted) while the next ones were copied in may have
    # lent its number to a later one (operator trial: followed by inode alone, the
    # earlier file was never seen done, and --wait hung or timed out on files long
    # delivered). Its number taken by another file proves it gone: done.
    gone: set[int] = set()          # indexes into queued
    for source in sources:
        try:
            name, ino = queue_file(out_dir, source)
            gone.update(k for k, (_, i) in enumerate(queued) if i == ino)
            queued.append((name, ino))
        except FileExistsError:
            print(f"linkctl: {_clean(source.name)} is already queued in {out_dir}: wait for "
                  "it to go or rename the new file", file=sys.stderr)
            return 1
        except OSError as exc:
            # Name the folder (a producer's permission problem is about out/, not the
            # source file it could read), unless reading the source is what failed.
            if exc.filename is not None and Path(exc.filename) == source:
                print(f"linkctl: cannot read {_clean(source)}: {exc.strerror or exc}",
                      file=sys.stderr)
            else:
                print(f"linkctl: cannot write into {out_dir}: {exc.strerror or exc}: this "
                      "user needs write access to that folder (see [node].spool_group)",
                      file=sys.stderr)
            return 1
    if not wait:
        for name, _ in queued:
            print(f"queued {_clean(name)} for {peer_name}/{channel}")
        return 0
    progress = Progress(cfg, peer_name, channel, [(n, source.stat().st_size)
                                                  for (n, _), source in zip(queued, sources,
                                                                            strict=True)])
    deadline = None if timeout is None else time.monotonic() + timeout
    left = dict(enumerate(queued))  # index -> (name, inode): one send may name a file twice
    failures = 0
    try:
        for k in sorted(gone):
            progress.done(left.pop(k)[0])
        while left:
            for k, (name, ino) in list(left.items()):
                state, reason = outcome(layout, channel, ino, name)
                if state == "waiting":
                    continue
                del left[k]
                if state == "failed":
                    failures += 1
                    progress.failed(name, reason or "moved to failed/")
                else:
                    progress.done(name)
            if not left:
                break
            if deadline is not None and time.monotonic() > deadline:
                progress.close()
                print(f"linkctl: timed out waiting for {peer_name} to acknowledge "
                      f"{_clean(', '.join(n for n, _ in left.values()))}", file=sys.stderr)
                return 1
            progress.poll([n for n, _ in left.values()])
            time.sleep(POLL)
    finally:
        progress.close()
    return 1 if failures else 0


class Progress:
    """What `send --wait` shows while it waits (CONTRACT §1, issue 9 item 4).

    On a terminal: a rich progress bar per file (bytes acknowledged, rate, ETA),
    from the channel's `in_flight` in /status. Otherwise plain lines: one per
    file when it is delivered or failed, and "waiting: PEER down since HH:MM,
    N attempts" when the link is down (again when that changes, at most every
    30 s). The status socket is optional: without it, only the outcome lines."""

    REPEAT = 30.0

    def __init__(self, cfg: Config, peer: str, channel: str,
                 files: list[tuple[str, int]]) -> None:
        self.sock = cfg.node.status_socket
        self.state_dir = cfg.node.state_dir
        self.peer, self.channel = peer, channel
        self.sizes = dict(files)
        self.last_poll = 0.0
        self.last_wait_line: tuple[str, float] | None = None
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}
        if sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as Bar
            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self.bar.start()
            for name, size in files:
                self.tasks[name] = self.bar.add_task(_clean(name), total=size or 1)

    def _say(self, line: str, err: bool = False) -> None:
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr if err else sys.stdout, flush=True)

    def done(self, name: str) -> None:
        if self.bar is not None:
            self.bar.update(self.tasks[name], completed=self.sizes.get(name) or 1)
        delivered = self.delivered_name(name)
        where = f" as {_clean(delivered)}" if delivered and delivered != name else ""
        self._say(f"{_clean(name)}: delivered to {self.peer}{where}")

    def delivered_name(self, name: str) -> str | None:
        """The name the peer delivered `name` under (`~N` on a clash), from its signed
        receipt (docs/EVIDENCE.md); None where this user cannot read the state dir."""
        from ..evidence.receipts import ReceiptStore
        try:
            doc = ReceiptStore(self.state_dir / "receipts").find(self.peer, self.channel,
                                                                 name=name)
        except OSError:
            return None
        receipt = (doc or {}).get("receipt") or {}
        if receipt.get("sent_name") != name or receipt.get("size") != self.sizes.get(name):
            return None
        value = receipt.get("delivered_name")
        return value if isinstance(value, str) else None

    def failed(self, name: str, reason: str) -> None:
        self._say(f"{_clean(name)}: FAILED: {_clean(reason)}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def poll(self, waiting: list[str]) -> None:
        now = time.monotonic()
        if now - self.last_poll < 0.5:
            return
        self.last_poll = now
        try:
            code, body = http_get(self.sock, "/status", timeout=2.0)
            doc = json.loads(body) if code == 200 else None
        except (OSError, ValueError, http.client.HTTPException):
            return
        peer = next((p for p in (doc or {}).get("peers", []) if p.get("name") == self.peer),
                    None)
        if peer is None:
            return
        if peer.get("state") != "connected":
            since = _local_hhmm(peer.get("down_since") or peer.get("since"))
            line = f"waiting: {self.peer} down since {since}, {peer.get('attempts', 0)} attempts"
            if peer.get("last_error"):
                line += f" ({_clean(str(peer['last_error']))[:100]})"
            key = f"{self.peer} {since}"
            if self.last_wait_line is None or self.last_wait_line[0] != key \
                    or now - self.last_wait_line[1] >= self.REPEAT:
                self.last_wait_line = (key, now)
                self._say(line)
            return
        self.last_wait_line = None
        if self.bar is None:
            return
        for c in peer.get("channels") or []:
            flight = c.get("in_flight") if c.get("name") == self.channel else None
            if isinstance(flight, dict) and flight.get("name") in self.tasks \
                    and flight.get("name") in waiting:
                self.bar.update(self.tasks[flight["name"]],
                                completed=int(flight.get("sent_bytes") or 0))


_clean = printable      # names and reasons may come from a peer (safe.py)


def _local_hhmm(value: Any) -> str:
    try:
        when = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return "?"
    return when.astimezone().strftime("%H:%M")
