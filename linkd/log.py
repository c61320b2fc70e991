"""structlog set-up: one event per line on stderr, JSON or console.

JSON when stderr is not a terminal (journald, files, the acceptance tests),
coloured key=value when it is; `--log-format` overrides. Events carry an ISO
8601 UTC `timestamp`, a `level` and the `node` name. The message events are
the audit trail: their names and fields are fixed by CONTRACT §10.

journald (CONTRACT §8): systemd sets `$JOURNAL_STREAM` to "DEV:INO" of the
stream it connected to stderr. When that matches our stderr, each line starts
with its syslog priority ("<4>" for a warning), which journald strips and
records, so `journalctl -p warning` finds warnings. A stderr redirected
elsewhere (the variable inherited but stale) gets no prefix.

Observers see every event that passes the level filter, before it is
rendered; the daemon uses one to count TLS refusals by reason for /metrics,
so the metric and the audit log cannot disagree.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")
# syslog priorities (sd-daemon.h): SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7
PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4,
            "info": 6, "debug": 7}

Observer = Callable[[dict[str, Any]], None]
_observers: list[Observer] = []
_node: str | None = None


def journald_stream(stream: Any = None) -> bool:
    """Whether `stream` (stderr by default) is the one systemd connected to journald."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = expected.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure(fmt: str | None = None, level: str = "info", node: str | None = None) -> None:
    """(Re)configure logging. `node` is added to every event that lacks one."""
    global _node
    if node is not None:
        _node = node
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    if journald_stream():
        renderer = _Prioritised(renderer)
    processors: list[Any] = [
            structlog.contextvars.merge_contextvars,
            _add_node,
            structlog.processors.add_log_level,
            _notify_observers,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _audit,     # the tamper-evident audit log (linkd/evidence/audit.py)
            _LevelFilter(level),    # after the audit log: log_level never hides evidence
            structlog.processors.format_exc_info if fmt == "json" else _noop,
            renderer,
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class _Prioritised:
    """Wraps a renderer: "<N>" + the rendered line, N the event's syslog priority."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> str:
        level = str(event.get("level") or name).lower()
        text = self.inner(logger, name, event)
        return f"<{PRIORITY.get(level, 6)}>{text}"


def _add_node(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    if _node is not None:
        event.setdefault("node", _node)
    return event


def _notify_observers(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    for observer in list(_observers):
        try:
            observer(event)
        except Exception:  # noqa: BLE001 - an observer bug must not cost the log line
            pass
    return event


def add_observer(observer: Observer) -> Callable[[], None]:
    """Call `observer(event_dict)` for every logged event; returns the remover."""
    _observers.append(observer)
    return lambda: _observers.remove(observer) if observer in _observers else None


class _LevelFilter:
    """Drops events below `[node] log_level` from stderr, after the audit log saw them."""

    def __init__(self, level: str) -> None:
        self.minimum = getattr(logging, level.upper(), logging.INFO)

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
        level = str(event.get("level") or name).upper()
        if getattr(logging, level, logging.INFO) < self.minimum:
            raise structlog.DropEvent
        return event


def _audit(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    from .evidence.audit import sink
    sink(event)
    return event


def _noop(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event


def get(**bind: Any) -> Any:
    return structlog.get_logger("linkd").bind(**bind)
