"""Test support: SIGKILL a linkd process at one exact point of its code.

A daemon started with this folder first on PYTHONPATH imports this module at start-up
(Python's `site` does, before linkd runs). `LINKD_TEST_KILL` names the point:

  audit:<event>    when the audit log is about to record an <event> line (nothing of
                   that line is written)
  committed        when an inbound channel's state file is about to record a new
                   `committed` (a group commit's step 5, spool/inbound.py)

The process dies by SIGKILL as a power cut or the OOM killer would kill it, between
two steps we want to prove crash-safe. Product code knows nothing of this.
"""

from __future__ import annotations

import os
import signal
from typing import Any

_POINT = os.environ.get("LINKD_TEST_KILL", "")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if _POINT.startswith("audit:"):
    from linkd.evidence import audit as _audit

    _event = _POINT.split(":", 1)[1]
    _record = _audit.AuditLog.record

    def _record_or_die(self: Any, event: Any) -> None:
        if event.get("event") == _event:
            _die()
        _record(self, event)

    _audit.AuditLog.record = _record_or_die  # type: ignore[method-assign]

elif _POINT == "committed":
    from linkd.spool import records as _records

    _saved = _records.InState.saved

    def _saved_or_die(self: Any, fs: Any, **changes: Any) -> Any:
        if "committed" in changes and changes["committed"] > self.committed:
            _die()
        return _saved(self, fs, **changes)

    _records.InState.saved = _saved_or_die  # type: ignore[method-assign]
