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
            for before, after in zip(ranks, ranks[1:], strict=False):
                if after <= before:
                    report.order_violations.append(
                        f"{ch}: {order[after]} delivered after {order[before]}")
            logged = set(got)
            report.missing += [f"{ch}/{n}" for n in order if n not in logged]
    return report


# ---------------------------------------------------------------------------------------
# Accounting for every file handed over (issue 7: operator faults, state loss)
# ---------------------------------------------------------------------------------------

TRAIL_EVENTS = ("message_queued", "message_sent", "message_delivered", "message_failed",
                "message_quarantined", "message_changed", "duplicate_possible",
                "message_retry")


@dataclasses.dataclass(frozen=True)
class Handed:
    """One file handed over to the sender (renamed or written into out/<channel>/)."""
    channel: str
    name: str
    sha256: str
    size: int


@dataclasses.dataclass
class AccountReport:
    handed: int = 0
    once: int = 0                   # exactly one copy in in/
    twice_flagged: int = 0          # two copies and a duplicate_possible naming the file
    failed_ok: int = 0              # in failed/ with a reason, legitimately
    problems: list[tuple[Handed | None, str]] = dataclasses.field(default_factory=list)
    trails: dict[tuple[str, str], list[str]] = dataclasses.field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.problems

    def summary(self, limit: int = 3) -> str:
        """Counts, then up to `limit` problems of each kind, each with its event trail on
        both nodes (what the lead needs to see why a file is unaccounted for)."""
        lines = [f"handed={self.handed} once={self.once} twice_flagged={self.twice_flagged} "
                 f"failed_ok={self.failed_ok} problems={len(self.problems)}"]
        by_kind: dict[str, list[tuple[Handed | None, str]]] = defaultdict(list)
        for handed, problem in self.problems:
            by_kind[problem.split(":", 1)[0]].append((handed, problem))
        if by_kind:
            lines.append("by kind: " + ", ".join(f"{k} x{len(v)}" for k, v in by_kind.items()))
        for kind, items in by_kind.items():
            for handed, problem in items[:limit]:
                lines.append(f"- {problem}")
                if handed is not None:
                    trail = self.trails.get((handed.channel, handed.name), [])
                    lines += [f"      {t}" for t in trail[:10]]
                    if not trail:
                        lines.append("      (no events name it on either side)")
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more {kind}")
        return "\n".join(lines)


FailedScan = dict[str, dict[str, tuple[str, str | None]]]


def scan_failed(failed_root: Path, channels: list[str]) -> FailedScan:
    """found[channel][entry] = (sha256, reason line or None) for every regular file in
    failed/<channel>/ that is not the `.reason` of another entry there (`X.reason` beside
    `X` is X's reason, unless `X.reason.reason` exists too: then it is a failed file)."""
    found: dict[str, dict[str, tuple[str, str | None]]] = {}
    for channel in channels:
        folder = failed_root / channel
        try:
            names = set(os.listdir(folder))
        except FileNotFoundError:
            names = set()
        here: dict[str, tuple[str, str | None]] = {}
        for entry in sorted(names):
            if (entry.endswith(".reason") and entry[:-len(".reason")] in names
                    and entry + ".reason" not in names):
                continue                  # the reason of another entry (not a failed file)
            path = folder / entry
            if path.is_symlink() or not path.is_file():
                continue
            reason = None
            if entry + ".reason" in names and entry + ".reason.reason" not in names:
                try:
                    reason = (folder / (entry + ".reason")).read_text(errors="replace").strip()
                except OSError:
                    reason = None
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            here[entry] = (digest.hexdigest(), reason)
        found[channel] = here
    return found


def _trail_line(node: str, ev: dict[str, Any]) -> str:
    keys = ("channel", "seq", "name", "sent_name", "size", "reason", "timestamp")
    parts = [f"{k}={str(ev[k])[:60]}" for k in keys if k in ev]
    sha = ev.get("sha256")
    if isinstance(sha, str):
        parts.append(f"sha256={sha[:12]}")
    return f"{node:6s} {ev.get('event')}: " + " ".join(parts)


