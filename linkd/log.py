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

Rate limits (CONTRACT §5): `RateLimiter` is one processor, after the
observers (metrics count every refusal) and before rendering. Each kind of
event from one source (the remote IP address, else the peer) may log a
burst of `BURST` lines, then one line per `1/RATE` seconds; what it drops
is counted and reported by `flush_suppressed()` (the daemon calls it every
few seconds) as one `log_suppressed` line per `SUMMARY_INTERVAL` with the
counts. Audit events (message_*, duplicate_possible, link_up/down and the
daemon's own start/stop/reload lines) are never suppressed.

Observers see every event that passes the level filter, before it is
rendered; the daemon uses one to count TLS refusals by reason for /metrics,
so the metric and the audit log cannot disagree.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

# syslog priorities (sd-daemon.h): SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7
PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4,
            "info": 6, "debug": 7}

Observer = Callable[[Mapping[str, object]], None]
_observers: list[Observer] = []
_node: str | None = None


def journald_stream(stream: TextIO | None = None) -> bool:
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
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    if journald_stream():
        renderer = _Prioritised(renderer)
    processors: list[Processor] = [
            structlog.contextvars.merge_contextvars,
            _add_node,
            structlog.processors.add_log_level,
            _notify_observers,
            limiter,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _audit,     # the tamper-evident audit log (linkd/evidence/audit.py)
            _LevelFilter(level),    # after the audit log: log_level never hides evidence
            structlog.processors.format_exc_info if fmt == "json" else _noop,
            renderer,
        ]
    stream = sys.stderr
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=lambda *args: LineWriter(stream),
        cache_logger_on_first_use=False,
    )


class LineWriter:
    """structlog's output: each line (and each batch of `info_many`) in one write,
    under one lock per stream. (structlog's PrintLogger writes a line and its
    newline separately, so a batch written between the two would split a line.)"""

    _locks: dict[int, threading.Lock] = {}
    _locks_lock = threading.Lock()

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        with self._locks_lock:
            self.lock = self._locks.setdefault(id(stream), threading.Lock())

    def write_lines(self, lines: list[str]) -> None:
        text = "\n".join(lines) + "\n"
        with self.lock:
            self.stream.write(text)
            self.stream.flush()

    def msg(self, message: str) -> None:
        self.write_lines([message])

    log = debug = info = warn = warning = error = err = critical = exception = fatal = \
        failure = msg


def info_many(logger: FilteringBoundLogger, event: str,
              rows: Iterable[Mapping[str, object]]) -> None:
    """`logger.info(event, **row)` for each row, in one go: the same processors give
    the same lines (observers, rate limits, level filter and all), with one timestamp
    for the batch; the audit log gets the batch's lines in one write, stderr its
    lines in another. For the per-message audit events logged a batch at a time (a
    claim's `message_queued` lines, an ack's `message_sent` lines, a commit's
    `message_delivered` lines): ~30 -> ~17 µs of CPU a line here, signed audit log."""
    rows = list(rows)
    processors = getattr(logger, "_processors", None)
    wrapped = getattr(logger, "_logger", None)
    if not isinstance(wrapped, LineWriter) or not processors or len(rows) < 2:
        for row in rows:
            logger.info(event, **row)
        return
    from .evidence.audit import sink_many
    context = structlog.get_context(logger)
    stamp, stamp_key = "", "timestamp"
    # what each processor but the renderer (the last) is here: 0 run it, 1 the audit
    # log (gathered for one write), 2 the time stamper (one stamp for the batch)
    steps: list[tuple[int, Callable[[WrappedLogger, str, EventDict], EventDict]]] = []
    for proc in processors[:-1]:
        if proc is _audit:
            steps.append((1, _audit))
        elif isinstance(proc, structlog.processors.TimeStamper):
            stamp_key = str(getattr(proc, "key", "timestamp"))
            stamp = str(proc(wrapped, "info", {})[stamp_key])
            steps.append((2, proc))
        else:
            steps.append((0, cast(Callable[[WrappedLogger, str, EventDict], EventDict], proc)))
    render = processors[-1]
    audited: list[Mapping[str, object]] = []
    lines: list[str] = []
    try:
        for row in rows:
            out: EventDict = context.copy()
            out.update(row)
            out["event"] = event
            try:
                for kind, proc in steps:
                    if kind == 0:
                        out = proc(wrapped, "info", out)
                    elif kind == 1:
                        audited.append(dict(out))
                    else:
                        out[stamp_key] = stamp
                line = render(wrapped, "info", out)
            except structlog.DropEvent:
                continue
            lines.append(line if isinstance(line, str) else str(line))
    finally:
        # what was gathered is written even if a processor raised for a later row
        # (one by one, the earlier lines would have been): then the error goes on
        try:
            sink_many(audited)
        finally:
            if lines:
                wrapped.write_lines(lines)


