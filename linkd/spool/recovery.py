"""The inbound state file and the recovery passes of both directions.

Theory of operation
-------------------
`InState` is the in-memory copy of `<state>/peers/<peer>/in/<ch>.json`;
`InState.saved()` writes a new version atomically (tmp + fsync + rename + fsync
folder) and only then returns it, so what `Inbound` holds in memory is never
ahead of the disk.

`recover_inbound` runs at start-up and at every session start (it is cheap
when there is nothing to do: one small read and one listdir). In order:

1. Redo an interrupted commit: for each intent entry, if its partial still
   exists, chmod + fsync it and rename it into in/<ch>/ (first free name; if
   the same inode is already there under the intended name -- a cut
   link+unlink fallback -- just drop the partial's name). Then fsync in/<ch>/
   and record committed = max(seq), intent = null. A crash anywhere in here
   leaves the intent on disk, so the next recovery does the rest; entries
   already renamed are simply found gone. They are all reported as delivered.
2. Validate the checkpoint: dropped when at or below committed, or when its file
   is missing or shorter than the recorded offset; otherwise the file is
   truncated to the offset (bytes beyond it were never made durable) and fsync'd.
3. Delete this channel's stray partials (`<ch>.<seq>.part` that are neither the
   checkpointed one nor in an intent -- finished-but-uncommitted messages and
   unsynced starts): their seqs were never acknowledged, so they are resent.
4. Save the state if anything changed (or if the previous commit failed: the
   durability of its last steps is unknown, so they are re-done).

`recover_outbound` (crash points in outbound.py): reads last_done (a corrupt
file is moved aside and last_done salvaged from its text), deletes dot-file
temporaries, then per seq: with a .fail record, finishes moving its .data to
failed/ (tombstone); <= last_done, finishes the acknowledgement (delete or
archive the .data); .meta + .data, pending; .data alone, failed ("claim record
missing") so that start-up is never blocked; .meta alone above every .data,
deleted (a cut claim: the file is still in out/); .meta alone below one, kept
as a skipped number. Then last_done advances over the resolved numbers. Each
step is idempotent, so a crash during recovery is recovered the same way.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import (
    dump_json,
    is_int,
    is_sha256,
    listdir,
    move_aside,
    place_noreplace,
    place_with_reason,
    read_json,
    unlink_quietly,
)
from .fs import FS, fsync_file, write_atomic
from .layout import plain_name_problem

_RECORD = re.compile(r"(\d{12})\.(meta|data|fail)")   # outbound claim records

if TYPE_CHECKING:
    from .inbound import Delivered, Inbound
    from .outbound import Claimed, Outbound


@dataclasses.dataclass(frozen=True)
class InState:
    path: Path
    committed: int = 0
    intent: list[list[Any]] | None = None
    partial: dict[str, Any] | None = None

    def saved(self, fs: FS, **changes: Any) -> InState:
        new = dataclasses.replace(self, **changes)
        write_atomic(fs, new.path, dump_json({"committed": new.committed,
                                              "intent": new.intent,
                                              "partial": new.partial}))
        return new


def _problem(record: dict[str, Any], channel: str) -> str | None:
    if not is_int(record.get("committed")):
        return "committed is not a non-negative integer"
    intent = record.get("intent")
    if intent is not None:
        if not isinstance(intent, list) or not intent:
            return "intent is not a non-empty list"
        for entry in intent:
            if not (isinstance(entry, list) and len(entry) == 6):
                return "an intent entry is not [seq, partial, final, sent_name, size, sha256]"
            seq, part, final, sent, size, sha = entry
            if not is_int(seq, 1) or part != f"{channel}.{seq}.part" \
                    or not isinstance(final, str) or plain_name_problem(final) \
                    or not isinstance(sent, str) or plain_name_problem(sent) \
                    or not is_int(size) or not is_sha256(sha):
                return f"intent entry {entry!r} is malformed"
    ck = record.get("partial")
    if ck is not None:
        if not isinstance(ck, dict) or not is_int(ck.get("seq"), 1) \
                or not isinstance(ck.get("name"), str) or plain_name_problem(ck["name"]) \
                or not is_int(ck.get("size")) or not is_sha256(ck.get("sha256")) \
                or not is_int(ck.get("offset")) or ck["offset"] > ck["size"]:
            return "partial is malformed"
    return None


def load_state(fs: FS, path: Path, channel: str, problems: list[str]) -> InState:
    """Read the state file; a corrupt one is moved aside (see inbound.py)."""
    tmp = path.with_name(f".{path.name}.tmp")
    record, problem = read_json(path)
    state = InState(path)
    if record is not None:
        problem = _problem(record, channel)
        if problem is None:
            state = InState(path, record["committed"], record.get("intent"),
                            record.get("partial"))
    if problem is not None:
        evidence = []
        for source in (path, tmp):
            try:
                text = source.read_bytes().decode("utf-8", "replace")
            except OSError:
                continue
            evidence += [int(n) for n in re.findall(r'"committed"\s*:\s*(\d+)', text)]
        committed = max(evidence, default=0)
        aside = move_aside(fs, path)
        problems.append(f"{path} was unusable ({problem}); moved to {aside}; committed falls "
                        f"back to {committed}: messages committed but not yet acknowledged "
                        f"may be delivered twice")
        state = InState(path, committed)
        state = state.saved(fs)
    if os.path.lexists(tmp):
        unlink_quietly(fs, tmp)
    return state


def recover_inbound(ib: Inbound, problems: list[str]) -> list[Delivered]:
    """The recovery pass of the module docstring; returns completed deliveries."""
    from .inbound import Delivered

    fs, st, in_dir, tmp = ib.fs, ib._st, ib._in, ib._tmp
    unreported = {d.seq: d for d in ib._unreported}
    recovered: list[Delivered] = []
    dirty = bool(unreported)
    if st.intent:
        for seq, part, final, sent, size, sha in sorted(st.intent):
            src = tmp / part
            if os.path.lexists(src):
                fsync_file(fs, src, ib.file_mode)
                path = place_noreplace(fs, src, in_dir, sent, preferred=final)
                problems.append(f"seq {seq}: finished delivering it as {path}")
            else:
                path = unreported[seq].path if seq in unreported else in_dir / final
            recovered.append(Delivered(ib.channel, seq, path.name, sent, size, sha, path))
        fs.fsync_dir(in_dir)
        st = dataclasses.replace(st, committed=max(st.committed, *(e[0] for e in st.intent)),
                                 intent=None)
        dirty = True
    elif unreported:
        fs.fsync_dir(in_dir)
        recovered = [unreported[s] for s in sorted(unreported) if s <= st.committed]
    ck = st.partial
    if ck is not None:
        partial = tmp / f"{ib.channel}.{ck['seq']}.part"
        try:
            size = os.lstat(partial).st_size
        except FileNotFoundError:
            size = -1
        if ck["seq"] <= st.committed or size < ck["offset"]:
            if ck["seq"] > st.committed:
                problems.append(f"seq {ck['seq']}: partial file missing or shorter than its "
                                f"checkpoint ({ck['offset']} bytes): it will be sent again")
            st, dirty = dataclasses.replace(st, partial=None), True
        elif size > ck["offset"]:
            fd = fs.open(partial, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                fs.truncate(fd, ck["offset"])
                fs.fsync(fd)
            finally:
                fs.close(fd)
    keep = st.partial["seq"] if st.partial else None
    stray = re.compile(re.escape(ib.channel) + r"\.(\d+)\.part")
    removed = False
    for name in listdir(tmp):
        match = stray.fullmatch(name)
        if match and int(match[1]) != keep:
            removed = unlink_quietly(fs, tmp / name) or removed
    if removed:
        fs.fsync_dir(tmp)
    ib._st = st.saved(fs) if dirty else st
    return recovered


def recover_outbound(ob: Outbound, problems: list[str]) -> None:
    """The outbound recovery pass (see outbound.py); rebuilds `ob`'s view."""
    ob.last_done = _load_last_done(ob, problems)
    groups: dict[int, set[str]] = {}
    changed = False
    for name in listdir(ob._claimed):
        match = _RECORD.fullmatch(name)
        if match:
            groups.setdefault(int(match[1]), set()).add(match[2])
        elif name.startswith("."):
            changed = unlink_quietly(ob.fs, ob._claimed / name) or changed  # a temporary
        else:
            problems.append(f"unknown file {ob._claimed / name} left alone")
    for name in listdir(ob._failed):
        if name.startswith(".") and name.endswith(".reason.tmp"):
            unlink_quietly(ob.fs, ob._failed / name)
    top_data = max((s for s, k in groups.items() if k & {"data", "fail"}), default=0)
    ob._pending, ob._tombstones = {}, set()
    for seq in sorted(groups):
        kinds = set(groups[seq])
        meta = _read_meta(ob, seq) if "meta" in kinds else None
        if "fail" in kinds:
            if "data" in kinds:
                rec, _ = read_json(ob._rec(seq, "fail"))
                name = str((rec or {}).get("name") or (meta.name if meta else
                                                        f"{seq:012d}.data"))
                reason = str((rec or {}).get("reason") or "failed (reason lost in a crash)")
                path = place_with_reason(ob.fs, ob._rec(seq, "data"), ob._failed,
                                         name, reason)
                problems.append(f"seq {seq}: finished moving it to {path}")
            ob._tombstones.add(seq)
        elif seq <= ob.last_done:
            if "data" in kinds:
                ob._dispose(seq, meta.name if meta else f"{seq:012d}.data")
                problems.append(f"seq {seq}: was acknowledged; finished removing it")
            ob._tombstones.add(seq)
        elif "data" in kinds and meta is not None:
            ob._pending[seq] = meta
        elif "data" in kinds:
            reason = f"its claim record {ob._rec(seq, 'meta')} is missing or unreadable"
            write_atomic(ob.fs, ob._rec(seq, "fail"),
                         dump_json({"seq": seq, "name": f"{seq:012d}.data",
                                    "reason": reason}))
            path = place_with_reason(ob.fs, ob._rec(seq, "data"), ob._failed,
                                     f"{seq:012d}.data", reason)
            problems.append(f"seq {seq}: {reason}: moved to {path}")
            ob._tombstones.add(seq)
        elif seq < top_data:
            problems.append(f"seq {seq}: claim record without its file below seq "
                            f"{top_data}: number skipped")
            ob._tombstones.add(seq)
        else:
            ob.fs.unlink(ob._rec(seq, "meta"))  # claim cut short: file still in out/
            del groups[seq]
            changed = True
    ob._high = max([ob.last_done, *groups])
    ob._advance(0)
    if problems or changed:
        ob.fs.fsync_dir(ob._claimed)


