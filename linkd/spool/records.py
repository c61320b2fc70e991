"""The receiver's small durable records: the state file and the delivery journal.

Theory of operation
-------------------
`InState` is the in-memory copy of `<state>/peers/<peer>/channels/<ch>/in.json`
({committed, intent, partial}); `InState.saved()` writes a new version
atomically (tmp + fsync + rename + fsync folder) and only then returns it, so
what `Inbound` holds in memory is never ahead of the disk. A corrupt file is
moved aside and `committed` salvaged from its text (`load_state`).

`Journal` is `delivered.jsonl` beside it: one JSON line per committed message
{seq, sha256, size, sent_name, name, delivered_at}, appended and fsync'd in
the group commit before `committed` moves. It lets the receiver answer a
re-sent message at or below `committed` with what it holds under that seq
(an ack naming the content), so that a sender whose numbering went wrong
(state lost or restored) can tell "delivered" from "something else". It keeps
the newest KEEP entries (rewritten atomically when twice that many lines
accumulate), in memory only where each one's line starts (read back on a
lookup); a torn last line (crash or failed write mid-append) is ignored (the
next append starts on a new line, so it never swallows a good entry), and a seq
logged twice (a commit redone by recovery) keeps its last line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from .files import dump_json, is_int, is_sha256, move_aside, read_json, unlink_quietly
from .fs import FS, write_atomic
from .layout import plain_name_problem

KEEP = 4096


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
                or not is_int(ck.get("size")) \
                or not (is_sha256(ck.get("sha256")) or ck.get("sha256") == "") \
                or not is_int(ck.get("offset")) or ck["offset"] > ck["size"]:
            return "partial is malformed"
    return None


def load_state(fs: FS, path: Path, channel: str, problems: list[str],
               legacy: Path | None = None) -> InState:
    """Read the state file; a corrupt one is moved aside (see the module docstring).
    `legacy` is revision 1's place for it, moved here the first time."""
    if legacy is not None and not os.path.lexists(path) and os.path.isfile(legacy) \
            and not os.path.islink(legacy):
        fs.rename(legacy, path)
        fs.fsync_dir(path.parent)
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


class Journal:
    """The receiver's recent deliveries of one channel (see the module docstring).

    Only where each entry's line starts is kept in memory (`index`: seq -> byte
    offset, the newest KEEP seqs): an entry is read back from the file when a
    re-send or a probe asks for it, which is rare, in a worker thread. Holding the
    parsed entries cost ~1 KiB each, up to 4 MiB per channel that has received
    KEEP messages: a hub of 200 such peers would have kept 800 MiB."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lines = 0

    def load(self, fs: FS, problems: list[str]) -> None:
        self.index.clear()
        self._lines = 0
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as f:
            offset = 0
            for raw in f:
                self._lines += 1
                entry = _entry(raw)
                if entry is not None:
                    self.index.pop(entry["seq"], None)
                    self.index[entry["seq"]] = offset
                offset += len(raw)
        self._trim()

    def _trim(self) -> None:
        while len(self.index) > KEEP:
            self.index.popitem(last=False)

    def lookup(self, seq: int) -> dict[str, Any] | None:
        """The entry of `seq`, if the journal still holds it (None if the file is
        gone; OSError if it cannot be read: the batch fails and is retried)."""
        offset = self.index.get(seq)
        if offset is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None         # removed behind our back: we cannot say
        try:
            raw = os.pread(fd, LINE_MAX, offset)
        finally:
            os.close(fd)
        entry = _entry(raw.split(b"\n", 1)[0])
        return entry if entry is not None and entry["seq"] == seq else None

    def entries(self) -> list[dict[str, Any]]:
        """Every entry the journal holds, oldest first (blocking: reads the file)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for seq, offset in self.index.items():
            entry = _entry(_line_at(data, offset))
            if entry is not None and entry["seq"] == seq:
                out.append(entry)
        return out

    def append(self, fs: FS, entries: list[dict[str, Any]]) -> None:
        """Append and fsync (the caller's commit then records `committed`)."""
        if not entries:
            return
        lines = [dump_json(e) for e in entries]
        fd = fs.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW)
        try:
            # where this write lands, and whether the file ends inside a line (a crash
            # mid-append): then end that line first, or it swallows our first entry
            size = os.fstat(fd).st_size
            head = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
            fs.write(fd, head + b"".join(lines))
            fs.fsync(fd)
        finally:
            fs.close(fd)
        offset = size + len(head)
        for e, line in zip(entries, lines, strict=True):
            self.index.pop(e["seq"], None)
            self.index[e["seq"]] = offset
            offset += len(line)
        self._lines += len(entries) + (1 if head else 0)
        self._trim()
        if self._lines > 2 * KEEP:
            self._compact(fs)

    def _compact(self, fs: FS) -> None:
        """Rewrite the file with only the entries the index holds (their lines as
        they are), atomically."""
        data = self.path.read_bytes()
        kept: list[bytes] = []
        index: collections.OrderedDict[int, int] = collections.OrderedDict()
        offset = 0
        for seq, at in self.index.items():
            line = _line_at(data, at)
            line = line if line.endswith(b"\n") else line + b"\n"
            kept.append(line)
            index[seq] = offset
            offset += len(line)
        write_atomic(fs, self.path, b"".join(kept))
        self.index = index
        self._lines = len(kept)


LINE_MAX = 8192     # a journal line is < 1 KiB (two names of <= 255 bytes, a SHA-256)


def _line_at(data: bytes, offset: int) -> bytes:
    """The line of `data` that starts at `offset`, with its newline if it has one."""
    end = data.find(b"\n", offset)
    return data[offset:] if end < 0 else data[offset:end + 1]


def _entry(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None             # a torn line
    if isinstance(entry, dict) and is_int(entry.get("seq"), 1) \
            and is_sha256(entry.get("sha256")):
        return entry
    return None
