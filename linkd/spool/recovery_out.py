"""Outbound recovery (outbound.py's theory of operation): rebuild the view of
queue/<ch>/ from disk, finishing whatever a crash cut short, and migrate
revision-1 claims from the state dir. `RecoveryMixin` holds these methods of
Outbound."""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FileChanged as FileChanged  # re-exported
from ..errors import ResourceBusy as ResourceBusy
from ..errors import SpoolError as SpoolError
from ..errors import SymlinkedFolder
from .files import (
    dump_json,
    is_int,
    is_sha256,
    listdir,
    place_with_reason,
    read_json,
    same_file,
    unlink_quietly,
)
from .fs import FS, write_atomic
from .layout import (
    FOLDER_MODE,
    STATE_MODE,
    SpoolLayout,
    make_folder,
    plain_name_problem,
)
from .outbound_items import (
    _RECORD,
    _XATTR_NAME,
    READ_SIZE,
    Claimed,
    _Pending,
)


class RecoveryMixin:
    # The Outbound state these methods use (set by Outbound.__init__; typed seam).
    layout: SpoolLayout
    channel: str
    fs: FS
    max_bytes: int
    archive_sent: bool
    next_seq: int
    acked: int
    _out: Path
    _q: Path
    _failed: Path
    _state: Path
    _pending: _Pending
    _listed: dict[str, int]
    _backlog_bytes: int
    _backlog: deque[str]
    _not_ready: dict[str, float]
    _ready: bool
    _refused: str | None
    _saved_next: int

    if TYPE_CHECKING:
        def _require(self) -> None: ...
        def _check(self, *folders: Path) -> None: ...
        def _spool_folders(self) -> list[Path]: ...
        def _broken(self, what: str, exc: OSError) -> SpoolError: ...
        def _rec(self, seq: int, kind: str) -> Path: ...
        def _save_state(self) -> None: ...
        def _load_state(self, problems: list[str]) -> None: ...
        def _rehash(self, item: Claimed) -> Claimed: ...

    # -- recovery ----------------------------------------------------------
    def recover(self) -> list[str]:
        """Rebuild the view from disk, finishing whatever a crash cut short."""
        self._ready = False
        problems: list[str] = []
        try:
            self.layout.check(self._state.parent)
            make_folder(self._state.parent, STATE_MODE, self.fs)
            self.next_seq, self.acked, self._saved_next = 1, 0, 1
            self._load_state(problems)
            try:
                self.layout.check(*self._spool_folders())
            except SymlinkedFolder as exc:
                if self._refused != str(exc):
                    problems.append(f"outbound {self.layout.peer}/{self.channel} refused: "
                                    f"{exc}")
                self._refused = str(exc)
                self._pending = _Pending()
                self._backlog.clear()
                self._not_ready.clear()
                self._ready = True
                return problems
            self._refused = None
            make_folder(self._q, FOLDER_MODE, self.fs)
            make_folder(self._failed, FOLDER_MODE, self.fs)
            self._migrate(problems)
            self._recover_queue(problems)
        except OSError as exc:
            raise self._broken("recovery", exc) from None
        self._backlog.clear()
        self._listed.clear()
        self._backlog_bytes = 0
        self._not_ready.clear()
        self._ready = True
        return problems

    def _recover_queue(self, problems: list[str]) -> None:
        groups: dict[int, set[str]] = {}
        changed = False
        for name in listdir(self._q):
            match = _RECORD.fullmatch(name)
            if match:
                groups.setdefault(int(match[1]), set()).add(match[2])
            elif name.startswith("."):
                changed = unlink_quietly(self.fs, self._q / name) or changed  # a temporary
            else:
                problems.append(f"unknown file {self._q / name} left alone (applications "
                                f"drop files into out/, never into queue/)")
        for name in listdir(self._failed):
            if name.startswith(".") and name.endswith(".reason.tmp"):
                unlink_quietly(self.fs, self._failed / name)
        self._pending = _Pending()
        for seq in sorted(groups):
            kinds = groups[seq]
            meta = self._read_meta(seq) if "meta" in kinds else None
            if "fail" in kinds:
                rec, _ = read_json(self._rec(seq, "fail"))
                if "data" in kinds:
                    name = str((rec or {}).get("name") or (meta.name if meta else
                                                            self._orphan_name(seq)))
                    reason = str((rec or {}).get("reason") or "failed (reason lost in a crash)")
                    path = place_with_reason(self.fs, self._rec(seq, "data"), self._failed,
                                             name, reason)
                    problems.append(f"seq {seq}: finished moving it to {path}")
                for kind in ("meta", "fail"):
                    unlink_quietly(self.fs, self._rec(seq, kind))
                changed = True
            elif "data" in kinds and meta is not None:
                source = self._out / meta.name
                if same_file(source, meta.path):
                    # a claim by link + unlink (no RENAME_NOREPLACE) cut in between:
                    # finish it, or the out/ name would be claimed a second time
                    self.fs.unlink(source)
                    self.fs.fsync_dir(self._out)
                if meta.ino and os.lstat(meta.path).st_ino != meta.ino:
                    meta = self._rehash(meta)   # cut inside a claim that found a swapped file
                self._pending[seq] = meta
                # A claim cut inside the link+unlink fallback of rename_noreplace leaves
                # the file under both names: drop the out/ one, or it is claimed twice.
                if os.path.lexists(self._out / meta.name) and \
                        same_file(self._out / meta.name, meta.path):
                    self.fs.unlink(self._out / meta.name)
                    problems.append(f"seq {seq}: finished claiming {meta.name!r} (a cut "
                                    f"link+unlink left it in out/ too)")
            elif "data" in kinds:
                name = self._orphan_name(seq)
                reason = f"its claim record {self._rec(seq, 'meta')} is missing or unreadable"
                unlink_quietly(self.fs, self._rec(seq, "meta"))
                path = place_with_reason(self.fs, self._rec(seq, "data"), self._failed,
                                         name, reason)
                problems.append(f"seq {seq}: {reason}: moved to {path}")
                changed = True
            else:
                self.fs.unlink(self._rec(seq, "meta"))  # a cut claim or renumbering
                changed = True
        inodes: dict[tuple[int, int], int] = {}
        for seq in sorted(self._pending, reverse=True):
            st = os.lstat(self._rec(seq, "data"))
            newer = inodes.setdefault((st.st_dev, st.st_ino), seq)
            if newer != seq:
                # a renumbering by link + unlink cut in between: the file is pending
                # under its new seq already (it would otherwise be sent twice)
                self.fs.unlink(self._rec(seq, "data"))
                self.fs.unlink(self._rec(seq, "meta"))
                del self._pending[seq]
                changed = True
        top = max(self._pending, default=0)
        if top >= self.next_seq:
            self.next_seq = top + 1
        if changed:
            self.fs.fsync_dir(self._q)

    def _orphan_name(self, seq: int) -> str:
        """The original name of a queued file whose .meta is lost (kept in an
        extended attribute where the file system has them), else `seq-<N>`."""
        try:
            raw = os.getxattr(self._rec(seq, "data"), _XATTR_NAME, follow_symlinks=False)
            name = raw.decode("utf-8")
            if plain_name_problem(name) is None:
                return name
        except (OSError, UnicodeDecodeError):
            pass
        return f"seq-{seq}"

    def _read_meta(self, seq: int) -> Claimed | None:
        rec, _ = read_json(self._rec(seq, "meta"))
        if rec is None or rec.get("seq") != seq or not is_int(rec.get("size")) \
                or not is_sha256(rec.get("sha256")) or not isinstance(rec.get("name"), str) \
                or plain_name_problem(rec["name"]):
            return None
        at = rec.get("claimed_at")
        ino, mtime = rec.get("ino", 0), rec.get("mtime_ns", 0)
        return Claimed(self.channel, seq, rec["name"], rec["size"], rec["sha256"],
                       self._rec(seq, "data"), float(at) if isinstance(at, (int, float)) else 0.0,
                       ino if is_int(ino) else 0, mtime if is_int(mtime) else 0)

    def _meta_bytes(self, item: Claimed, **extra: Any) -> bytes:
        return dump_json({"seq": item.seq, "name": item.name, "size": item.size,
                          "sha256": item.sha256, "claimed_at": item.claimed_at,
                          "ino": item.ino, "mtime_ns": item.mtime_ns, **extra})

    def _migrate(self, problems: list[str]) -> None:
        """Move revision 1 claims (`<state>/peers/<peer>/out/<ch>/`) into queue/."""
        old = self.layout.legacy_claimed_dir(self.channel)
        if not os.path.isdir(old) or os.path.islink(old):
            return
        legacy_state = self.layout.legacy_state_file_out(self.channel)
        rec, _ = read_json(legacy_state)
        last_done = int(rec["last_done"]) if rec and is_int(rec.get("last_done")) else 0
        seqs: dict[int, set[str]] = {}
        for name in listdir(old):
            match = re.fullmatch(r"(\d{1,20})\.(meta|data|fail)", name)
            if match:
                seqs.setdefault(int(match[1]), set()).add(match[2])
        top = max(self._pending_seqs_on_disk(), default=0)
        self.next_seq = max(self.next_seq, last_done + 1, top + 1)
        moved: dict[int, int] = {}      # revision 1 seq -> queue seq, of a cut migration
        for name in listdir(self._q):
            match = _RECORD.fullmatch(name)
            if match and match[2] == "meta":
                rec, _ = read_json(self._q / name)
                if rec is not None and is_int(rec.get("migrated_from"), 1):
                    moved[int(rec["migrated_from"])] = int(match[1])
        for seq in sorted(seqs):
            kinds = seqs[seq]
            src_data, src_meta = old / f"{seq:012d}.data", old / f"{seq:012d}.meta"
            if "data" not in kinds:
                continue
            if seq in moved:            # a migration cut after its claim record
                if os.path.lexists(self._rec(moved[seq], "data")):
                    self.fs.unlink(src_data)    # copied (or linked) already
                else:
                    self._move_across(src_data, self._rec(moved[seq], "data"))
                continue
            meta, _ = read_json(src_meta)
            name = str((meta or {}).get("name") or f"seq-{seq}")
            if plain_name_problem(name):
                name = f"seq-{seq}"
            if "fail" in kinds or seq <= last_done or meta is None:
                if seq <= last_done and "fail" not in kinds:
                    self.fs.unlink(src_data)        # acknowledged under revision 1
                    continue
                place_with_reason(self.fs, src_data, self._failed, name,
                                  "claim record missing or failed before the upgrade")
                continue
            new = self.next_seq
            self.next_seq += 1
            item = Claimed(self.channel, new, name, int(meta.get("size", 0)),
                           str(meta.get("sha256", "")), self._rec(new, "data"), time.time())
            write_atomic(self.fs, self._rec(new, "meta"),
                         self._meta_bytes(item, migrated_from=seq))
            self._move_across(src_data, item.path)
            problems.append(f"migrated claimed file {name!r} (seq {seq}) into {self._q} as "
                            f"seq {new}")
        shutil.rmtree(old, ignore_errors=True)
        for leftover in (legacy_state,):
            unlink_quietly(self.fs, leftover)
        self._save_state()

    def _pending_seqs_on_disk(self) -> list[int]:
        return [int(m[1]) for m in map(_RECORD.fullmatch, listdir(self._q)) if m]

    def _move_across(self, src: Path, dst: Path) -> None:
        """rename, or (state dir on another mount) copy + fsync + unlink."""
        try:
            self.fs.rename_noreplace(src, dst)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        tmp = dst.with_name(f".{dst.name}.tmp")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, READ_SIZE)
            fout.flush()
            os.fsync(fout.fileno())
        self.fs.rename(tmp, dst)
        self.fs.fsync_dir(dst.parent)
        self.fs.unlink(src)