def _load_last_done(ob: Outbound, problems: list[str]) -> int:
    record, problem = read_json(ob._state)
    if record is None and problem is None:
        return 0
    if record is not None and is_int(record.get("last_done")):
        return int(record["last_done"])
    try:
        raw = ob._state.read_bytes().decode("utf-8", "replace")
    except OSError:
        raw = ""
    found = re.findall(r'"last_done"\s*:\s*(\d+)', raw)
    salvaged = max((int(n) for n in found), default=0)
    aside = move_aside(ob.fs, ob._state)
    problems.append(f"{ob._state} was unusable ({problem or 'bad last_done'}); moved to "
                    f"{aside}; last_done falls back to {salvaged}: the daemon must ack() "
                    f"the peer's committed seq before sending")
    return salvaged


def _read_meta(ob: Outbound, seq: int) -> Claimed | None:
    from .outbound import Claimed

    rec, _ = read_json(ob._rec(seq, "meta"))
    if rec is None or rec.get("seq") != seq or not is_int(rec.get("size")) \
            or not is_sha256(rec.get("sha256")) or not isinstance(rec.get("name"), str) \
            or plain_name_problem(rec["name"]):
        return None
    at = rec.get("claimed_at")
    return Claimed(ob.channel, seq, rec["name"], rec["size"], rec["sha256"],
                   ob._rec(seq, "data"), float(at) if isinstance(at, (int, float)) else 0.0)
