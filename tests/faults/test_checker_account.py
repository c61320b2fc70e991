"""The campaign's accounting (checker.account) itself: a checker that accepts everything
would make the campaign worthless, so each kind of problem is shown to be caught, and
each legitimate outcome (once; twice with duplicate_possible; failed with a reason where
allowed; a ~N name) to be accepted."""

from __future__ import annotations

import hashlib
from pathlib import Path

from checker import Handed, account, scan_failed


def h(name: str, ch: str = "c") -> Handed:
    return Handed(ch, name, hashlib.sha256(name.encode()).hexdigest(), len(name))


def run(handed: list[Handed], inbox: dict[str, str | None], failed=None, sent=(), delivered=(),
        dups=(), may_fail=None, leftover=None):
    sender_events = [{"event": "message_sent", "peer": "bravo", "channel": "c", "name": n,
                      "seq": s, "sha256": sha} for n, s, sha in sent]
    sender_events += [{"event": "duplicate_possible", "peer": "bravo", "channel": "c",
                       "name": n, "seq": s} for n, s in dups]
    receiver_events = [{"event": "message_delivered", "peer": "alpha", "channel": "c",
                        "name": n, "seq": s, "sha256": sha} for n, s, sha in delivered]
    return account(handed, sender="alpha", receiver="bravo", inbox={"c": inbox},
                   failed={"c": failed or {}}, sender_events=sender_events,
                   receiver_events=receiver_events, may_fail=may_fail, leftover=leftover)


def kinds(report) -> list[str]:
    return sorted(p.split(":", 1)[0] for _, p in report.problems)


def test_legitimate_outcomes_are_accepted() -> None:
    a, b, c, d = h("a.bin"), h("b.bin"), h("c.bin"), h("d.bin")
    report = run([a, b, c, d],
                 {"a.bin": a.sha256, "b.bin": b.sha256, "b~1.bin": b.sha256,
                  "c~1.bin": c.sha256},
                 failed={"d.bin": (d.sha256, "over the limit")},
                 sent=[("a.bin", 1, a.sha256)], delivered=[("a.bin", 1, a.sha256)],
                 dups=[("b.bin", 2)], may_fail=lambda x: x.name == "d.bin")
    assert report.valid, report.summary()
    assert (report.once, report.twice_flagged, report.failed_ok) == (2, 1, 1)


def test_every_kind_of_problem_is_caught() -> None:
    lost, dup, trunc, failed, noreason = (h("lost.bin"), h("dup.bin"), h("trunc.bin"),
                                          h("failed.bin"), h("noreason.bin"))
    report = run([lost, dup, trunc, failed, noreason],
                 {"dup.bin": dup.sha256, "dup~1.bin": dup.sha256, "trunc.bin": "00" * 32,
                  ".partial": None},
                 failed={"failed.bin": (failed.sha256, "cannot read it: Too many open files"),
                         "noreason.bin": (noreason.sha256, None)},
                 sent=[("lost.bin", 7, lost.sha256)], delivered=[("lost.bin", 7, "ff" * 32)],
                 leftover=["queue/c/9.data"])
    assert kinds(report) == ["corrupt", "duplicate", "failed-without-reason", "failed-wrongly",
                             "leftover", "lost", "sent-not-delivered", "unexpected"]
    text = report.summary()
    assert "lost.bin" in text and "message_sent" in text     # the trail is shown


def test_three_copies_are_too_many_even_with_duplicate_possible() -> None:
    x = h("x.bin")
    report = run([x], {"x.bin": x.sha256, "x~1.bin": x.sha256, "x~2.bin": x.sha256},
                 dups=[("x.bin", 3)])
    assert kinds(report) == ["duplicate"]


def test_scan_failed_pairs_files_with_reasons(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "n.reason").write_bytes(b"payload")            # a failed file named N.reason
    (folder / "n.reason.reason").write_text("too big\n")
    (folder / "n").write_bytes(b"other")
    (folder / "n~1").write_bytes(b"third")                   # no reason beside it
    found = scan_failed(tmp_path, ["c"])["c"]
    assert found["n.reason"] == (hashlib.sha256(b"payload").hexdigest(), "too big")
    assert found["n"] == (hashlib.sha256(b"other").hexdigest(), None)
    assert found["n~1"][1] is None
    assert "n.reason.reason" not in found
