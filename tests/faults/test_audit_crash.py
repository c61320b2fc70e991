"""A receiver killed inside a group commit still logs each delivery exactly once.

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