class _Prioritised:
    """Wraps a renderer: "<N>" + the rendered line, N the event's syslog priority."""

    def __init__(self, inner: Processor) -> None:
        self.inner = inner

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> str:
        level = str(event.get("level") or name).lower()
        text = self.inner(logger, name, event)     # str from both renderers configured here
        return f"<{PRIORITY.get(level, 6)}>{text!s}"


def _add_node(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    if _node is not None:
        event.setdefault("node", _node)
    return event


def _notify_observers(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
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

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        level = str(event.get("level") or name).upper()
        if getattr(logging, level, logging.INFO) < self.minimum:
            raise structlog.DropEvent
        return event


def _audit(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    from .evidence.audit import sink
    sink(event)
    return event


# Never suppressed: the audit trail (CONTRACT §8, §10) and the daemon's own life events.
AUDIT_PREFIXES = ("message_",)
AUDIT_EVENTS = frozenset({
    "duplicate_possible", "link_up", "link_down", "log_suppressed", "link_still_down",
    "started", "stopping", "stopped", "reloaded", "reload_failed", "cert_expiring",
    "listen_changed", "crl_expired", "session_revoked"})


def is_audit(event: str) -> bool:
    return event in AUDIT_EVENTS or event.startswith(AUDIT_PREFIXES)


class RateLimiter:
    """A token bucket per (event, source); see the module docstring."""

    BURST = 10.0                # lines a (kind, source) may log at once
    RATE = 0.5                  # then lines per second
    SUMMARY_INTERVAL = 10.0     # at most one log_suppressed line this often
    MAX_KEYS = 4096             # beyond this, new sources share one bucket per kind
    SHOWN = 20                  # (kind, source) pairs listed in one summary

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._dropped: dict[tuple[str, str], int] = {}
        self._last_summary = clock()
        self._pruned_at = -1e9
        self._lock = threading.Lock()    # events come from worker threads too

    @staticmethod
    def source(event: Mapping[str, object]) -> str:
        remote = event.get("remote")
        if isinstance(remote, str) and remote not in ("", "?"):
            return remote.rsplit(":", 1)[0].strip("[]") if ":" in remote else remote
        peer = event.get("peer")
        return str(peer) if peer is not None else ""

    def allow(self, event: Mapping[str, object]) -> bool:
        kind = str(event.get("event", ""))
        if is_audit(kind):
            return True
        key = (kind, self.source(event))
        now = self.clock()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= self.MAX_KEYS:
                if now - self._pruned_at >= 1.0:     # O(keys): at most once a second
                    self._pruned_at = now
                    self._prune(now)
                if len(self._buckets) >= self.MAX_KEYS:
                    key = (kind, "*")
            tokens, at = self._buckets.get(key, (self.BURST, now))
            tokens = min(self.BURST, tokens + (now - at) * self.RATE)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return True
            self._buckets[key] = (tokens, now)
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False

    def _prune(self, now: float) -> None:
        """Forget buckets that are full again (nothing to remember about them)."""
        full = [k for k, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self.RATE >= self.BURST and k not in self._dropped]
        for k in full:
            del self._buckets[k]

    def summary(self, force: bool = False) -> dict[str, object] | None:
        """The fields of a log_suppressed line, if one is due (and anything was dropped)."""
        now = self.clock()
        with self._lock:
            if not self._dropped or (not force and
                                     now - self._last_summary < self.SUMMARY_INTERVAL):
                return None
            dropped, self._dropped = self._dropped, {}
            window = now - self._last_summary
            self._last_summary = now
            self._prune(now)
        top = sorted(dropped.items(), key=lambda kv: -kv[1])
        return {"total": sum(dropped.values()), "window_s": round(window, 1),
                "counts": [{"event": k[0], "source": k[1], "count": n}
                           for k, n in top[:self.SHOWN]],
                "kinds_not_shown": max(0, len(top) - self.SHOWN),
                "reason": "repeated events were rate-limited (at most "
                          f"{self.BURST:g} at once, then {self.RATE:g}/s per kind and source)"}

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        if self.allow(event):
            return event
        raise structlog.DropEvent


limiter = RateLimiter()


def flush_suppressed(force: bool = False) -> None:
    """Log one `log_suppressed` summary if events were dropped (at most one per
    SUMMARY_INTERVAL unless `force`, e.g. at shutdown)."""
    fields = limiter.summary(force)
    if fields is not None:
        get().warning("log_suppressed", **fields)


def _noop(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    return event


def get(**bind: object) -> FilteringBoundLogger:
    logger: FilteringBoundLogger = structlog.get_logger("linkd")
    return logger.bind(**bind)
