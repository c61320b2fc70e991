"""Outbound recovery (outbound.py's theory of operation): rebuild the view of
queue/<ch>/ from disk, finishing whatever a crash cut short, and migrate
revision-1 claims from the state dir. `RecoveryMixin` holds these methods of
Outbound.

Bounded (issue 13): one listing of queue/<ch>/ by name (no stat, no read), then
only the seqs a crash can have left half-done are read record by record -- a
lone .meta or .data, a .fail, and the seqs at or above the checkpoint (`checked`
in the state file: every claim and renumbering below it was complete when it
was written). The seqs below it go into the compact index unread; the first
WINDOW of them are loaded (one .meta each) for the sender. So recovery reads at
most (tail since the checkpoint) + (crash leftovers) + WINDOW records, however
long the queue."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from array import array
from pathlib import Path
from typing import Any

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
from .fs import write_atomic
from .layout import (
    FOLDER_MODE,
    STATE_MODE,
    make_folder,
    plain_name_problem,
)
from .outbound_items import (
    _RECORD,
    _XATTR_NAME,
    READ_SIZE,
    Claimed,
    OutboundState,
    _Pending,
    is_resource_error,
)
from .queue_index import SeqRuns

_NOT_A_SEQ = 1 << 62        # above every seq (MAX_SEQ is 2**53 - 1)


def _is_seq(stem: str) -> bool:
    """The `<seq>` of a queue record name: what _RECORD's group 1 matches."""
    return 0 < len(stem) <= 16 and stem.isascii() and stem.isdigit() and stem[0] != "0"


