"""Where everything lives (CONTRACT §3), the one-daemon lock, and file-name rules.

Theory of operation
-------------------
Spool (applications see it), per peer::

    <spool>/<peer>/out/<ch>/        dropped files; claimed ones leave by rename
    <spool>/<peer>/queue/<ch>/      claimed files: <seq>.data + <seq>.meta (+ <seq>.fail)
    <spool>/<peer>/in/<ch>/         delivered files, complete or absent
    <spool>/<peer>/sent/<ch>/       acknowledged files (archive_sent only)
    <spool>/<peer>/failed/<ch>/     <name> + <name>.reason
    <spool>/<peer>/quarantine/      <name> + <name>.reason
    <spool>/<peer>/tmp/             inbound partials <ch>.<seq>.part
    <spool>/.linkd.lock             flock: one daemon per spool (holds its pid; a
                                    dot-name, so never a peer's folder)

State (ours alone, 0700; small records only, may be another file system)::

    <state>/linkd.lock                               flock: one daemon per state dir
    <state>/peers/<peer>/channels/<ch>/out.json      sender: next seq, highest acked seq
    <state>/peers/<peer>/channels/<ch>/in.json       receiver: committed, intent, partial
    <state>/peers/<peer>/channels/<ch>/delivered.jsonl  receiver: recent deliveries

Every per-channel record lives in a folder of its own whose fixed file names no
channel name can reach (revision 1 kept `<ch>.json` beside a `<ch>/` folder, so
channels `X` and `X.json` collided). Claims of revision 1 (`peers/<peer>/out/`)
are migrated into queue/ at start-up (outbound.py).

A claimed file moves from out/<ch>/ to queue/<ch>/ and a finished partial from
tmp/ to in/<ch>/ by rename(2), so each pair must be on one mount.
`create()` checks both with probe renames and refuses with a clear SpoolError
rather than failing later with EXDEV.

Crash points of `create()`: each folder is made by mkdir (atomic) then chmod'ed;
a crash in between leaves a folder with the umask's mode that the next start
treats as "existing, leave as is" -- harmless, and the parent is fsync'd after
each mkdir so that an fsync'd claim inside can never lose its folder.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import SpoolError
from ..names import NAME_MAX, is_channel_name
from ..names import plain_name_problem as plain_name_problem  # re-exported: spool callers
from .fs import DEFAULT_FS, FS
from .safedir import check_folders

FOLDER_MODE = 0o750
STATE_MODE = 0o700
def _bytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))


def tilde_name(name: str, n: int, reserve: int = 0) -> str:
    """`name` with `~n` before its first extension (n = 0: `name` itself), cut to
    fit NAME_MAX - reserve bytes: report.txt -> report~1.txt, a.tar.gz ->
    a~1.tar.gz, README -> README~1. Only over-long names are cut (stem first)."""
    dot = name.find(".", 1)
    stem, ext = (name, "") if dot < 0 else (name[:dot], name[dot:])
    tag = f"~{n}" if n else ""
    while _bytes(stem) + len(tag) + _bytes(ext) > NAME_MAX - reserve and (stem or ext):
        if len(stem) > 1 or not ext:
            stem = stem[:-1]
        else:
            ext = ext[:-1]
    return stem + tag + ext


def safe_name(name: str) -> str:
    """A plain name made from an untrusted one (for quarantine of bad names)."""
    cleaned = "".join("_" if c in "/\0" else c for c in str(name)).lstrip(".")
    cleaned = cleaned.encode("utf-8", "replace").decode("utf-8")
    while _bytes(cleaned) > NAME_MAX:
        cleaned = cleaned[:-1]
    return cleaned or "unnamed"


def check_channel(channel: str) -> str:
    if not is_channel_name(channel):
        raise SpoolError(f"channel name {channel!r} is not [A-Za-z0-9_.-]{{1,64}} "
                         f"(and not '.' or '..'): rename it in the config")
    return channel


def group_folder_mode(kind: str, spool_group: str | None) -> tuple[int, int | None]:
    """(mode, gid or None) of a spool folder of `kind` with `[node] spool_group`.

    kind: "out" (out/<ch>/: producers hand over files: 2770, setgid so their files
    keep the group), "in" (in/<ch>/: consumers read: 2750), "path" (the spool root,
    the peer folder, out/ and in/ themselves: 0750, traversable by the group) or
    "private" (everything else: 0750, group unchanged). Without a group every
    folder is 0750 as before. SpoolError (naming the group) if it does not exist."""
    if spool_group is None or kind == "private":
        return FOLDER_MODE, None
    try:
        gid = grp.getgrnam(spool_group).gr_gid
    except KeyError:
        raise SpoolError(f"spool_group {spool_group!r} ([node].spool_group) is not a group on "
                         f"this system: create it (groupadd {spool_group}) or remove the "
                         "key") from None
    mode = {"out": 0o2770, "in": 0o2750}.get(kind, FOLDER_MODE)
    return mode, gid


def _apply_group(folder: Path, mode: int, gid: int) -> None:
    """Give an existing folder the group and mode spool_group asks for."""
    try:
        st = os.lstat(folder)
        if st.st_gid != gid:
            os.chown(folder, -1, gid, follow_symlinks=False)
            st = os.lstat(folder)       # a chown may clear the setgid bit
        if (st.st_mode & 0o7777) != mode:
            os.chmod(folder, mode, follow_symlinks=False)
    except OSError as exc:
        raise SpoolError(f"cannot give {folder} group {gid} and mode {mode:04o} for "
                         f"[node].spool_group: {exc.strerror}: run linkd as the folder's "
                         "owner (or root), or fix it by hand") from None


class SpoolLayout:
    """Paths of one peer's spool and state (see the module docstring)."""

    spool_group: str | None = None      # [node].spool_group, set by the daemon

    def __init__(self, spool_dir: Path, state_dir: Path, peer: str) -> None:
        problem = plain_name_problem(peer)
        if problem:
            raise SpoolError(f"peer name {peer!r} {problem}: it cannot be a spool folder")
        self.spool_dir = Path(spool_dir)
        self.state_dir = Path(state_dir)
        self.peer = peer
        self.peer_dir = self.spool_dir / peer
        self.state_peer_dir = self.state_dir / "peers" / peer

    def out_dir(self, ch: str) -> Path:
        return self.peer_dir / "out" / check_channel(ch)

    def in_dir(self, ch: str) -> Path:
        return self.peer_dir / "in" / check_channel(ch)

    def sent_dir(self, ch: str) -> Path:
        return self.peer_dir / "sent" / check_channel(ch)

    def failed_dir(self, ch: str) -> Path:
        return self.peer_dir / "failed" / check_channel(ch)

    def quarantine_dir(self) -> Path:
        return self.peer_dir / "quarantine"

    def tmp_dir(self) -> Path:
        return self.peer_dir / "tmp"

    def queue_dir(self, ch: str) -> Path:
        return self.peer_dir / "queue" / check_channel(ch)

    def channel_state_dir(self, ch: str) -> Path:
        return self.state_peer_dir / "channels" / check_channel(ch)

    def state_file_out(self, ch: str) -> Path:
        return self.channel_state_dir(ch) / "out.json"

    def state_file_in(self, ch: str) -> Path:
        return self.channel_state_dir(ch) / "in.json"

    def journal_file(self, ch: str) -> Path:
        return self.channel_state_dir(ch) / "delivered.jsonl"

    # Revision 1 places, read once to migrate them (see outbound.py / inbound.py).
    def legacy_claimed_dir(self, ch: str) -> Path:
        return self.state_peer_dir / "out" / check_channel(ch)

    def legacy_state_file_out(self, ch: str) -> Path:
        return self.state_peer_dir / "out" / f"{check_channel(ch)}.json"

    def legacy_state_file_in(self, ch: str) -> Path:
        return self.state_peer_dir / "in" / f"{check_channel(ch)}.json"

    def check(self, *folders: Path) -> None:
        """SymlinkedFolder if any of `folders`, or a folder between it and its root
        (spool_dir, or state_dir for a state folder outside the spool; a state dir
        inside the spool, the default <spool>/.linkd, is itself checked) is a
        symbolic link (safedir.py). Called before every step that writes into a folder."""
        for folder in folders:
            inside = folder.is_relative_to(self.spool_dir)
            check_folders(self.spool_dir if inside else self.state_dir, (folder,))

    def create(self, channels: Iterable[str], archive_sent: bool, fs: FS | None = None) -> None:
        """Make every missing folder (spool 0750, state 0700), leave existing ones
        as they are, then check that claims and deliveries can be done by rename.
        SymlinkedFolder (before anything is made, and again after) if a folder it
        would use is a symbolic link: linkd refuses to start rather than write
        through it."""
        fs = fs or DEFAULT_FS
        channels = [check_channel(ch) for ch in channels]
        spool = [(self.spool_dir, "path"), (self.peer_dir, "path"),
                 (self.quarantine_dir(), "private"), (self.tmp_dir(), "private"),
                 (self.peer_dir / "out", "path"), (self.peer_dir / "in", "path")]
        for ch in channels:
            spool += [(self.out_dir(ch), "out"), (self.queue_dir(ch), "private"),
                      (self.in_dir(ch), "in"), (self.failed_dir(ch), "private")]
            if archive_sent:
                spool.append((self.sent_dir(ch), "private"))
        state = [self.channel_state_dir(ch) for ch in channels]
        every = [folder for folder, _kind in spool] + state
        self.check(*every)      # before mkdir: never create folders through a link
        for folder, kind in spool:
            mode, gid = group_folder_mode(kind, self.spool_group)
            make_folder(folder, mode, fs)
            if gid is not None:
                _apply_group(folder, mode, gid)
        make_folder(self.state_dir, STATE_MODE, fs)
        for folder in state:
            make_folder(folder, STATE_MODE, fs)
        self.check(*every)      # and after: what we will write into is what we checked
        for ch in channels:
            self._probe_same_mount(self.out_dir(ch), self.queue_dir(ch),
                                   "dropped files cannot be claimed")
            self._probe_same_mount(self.tmp_dir(), self.in_dir(ch),
                                   "received files cannot be delivered")

    @staticmethod
    def _probe_same_mount(src_dir: Path, dst_dir: Path, consequence: str) -> None:
        """Rename a dot-file from src_dir to dst_dir: EXDEV means two mounts."""
        name = f".linkd-probe-{os.getpid()}"
        probe, target = src_dir / name, dst_dir / name
        for stale in (probe, target):      # left by a daemon killed during this very check
            try:
                os.unlink(stale)
            except OSError:
                pass
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            os.close(fd)
            try:
                os.rename(probe, target)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise SpoolError(
                        f"{src_dir} and {dst_dir} are on different file systems or mounts, "
                        f"so {consequence}: mount the whole spool_dir as one file system "
                        f"(not its sub-folders)") from None
                raise
        except OSError as exc:
            raise SpoolError(f"cannot use {src_dir} and {dst_dir}: {exc.strerror}: check "
                             f"their owner and permissions") from None
        finally:
            for leftover in (probe, target):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass


