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
accumulate); a torn last line (crash mid-append) is ignored (the next append
starts on a new line, so it never swallows a good entry), and a seq logged
twice (a commit redone by recovery) keeps its last line.
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
                or not is_int(ck.get("size")) or not is_sha256(ck.get("sha256")) \
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
    """The receiver's recent deliveries of one channel (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._lines = 0
        self._torn = False      # the file ends inside a line (a crash mid-append)

    def load(self, fs: FS, problems: list[str]) -> None:
        self.entries.clear()
        self._lines, self._torn = 0, False
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as f:
            for raw in f:
                self._lines += 1
                self._torn = not raw.endswith(b"\n")
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue            # a torn last line
                if isinstance(entry, dict) and is_int(entry.get("seq"), 1) \
                        and is_sha256(entry.get("sha256")):
                    self.entries.pop(entry["seq"], None)
                    self.entries[entry["seq"]] = entry
        while len(self.entries) > KEEP:
            self.entries.popitem(last=False)

    def lookup(self, seq: int) -> dict[str, Any] | None:
        return self.entries.get(seq)

    def append(self, fs: FS, entries: list[dict[str, Any]]) -> None:
        """Append and fsync (the caller's commit then records `committed`)."""
        if not entries:
            return
        data = b"".join(dump_json(e) for e in entries)
        if self._torn:          # end the torn line first, or it swallows our first entry
            data = b"\n" + data
        fd = fs.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW)
        try:
            fs.write(fd, data)
            fs.fsync(fd)
        finally:
            fs.close(fd)
        self._torn = False
        for e in entries:
            self.entries.pop(e["seq"], None)
            self.entries[e["seq"]] = e
        self._lines += len(entries)
        while len(self.entries) > KEEP:
            self.entries.popitem(last=False)
        if self._lines > 2 * KEEP:
            write_atomic(fs, self.path, b"".join(dump_json(e) for e in self.entries.values()))
            self._lines = len(self.entries)