def account(handed: list[Handed], *, sender: str, receiver: str,
            inbox: dict[str, dict[str, str | None]],
            failed: FailedScan,
            sender_events: list[dict[str, Any]], receiver_events: list[dict[str, Any]],
            may_fail: Any = None, leftover: list[str] | None = None,
            quarantined: list[str] | None = None) -> AccountReport:
    """Account for every file handed to `sender` for `receiver`.

    `inbox` is scan_inbox() of the receiver's in/, `failed` scan_failed() of the sender's
    failed/; events are every JSON line of each daemon's log (Daemon.all_events()).
    A file is accounted for when it is, by content (SHA-256) and sent name (a `~N`
    copy counts for its name):
      * exactly once in in/, and not in failed/;
      * twice in in/, and the sender logged `duplicate_possible` naming it (name, seq);
      * not in in/, in failed/ beside a `.reason`, and `may_fail(handed)` is true.
    Also: every `message_sent` of the sender (channel, seq, sha256) has a matching
    `message_delivered` on the receiver; nothing unexpected in in/ (partials, dot-files,
    names nobody handed over); nothing `leftover` (out/ and queue/ must be empty)."""
    may_fail = may_fail or (lambda h: False)
    report = AccountReport(handed=len(handed))
    wanted: dict[str, dict[str, Handed]] = defaultdict(dict)
    for h in handed:
        wanted[h.channel][h.name] = h

    # Each node's trail of events, by (channel, sent name).
    def index(node: str, events: list[dict[str, Any]], peer: str) -> None:
        for ev in events:
            if ev.get("event") not in TRAIL_EVENTS or ev.get("peer") not in (peer, None):
                continue
            ch = ev.get("channel")
            for key in ("sent_name", "name"):
                name = ev.get(key)
                if isinstance(ch, str) and isinstance(name, str) and name in wanted.get(ch, {}):
                    report.trails.setdefault((ch, name), []).append(_trail_line(node, ev))
                    break
    index(sender, sender_events, receiver)
    index(receiver, receiver_events, sender)

    def base_of(channel: str, entry: str) -> str | None:
        if entry in wanted.get(channel, {}):
            return entry
        base = untilde(entry)
        return base if base is not None and base in wanted.get(channel, {}) else None

    copies: dict[tuple[str, str], list[str | None]] = defaultdict(list)
    for channel, found in sorted(inbox.items()):
        for entry, sha in sorted(found.items()):
            base = base_of(channel, entry)
            if base is None:
                report.problems.append((None, f"unexpected: in/{channel}/{entry} was never "
                                              f"handed over (a partial? a stray name?)"))
            else:
                copies[(channel, base)].append(sha)
    failures: dict[tuple[str, str], list[tuple[str, str | None, str]]] = defaultdict(list)
    for channel, found_failed in sorted(failed.items()):
        for entry, (sha, reason) in sorted(found_failed.items()):
            base = base_of(channel, entry)
            if base is None:
                report.problems.append((None, f"unexpected: failed/{channel}/{entry} was "
                                              f"never handed over"))
            else:
                failures[(channel, base)].append((sha, reason, entry))

    duplicates: dict[tuple[Any, str], list[dict[str, Any]]] = defaultdict(list)
    for ev in sender_events:
        if ev.get("event") == "duplicate_possible" and ev.get("peer") in (receiver, None):
            duplicates[(ev.get("channel"), str(ev.get("name")))].append(ev)

    for h in handed:
        key = (h.channel, h.name)
        got = copies.get(key, [])
        good = sum(1 for sha in got if sha == h.sha256)
        bad = len(got) - good
        fails = failures.get(key, [])
        good_fails = [f for f in fails if f[0] == h.sha256]
        dup = [e for e in duplicates.get((h.channel, h.name), [])
               + duplicates.get((None, h.name), []) if isinstance(e.get("seq"), int)]
        where = f"{h.channel}/{h.name} ({h.size} B, sha256 {h.sha256[:12]})"
        if bad:
            report.problems.append((h, f"corrupt: {where}: {bad} cop{'y' if bad == 1 else 'ies'}"
                                       f" in in/ with other bytes (truncated or mixed?)"))
        if len(fails) > len(good_fails):
            report.problems.append((h, f"corrupt: {where}: in failed/ with other bytes"))
        if good == 1 and not good_fails:
            report.once += 1
        elif good == 2 and not good_fails:
            if dup:
                report.twice_flagged += 1
            else:
                report.problems.append((h, f"duplicate: {where} is twice in in/ and the "
                                           f"sender logged no duplicate_possible naming it"))
        elif good > 2:
            report.problems.append((h, f"duplicate: {where} is {good} times in in/"))
        elif good == 0 and good_fails:
            sha, reason, entry = good_fails[0]
            if len(good_fails) > 1:
                report.problems.append((h, f"duplicate: {where} is {len(good_fails)} times "
                                           f"in failed/"))
            elif reason is None:
                report.problems.append((h, f"failed-without-reason: {where} is in "
                                           f"failed/{h.channel}/{entry} with no .reason"))
            elif not may_fail(h):
                report.problems.append((h, f"failed-wrongly: {where} went to failed/ but "
                                           f"nothing allowed that: {reason}"))
            else:
                report.failed_ok += 1
        elif good >= 1 and good_fails:
            if not dup:
                report.problems.append((h, f"duplicate: {where} is both in in/ ({good}x) and "
                                           f"in failed/, no duplicate_possible"))
            elif not may_fail(h):
                report.problems.append((h, f"failed-wrongly: {where} is in in/ and in "
                                           f"failed/: {good_fails[0][1]}"))
            else:
                report.twice_flagged += 1
        elif good == 0 and not bad:
            report.problems.append((h, f"lost: {where} is neither in in/ nor in failed/"))

    delivered = {(ev.get("channel"), ev.get("seq"), ev.get("sha256"))
                 for ev in receiver_events
                 if ev.get("event") == "message_delivered" and ev.get("peer") in (sender, None)}
    for ev in sender_events:
        if ev.get("event") != "message_sent" or ev.get("peer") not in (receiver, None):
            continue
        key3 = (ev.get("channel"), ev.get("seq"), ev.get("sha256"))
        if key3 not in delivered:
            h = wanted.get(str(ev.get("channel")), {}).get(str(ev.get("name")))
            report.problems.append((h, f"sent-not-delivered: message_sent {ev.get('channel')}/"
                                       f"{ev.get('name')} seq {ev.get('seq')} sha256 "
                                       f"{str(ev.get('sha256'))[:12]} has no message_delivered "
                                       f"with that seq and sha256 on {receiver}"))
    for item in leftover or []:
        report.problems.append((None, f"leftover: {item} is still waiting on {sender}"))
    for item in quarantined or []:
        report.problems.append((None, f"quarantined: {item} on {receiver}"))
    return report
