"""Test support: SIGKILL a linkd process at one exact point of its code.

A daemon started with this folder first on PYTHONPATH imports this module at start-up
(Python's `site` does, before linkd runs). `LINKD_TEST_KILL` names the point:

  audit:<event>    when the audit log is about to record an <event> line (nothing of
                   that line is written)
  committed        when an inbound channel's state file is about to record a new
                   `committed` (a group commit's step 5, spool/inbound.py)

The process dies by SIGKILL as a power cut or the OOM killer would kill it, between
two steps we want to prove crash-safe. Or, instead of a kill, one I/O error:

  eio:journal[:N]  the first (N) appends to a delivery journal raise EIO (a group
                   commit fails after its renames, in a live process)
  enospc:audit     every message_delivered line the audit log writes raises ENOSPC
                   (the audit log fails and stays failed)

Product code knows nothing of this.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Any

_POINT = os.environ.get("LINKD_TEST_KILL", "")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if _POINT.startswith("audit:"):
    from linkd.evidence import audit as _audit

    _event = _POINT.split(":", 1)[1]
    _record_many = _audit.AuditLog.record_many     # record() and batches both end here

    def _record_or_die(self: Any, events: Any) -> None:
        for i, event in enumerate(events):
            if event.get("event") == _event:
                _record_many(self, events[:i])      # the lines before it, then death
                _die()
        _record_many(self, events)

    _audit.AuditLog.record_many = _record_or_die  # type: ignore[method-assign]

elif _POINT == "committed":
    from linkd.spool import records as _records

    _saved = _records.InState.saved

    def _saved_or_die(self: Any, fs: Any, **changes: Any) -> Any:
        if "committed" in changes and changes["committed"] > self.committed:
            _die()
        return _saved(self, fs, **changes)

    _records.InState.saved = _saved_or_die  # type: ignore[method-assign]

elif _POINT.startswith("eio:journal"):
    from linkd.spool import records as _records

    _append = _records.Journal.append
    _failed: list[bool] = []
    _times = int(_POINT.split(":")[2]) if _POINT.count(":") == 2 else 1

    def _append_once(self: Any, fs: Any, entries: Any) -> None:
        # only a group commit's append (recovery's own append is left alone)
        if entries and len(_failed) < _times and sys._getframe(1).f_code.co_name == "commit":
            _failed.append(True)
            raise OSError(errno.EIO, "injected EIO", str(self.path))
        _append(self, fs, entries)

    _records.Journal.append = _append_once  # type: ignore[method-assign]

elif _POINT == "enospc:audit":
    from linkd.evidence import audit as _audit

    _write_lines = _audit.AuditLog._write_lines    # every line written goes through it

    def _write_or_fail(self: Any, lines: Any, last_hash: Any) -> None:
        if any(b'"event":"message_delivered"' in line for line in lines):
            raise OSError(errno.ENOSPC, "injected ENOSPC", str(self.path))
        _write_lines(self, lines, last_hash)

    _audit.AuditLog._write_lines = _write_or_fail  # type: ignore[method-assign]

elif _POINT == "enospc:audit:once":
    # A disk that is full for one write: the first message_delivered line fails inside
    # AuditLog._write_lines's own os.write (as a real ENOSPC does), after half of it
    # went in (a torn fragment); later writes succeed (space freed).
    import types as _types

    from linkd.evidence import audit as _audit

    _real_os = _audit.os
    _done: list[bool] = []

    def _write_once(fd: int, data: Any) -> int:
        if not _done and b'"event":"message_delivered"' in bytes(data):
            _done.append(True)
            _real_os.write(fd, bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "injected ENOSPC (once)")
        return _real_os.write(fd, data)

    _proxy = _types.SimpleNamespace(**{k: getattr(_real_os, k) for k in dir(_real_os)
                                       if not k.startswith("__")})
    _proxy.write = _write_once
    _audit.os = _proxy  # type: ignore[assignment]
