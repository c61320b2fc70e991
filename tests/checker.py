"""A Jepsen-style total-queue checker for spool deliveries.

Jepsen's total-queue checker compares what was enqueued with what was
dequeued and reports lost, duplicated and unexpected elements. Here an
element is one dropped file, identified per channel by its (unique) name and
its SHA-256:

* **lost**       - dropped (renamed into out/), never delivered;
* **duplicated** - delivered more than once (the extra copies carry `~N`,
                   since a name in in/ is never overwritten);
* **unexpected** - something in in/ that was never dropped (a partial, a
                   dot-file, a name nobody sent);
* **corrupt**    - delivered under a dropped name, with different bytes.

`check_events` checks the receiver's audit trail: per channel, the
`message_delivered` seqs come in increasing order, none twice, and (when the
expected files are given) each names a dropped file with its digest; the
delivered names, in seq order, follow pick-up (drop) order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

def untilde(name: str) -> str | None:
    """The name a `~N` copy was made from (the inverse of linkd.spool.layout.tilde_name
    for names that were not cut to fit 255 bytes), or None if `name` has no such tag."""
    dot = name.find(".", 1)
    stem, ext = (name, "") if dot < 0 else (name[:dot], name[dot:])
    match = re.fullmatch(r"(.+)~[1-9][0-9]*", stem)
    if match is None:
        return None
    return match[1] + ext


@dataclasses.dataclass
class QueueReport:
    attempted: int = 0
    delivered_ok: int = 0
    lost: list[str] = dataclasses.field(default_factory=list)
    duplicated: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    corrupt: list[str] = dataclasses.field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected or self.corrupt)

    def summary(self) -> str:
        def few(items: list[str]) -> str:
            return f"{len(items)} {items[:10]}{' ...' if len(items) > 10 else ''}"
        return (f"attempted={self.attempted} delivered_ok={self.delivered_ok} "
                f"lost={few(self.lost)} duplicated={few(self.duplicated)} "
                f"unexpected={few(self.unexpected)} corrupt={few(self.corrupt)}")


def check_queue(expected: dict[str, dict[str, str]],
                observed: dict[str, dict[str, str | None]]) -> QueueReport:
    """`expected[channel][name] = sha256` of every dropped file;
    `observed[channel][entry] = sha256` of every entry found in in/<channel>/ (None for
    something that is not a regular file). Items are reported as "channel/name"."""
    report = QueueReport(attempted=sum(len(v) for v in expected.values()))
    for channel in sorted(set(expected) | set(observed)):
        want = expected.get(channel, {})
        copies: dict[str, list[str | None]] = defaultdict(list)
        for entry, sha in sorted(observed.get(channel, {}).items()):
            if entry in want:
                copies[entry].append(sha)
                continue
            base = untilde(entry)
            if base is not None and base in want and sha is not None:
                copies[base].append(sha)
            else:
                report.unexpected.append(f"{channel}/{entry}")
        for name, sha in sorted(want.items()):
            got = copies.get(name, [])
            if not got:
                report.lost.append(f"{channel}/{name}")
                continue
            if len(got) > 1:
                report.duplicated.append(f"{channel}/{name} x{len(got)}")
            if any(g != sha for g in got):
                report.corrupt.append(f"{channel}/{name}")
            elif len(got) == 1:
                report.delivered_ok += 1
    return report


def scan_inbox(in_root: Path, channels: list[str]) -> dict[str, dict[str, str | None]]:
    """observed[channel][entry] = sha256 (None for a non-regular file) of in/<ch>/."""
    observed: dict[str, dict[str, str | None]] = {}
    for channel in channels:
        folder = in_root / channel
        found: dict[str, str | None] = {}
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            names = []
        for entry in names:
            path = folder / entry
            if path.is_symlink() or not path.is_file():
                found[entry] = None
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            found[entry] = digest.hexdigest()
        observed[channel] = found
    return observed


@dataclasses.dataclass
class EventReport:
    events: int = 0
    out_of_order: list[str] = dataclasses.field(default_factory=list)
    repeated_seqs: list[str] = dataclasses.field(default_factory=list)
    wrong: list[str] = dataclasses.field(default_factory=list)      # unknown name / digest
    order_violations: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)    # delivered, no event

    @property
    def valid(self) -> bool:
        return not (self.out_of_order or self.repeated_seqs or self.wrong
                    or self.order_violations)

    def summary(self) -> str:
        return (f"events={self.events} out_of_order={self.out_of_order[:10]} "
                f"repeated_seqs={self.repeated_seqs[:10]} wrong={self.wrong[:10]} "
                f"order_violations={self.order_violations[:10]} "
                f"missing={len(self.missing)} {self.missing[:10]}")


def check_events(delivered: list[dict[str, Any]],
                 expected: dict[str, dict[str, str]] | None = None,
                 drop_order: dict[str, list[str]] | None = None) -> EventReport:
    """`delivered`: the receiver's message_delivered events in log order.
    `drop_order[channel]` lists the names in the order they were dropped."""
    report = EventReport(events=len(delivered))
    last: dict[str, int] = {}
    seen: Counter[tuple[str, int]] = Counter()
    names_by_seq: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for ev in delivered:
        ch, seq = ev.get("channel"), ev.get("seq")
        if not isinstance(ch, str) or not isinstance(seq, int):
            report.wrong.append(f"event without channel/seq: {ev}")
            continue
        seen[(ch, seq)] += 1
        if seen[(ch, seq)] > 1:
            report.repeated_seqs.append(f"{ch}/{seq}")
        if ch in last and seq <= last[ch]:
            report.out_of_order.append(f"{ch}: seq {seq} after {last[ch]}")
        last[ch] = max(seq, last.get(ch, 0))
        sent_name = ev.get("sent_name", ev.get("name"))
        names_by_seq[ch].append((seq, str(sent_name)))
        if expected is not None:
            want = expected.get(ch, {}).get(str(sent_name))
            if want is None:
                report.wrong.append(f"{ch}/{sent_name} (seq {seq}) was never dropped")
            elif ev.get("sha256") != want:
                report.wrong.append(f"{ch}/{sent_name} (seq {seq}) has sha256 "
                                    f"{ev.get('sha256')}, dropped {want}")
    if drop_order is not None:
        for ch, order in drop_order.items():
            rank = {name: i for i, name in enumerate(order)}
            got = [name for _, name in sorted(names_by_seq.get(ch, []))]
            ranks = [rank[n] for n in got if n in rank]
            for before, after in zip(ranks, ranks[1:]):
                if after <= before:
                    report.order_violations.append(
                        f"{ch}: {order[after]} delivered after {order[before]}")
            logged = set(got)
            report.missing += [f"{ch}/{n}" for n in order if n not in logged]
    return report
