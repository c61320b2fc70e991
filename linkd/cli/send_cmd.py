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

import os
import shutil
import sys
import time
from pathlib import Path

from ..config import Config
from ..spool import SpoolLayout, plain_name_problem

POLL = 0.05


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    _fsync_dir(out_dir)
    return name, ino


def _inodes(directory: Path) -> dict[int, str]:
    try:
        with os.scandir(directory) as it:
            return {e.inode(): e.name for e in it if e.is_file(follow_symlinks=False)}
    except FileNotFoundError:
        return {}


def outcome(layout: SpoolLayout, channel: str, ino: int) -> tuple[str, str | None]:
    """('waiting'|'failed'|'done', reason)."""
    if ino in _inodes(layout.out_dir(channel)):
        return "waiting", None
    if ino in _inodes(layout.queue_dir(channel)):
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
            print(f"linkctl: {source}: no such regular file", file=sys.stderr)
            return 1
        problem = plain_name_problem(source.name)
        if problem:
            print(f"linkctl: {source}: cannot be sent under this name ({problem}); "
                  "rename it first", file=sys.stderr)
            return 1
    if not out_dir.is_dir():
        print(f"linkctl: {out_dir} does not exist: start linkd once to create the spool",
              file=sys.stderr)
        return 1
    queued: list[tuple[str, int]] = []
    for source in sources:
        try:
            queued.append(queue_file(out_dir, source))
        except FileExistsError:
            print(f"linkctl: {source.name} is already queued in {out_dir}: wait for it to go "
                  "or rename the new file", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"linkctl: cannot queue {source}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if not wait:
        for name, _ in queued:
            print(f"queued {name} for {peer_name}/{channel}")
        return 0
    deadline = None if timeout is None else time.monotonic() + timeout
    left = dict(queued)
    failures = 0
    inode_names = {ino: name for name, ino in queued}
    while left:
        for ino in list(inode_names):
            state, reason = outcome(layout, channel, ino)
            if state == "waiting":
                continue
            name = inode_names.pop(ino)
            left.pop(name, None)
            if state == "failed":
                failures += 1
                print(f"{name}: FAILED: {reason}", file=sys.stderr)
            else:
                print(f"{name}: delivered to {peer_name}")
        if not left:
            break
        if deadline is not None and time.monotonic() > deadline:
            print(f"linkctl: timed out waiting for {peer_name} to acknowledge "
                  f"{', '.join(left)}", file=sys.stderr)
            return 1
        time.sleep(POLL)
    return 1 if failures else 0
