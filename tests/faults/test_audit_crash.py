"""A receiver killed inside a group commit, or whose commit or audit log fails, still
logs each delivery exactly once, and acknowledges none without its audit line.

Two real daemons; the receiver runs with tests/support/killpoint on PYTHONPATH, which
SIGKILLs it at one exact point of the commit (see that module): when the audit log is
about to take the `message_delivered` line, or when the channel's state file is about
to record the new `committed` (after the line was made durable). Restarted without
the kill point, the receiver must deliver the file once and its audit log (and its
log) must hold exactly one `message_delivered` for it -- not none (the line lost while
the resend is acknowledged from the delivery journal), not two (recovery logging again
what the crashed process had already made durable).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from procs import Daemon, entries, make_pair, start_connected, stop_all, wait_for

KILLPOINT = Path(__file__).resolve().parent.parent / "support" / "killpoint"


def _arm(d: Daemon, point: str) -> None:
    path = os.pathsep.join(p for p in (str(KILLPOINT), os.environ.get("PYTHONPATH")) if p)
    d.env = {"PYTHONPATH": path, "LINKD_TEST_KILL": point}


def _audit(d: Daemon, event: str) -> list[dict[str, Any]]:
    lines = (d.state / "audit" / "audit.jsonl").read_bytes().splitlines()
    return [obj for obj in map(json.loads, lines) if obj.get("event") == event]


def _queued(d: Daemon, peer: str) -> int:
    return sum(int(c["queued"]) for p in d.status()["peers"] if p["name"] == peer
               for c in p["channels"])


@pytest.mark.parametrize("point", ["audit:message_delivered", "committed"])
def test_receiver_killed_inside_a_commit_logs_the_delivery_once(tmp_path: Path,
                                                                 point: str) -> None:
    a, b = make_pair(tmp_path, start=False)
    _arm(b, point)
    try:
        start_connected(a, b)
        data = os.urandom(5000)
        a.drop("bravo", "data", "one.bin", data)
        wait_for(lambda: b.proc is not None and b.proc.poll() is not None, 30,
                 message=lambda: f"the receiver was not killed at {point}\n{b.tail()}")
        assert b.proc is not None and b.proc.returncode in (-9, 137), b.proc.returncode
        b.env = {}
        b.start()
        wait_for(lambda: _queued(a, "bravo") == 0
                 and entries(b.in_dir("alpha", "data")) == ["one.bin"], 60,
                 message=lambda: f"{a.tail(10)}\n{b.tail(10)}")
        sha = hashlib.sha256(data).hexdigest()
        audited = [(e["seq"], e["sha256"]) for e in _audit(b, "message_delivered")]
        assert audited == [(1, sha)]
        logged = [(e["seq"], e["sha256"]) for e in b.events("message_delivered")]
        assert logged == [(1, sha)]
    finally:
        stop_all(a, b)


def test_a_commit_that_fails_after_its_renames_is_logged_once(tmp_path: Path) -> None:
    """The journal append fails (EIO) after the file is in in/: the worker's recovery
    completes the commit; its line must be logged then (it was lost: the next
    session's recovery replaced the list, and the resend was answered from the
    journal)."""
    a, b = make_pair(tmp_path, start=False)
    _arm(b, "eio:journal")
    try:
        start_connected(a, b)
        data = os.urandom(3000)
        a.drop("bravo", "data", "one.bin", data)
        wait_for(lambda: _queued(a, "bravo") == 0
                 and entries(b.in_dir("alpha", "data")) == ["one.bin"], 60,
                 message=lambda: f"{a.tail(10)}\n{b.tail(10)}")
        assert b.events("inbound_storage_failed"), b.tail()
        sha = hashlib.sha256(data).hexdigest()
        assert [(e["seq"], e["sha256"]) for e in _audit(b, "message_delivered")] == [(1, sha)]
        assert [(e["seq"], e.get("recovered")) for e in b.events("message_delivered")] \
            == [(1, True)]
    finally:
        stop_all(a, b)


def test_a_failed_audit_log_refuses_deliveries_and_the_restart_logs_them(
        tmp_path: Path) -> None:
    """The audit log fails (ENOSPC) on the first delivery's line. That file is in in/
    already (recovery completes its commit), but no ack may leave without the line:
    its resend is refused (busy) while the log is failed, not answered from the
    journal, and later files wait behind it; once linkd restarts
    with a working log, the start-up reconciliation logs the first file's line and the
    rest is delivered."""
    a, b = make_pair(tmp_path, start=False)
    _arm(b, "enospc:audit")
    try:
        start_connected(a, b)
        first, second = os.urandom(3000), os.urandom(4000)
        a.drop("bravo", "data", "first.bin", first)
        wait_for(lambda: "first.bin" in entries(b.in_dir("alpha", "data")), 30, message=b.tail)
        a.drop("bravo", "data", "second.bin", second)
        # the resend of the first file is refused (not answered from the journal), and
        # the second waits behind it (in order)
        wait_for(lambda: any(str(e.get("reason")).startswith("the audit log ")
                             for e in b.events("inbound_storage_failed")), 30, message=b.tail)
        assert entries(b.in_dir("alpha", "data")) == ["first.bin"]
        assert a.events("message_sent") == []           # nothing acknowledged
        assert _queued(a, "bravo") == 2
        # the operator sees it plainly: /status and a CRITICAL check on the receiver
        assert "injected ENOSPC" in b.status()["audit"]["failed"]
        check = subprocess.run([sys.executable, "-m", "linkd.cli.linkctl_main", "-s",
                                str(b.socket), "check"], capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 2, check.stdout + check.stderr
        assert check.stdout.startswith("CRITICAL: deliveries refused: the audit log "), \
            check.stdout
        b.stop()
        b.env = {}
        b.start()
        wait_for(lambda: _queued(a, "bravo") == 0, 90,
                 message=lambda: f"{a.tail(10)}\n{b.tail(10)}")
        assert sorted(entries(b.in_dir("alpha", "data"))) == ["first.bin", "second.bin"]
        lines = [(e["seq"], e["sha256"], e.get("recovered"))
                 for e in _audit(b, "message_delivered")]
        assert lines == [(1, hashlib.sha256(first).hexdigest(), True),
                         (2, hashlib.sha256(second).hexdigest(), None)]
        assert b.status()["audit"] == {"failed": None}
    finally:
        stop_all(a, b)


def test_an_audit_log_failed_by_a_full_disk_resumes_without_a_restart(
        tmp_path: Path) -> None:
    """Found in an operator's trial: the spool and the state dir shared a disk that
    filled up; the audit log failed on a delivery's line and every delivery was refused
    until linkd was restarted, long after space was freed. Now the daemon writes again
    once a write fits (every 5 s it tries), logs the lines it owes (the first file,
    already in in/, `recovered`) and goes on, with a chain that still verifies."""
    a, b = make_pair(tmp_path, start=False)
    _arm(b, "enospc:audit:once")
    try:
        start_connected(a, b)
        first, second = os.urandom(3000), os.urandom(4000)
        a.drop("bravo", "data", "first.bin", first)
        wait_for(lambda: b.events("audit_log_failed"), 30, message=b.tail)
        a.drop("bravo", "data", "second.bin", second)
        wait_for(lambda: _queued(a, "bravo") == 0, 60,
                 message=lambda: f"{a.tail(10)}\n{b.tail(10)}")
        assert sorted(entries(b.in_dir("alpha", "data"))) == ["first.bin", "second.bin"]
        assert b.events("audit_log_resumed"), b.tail()
        assert b.running                                    # no restart
        lines = [(e["seq"], e["sha256"], e.get("recovered"))
                 for e in _audit(b, "message_delivered")]
        assert lines == [(1, hashlib.sha256(first).hexdigest(), True),
                         (2, hashlib.sha256(second).hexdigest(), None)]
        assert _audit(b, "audit_resumed") and _audit(b, "audit_torn_tail")
        assert b.status()["audit"] == {"failed": None}
        check = subprocess.run([sys.executable, "-m", "linkd.cli.linkctl_main", "audit",
                                "verify", "--log", str(b.state / "audit" / "audit.jsonl")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        stop_all(a, b)


def test_a_resend_answered_from_the_journal_in_a_batch_that_fails_is_nacked(
        tmp_path: Path) -> None:
    """Two commits fail in a row. The resend of the first file is answered from the
    journal in the same batch as the second file, whose commit fails: that answer
    never leaves, so the busy nack must name the first file, not the second (it named
    the second; the first then waited for an ack that never came, for ever)."""
    a, b = make_pair(tmp_path, start=False)
    _arm(b, "eio:journal:2")
    try:
        start_connected(a, b)
        a.drop("bravo", "data", "f0.bin", os.urandom(3000))
        wait_for(lambda: b.events("inbound_storage_failed"), 30, message=b.tail)
        a.drop("bravo", "data", "f1.bin", os.urandom(3000))
        wait_for(lambda: _queued(a, "bravo") == 0, 30,
                 message=lambda: f"{a.tail(10)}\n{b.tail(10)}")
        assert sorted(entries(b.in_dir("alpha", "data"))) == ["f0.bin", "f1.bin"]
        assert len(b.events("inbound_storage_failed")) == 2
        assert sorted(e["seq"] for e in a.events("message_sent")) == [1, 2]
        assert sorted(e["seq"] for e in _audit(b, "message_delivered")) == [1, 2]
    finally:
        stop_all(a, b)