class RecoveryMixin(OutboundState):
    # -- recovery ----------------------------------------------------------
    def recover(self) -> list[str]:
        """Rebuild the view from disk, finishing whatever a crash cut short."""
        self._ready = False
        problems: list[str] = []
        try:
            self.layout.check(self._state.parent)
            make_folder(self._state.parent, STATE_MODE, self.fs)
            self.next_seq, self.acked, self._saved_next, self._checked = 1, 0, 1, 1
            self._load_state(problems)
            checked_below = self._checked        # the checkpoint
            try:
                self.layout.check(*self._spool_folders())
            except SymlinkedFolder as exc:
                if self._refused != str(exc):
                    problems.append(f"outbound {self.layout.peer}/{self.channel} refused: "
                                    f"{exc}")
                self._refused = str(exc)
                self._pending = _Pending()
                self._rest.clear()
                self._backlog.clear()
                self._not_ready.clear()
                self._ready = True
                return problems
            self._refused = None
            make_folder(self._q, FOLDER_MODE, self.fs)
            make_folder(self._failed, FOLDER_MODE, self.fs)
            self._migrate(problems)
            self._recover_queue(problems, checked_below)
        except OSError as exc:
            raise self._broken("recovery", exc) from None
        self._backlog.clear()
        self._listed.clear()
        self._backlog_bytes = 0
        self._not_ready.clear()
        self._ready = True
        return problems

    def _list_queue(self, problems: list[str]) -> tuple[SeqRuns, SeqRuns, set[int], bool]:
        """One pass over queue/<ch>/ by name (no stat, no read): the seqs that have
        a .data, a .meta, a .fail, and whether a temporary was deleted. 8 bytes a
        record, never a list of names."""
        data, meta = SeqRuns(), SeqRuns()
        fails: set[int] = set()
        changed = False
        with os.scandir(self._q) as it:
            for entry in it:
                name = entry.name
                stem, _, kind = name.partition(".")
                if kind in ("data", "meta", "fail") and _is_seq(stem):
                    if kind == "data":
                        data.add(int(stem))
                    elif kind == "meta":
                        meta.add(int(stem))
                    else:
                        fails.add(int(stem))
                elif name.startswith("."):
                    changed = unlink_quietly(self.fs, self._q / name) or changed  # a temporary
                else:
                    problems.append(f"unknown file {self._q / name} left alone (applications "
                                    f"drop files into out/, never into queue/)")
        return data, meta, fails, changed

    def _recover_queue(self, problems: list[str], checked_below: int) -> None:
        data, meta, fails, changed = self._list_queue(problems)
        with os.scandir(self._failed) as it:
            for entry in it:
                if entry.name.startswith(".") and entry.name.endswith(".reason.tmp"):
                    unlink_quietly(self.fs, self._failed / entry.name)
        self._pending = _Pending()
        rest = self._rest
        rest.clear()
        preload: dict[int, Claimed] = {}        # checked items the window takes first
        bulk = array("q")                       # a run of seqs below the checkpoint
        seen: set[int] = set()                  # seqs of .fail records met on the way
        # Merge the two listings in seq order; a seq below the checkpoint with both
        # records and no .fail is complete: into the index, unread. Anything else is
        # what a crash can have left half-done: checked record by record.
        datas, metas = data.drain(), meta.drain()
        d, m = next(datas, _NOT_A_SEQ), next(metas, _NOT_A_SEQ)
        while d != _NOT_A_SEQ or m != _NOT_A_SEQ:
            seq = min(d, m)
            if d == m and seq < checked_below and seq not in fails:
                bulk.append(seq)
            else:
                if bulk:
                    rest.extend_unmeasured(bulk)
                    bulk = array("q")
                kinds = {k for k, here in (("data", d == seq), ("meta", m == seq),
                                           ("fail", seq in fails)) if here}
                if seq in fails:
                    seen.add(seq)
                changed = self._recover_one(seq, kinds, problems, preload) or changed
            if d == seq:
                d = next(datas, _NOT_A_SEQ)
            if m == seq:
                m = next(metas, _NOT_A_SEQ)
        del datas, metas, data, meta
        rest.extend_unmeasured(bulk)
        del bulk
        for seq in sorted(fails - seen):
            unlink_quietly(self.fs, self._rec(seq, "fail"))     # nothing else left of it
            changed = True
        top = rest.last() or 0
        if top >= self.next_seq:
            self.next_seq = top + 1
        if changed:
            self.fs.fsync_dir(self._q)
        if self.next_seq > self._checked:
            # everything queued is complete now: the next recovery starts from here
            self._save_state()
        self._fill(preload)

    def _recover_one(self, seq: int, kinds: set[str], problems: list[str],
                     preload: dict[int, Claimed]) -> bool:
        """Finish or undo what a crash left of `seq` (outbound.py's crash points);
        a pending item goes into the index. True if a record was changed."""
        meta, rec = self._read_meta_rec(seq) if "meta" in kinds else (None, None)
        if "fail" in kinds:
            fail_rec, _ = read_json(self._rec(seq, "fail"))
            if "data" in kinds:
                name = str((fail_rec or {}).get("name") or (meta.name if meta else
                                                             self._orphan_name(seq)))
                reason = str((fail_rec or {}).get("reason") or "failed (reason lost in a crash)")
                path = place_with_reason(self.fs, self._rec(seq, "data"), self._failed,
                                         name, reason)
                problems.append(f"seq {seq}: finished moving it to {path}")
            for kind in ("meta", "fail"):
                unlink_quietly(self.fs, self._rec(seq, kind))
            return True
        if "data" in kinds and meta is not None:
            source = self._out / meta.name
            if same_file(source, meta.path):
                # a claim by link + unlink (no RENAME_NOREPLACE) cut in between:
                # finish it, or the out/ name would be claimed a second time
                self.fs.unlink(source)
                self.fs.fsync_dir(self._out)
            if meta.ino and os.lstat(meta.path).st_ino != meta.ino:
                meta = self._rehash(meta)   # cut inside a claim that found a swapped file
            old = rec.get("renumbered_from") if rec else None
            changed = False
            if isinstance(old, int) and 0 < old < seq and old in self._rest and \
                    same_file(self._rec(old, "data"), meta.path):
                # a renumbering by link + unlink cut in between: the file is pending
                # under its new seq already (it would otherwise be sent twice)
                self.fs.unlink(self._rec(old, "data"))
                self.fs.unlink(self._rec(old, "meta"))
                self._rest.remove(old)
                preload.pop(old, None)
                changed = True
            self._rest.add(seq, meta.size)
            if len(self._rest) <= self.WINDOW:
                preload[seq] = meta
            return changed
        if "data" in kinds:
            name = self._orphan_name(seq)
            reason = f"its claim record {self._rec(seq, 'meta')} is missing or unreadable"
            unlink_quietly(self.fs, self._rec(seq, "meta"))
            path = place_with_reason(self.fs, self._rec(seq, "data"), self._failed,
                                     name, reason)
            problems.append(f"seq {seq}: {reason}: moved to {path}")
            return True
        self.fs.unlink(self._rec(seq, "meta"))  # a cut claim or renumbering
        return True

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

    def _read_meta(self, seq: int, strict: bool = False) -> Claimed | None:
        """The claim record of `seq`, or None if it is missing or not valid.
        strict=True: a resource error (EMFILE & co) raises instead."""
        return self._read_meta_rec(seq, strict)[0]

    def _read_meta_rec(self, seq: int, strict: bool = False
                       ) -> tuple[Claimed | None, dict[str, Any] | None]:
        path = self._rec(seq, "meta")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                raw = os.read(fd, 1 << 16)
            finally:
                os.close(fd)
        except OSError as exc:
            if strict and is_resource_error(exc):
                raise
            return None, None
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None, None
        if not isinstance(rec, dict) or rec.get("seq") != seq or not is_int(rec.get("size")) \
                or not (is_sha256(rec.get("sha256")) or rec.get("sha256") == "") \
                or not isinstance(rec.get("name"), str) \
                or plain_name_problem(rec["name"]):
            return None, rec if isinstance(rec, dict) else None
        at = rec.get("claimed_at")
        ino, mtime = rec.get("ino", 0), rec.get("mtime_ns", 0)
        return Claimed(self.channel, seq, rec["name"], rec["size"], rec["sha256"],
                       self._rec(seq, "data"), float(at) if isinstance(at, (int, float)) else 0.0,
                       ino if is_int(ino) else 0, mtime if is_int(mtime) else 0), rec

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
        self._save_state(checkpoint=False)      # (the queue is recovered only after this)

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

