"""structlog set-up: one event per line on stderr, JSON or console.

JSON when stderr is not a terminal (journald, files, the acceptance tests),
coloured key=value when it is; `--log-format` overrides. Events carry an ISO
8601 UTC `timestamp` and a `level`. The message events are the audit trail:
their names and fields are fixed by CONTRACT §10.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(fmt: str | None = None, level: str = "info") -> None:
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    processors: list[Any] = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _audit,     # the tamper-evident audit log (linkd/evidence/audit.py)
            structlog.processors.format_exc_info if fmt == "json" else _noop,
            renderer,
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _audit(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    from .evidence.audit import sink
    sink(event)
    return event


def _noop(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event


def get(**bind: Any) -> Any:
    return structlog.get_logger("linkd").bind(**bind)