def make_folder(path: Path, mode: int, fs: FS | None = None) -> None:
    """mkdir -p where every folder we create gets exactly `mode` (chmod after
    mkdir: umask-proof) and its parent is fsync'd; existing folders untouched."""
    fs = fs or DEFAULT_FS
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        if os.path.lexists(probe):
            raise SpoolError(f"{probe} exists but is not a folder: move it away")
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for folder in reversed(missing):
        try:
            fs.mkdir(folder, mode)
        except FileExistsError:
            continue
        except OSError as exc:
            raise SpoolError(f"cannot create {folder}: {exc.strerror}: "
                             f"check the permissions of {folder.parent}") from None
        try:
            fs.chmod(folder, mode)
            fs.fsync_dir(folder.parent)
        except OSError as exc:
            raise SpoolError(f"cannot set up {folder}: {exc.strerror}") from None


class LockHandle:
    """An flock held on a lock file (<state_dir>/linkd.lock or <spool_dir>/.linkd.lock)
    until `release()` (or exit)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> LockHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


SPOOL_LOCK = ".linkd.lock"      # a dot-name: never a peer folder (peer names cannot start with '.')


def _take_lock(path: Path, busy: Callable[[str], str]) -> LockHandle:
    """flock `path` (exclusive, non-blocking) and write our pid into it; held by
    another: SpoolError(busy(the holder's pid as its lock file says))."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SpoolError(f"cannot open {path}: {exc.strerror}: check its owner and "
                         f"permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            other = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise SpoolError(busy(other)) from None
    except OSError as exc:
        os.close(fd)
        raise SpoolError(f"cannot lock {path}: {exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return LockHandle(path, fd)


def lock_state_dir(state_dir: Path) -> LockHandle:
    """Take the one-daemon lock (creating state_dir 0700 if missing)."""
    state_dir = Path(state_dir)
    make_folder(state_dir, STATE_MODE)
    return _take_lock(state_dir / "linkd.lock",
                      lambda pid: f"state dir {state_dir} is in use by another linkd "
                                  f"(pid {pid}): stop it first")


def lock_spool_dir(spool_dir: Path) -> LockHandle:
    """Take the one-daemon-per-spool lock, <spool_dir>/.linkd.lock (creating spool_dir
    0750 if missing; `create()` gives it spool_group later). The state-dir lock alone
    let a second daemon with its own state_dir claim from the same out/ into the same
    queue/: files sent twice, claims failed as "missing", the first daemon stuck."""
    spool_dir = Path(spool_dir)
    make_folder(spool_dir, FOLDER_MODE)
    return _take_lock(spool_dir / SPOOL_LOCK,
                      lambda pid: f"another linkd (pid {pid}) already uses the spool "
                                  f"{spool_dir}: two daemons on one spool would send files "
                                  f"twice; give this one its own [node].spool_dir, or stop "
                                  f"the other")
