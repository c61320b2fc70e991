"""/metrics: a prometheus_client collector over the status board (CONTRACT §6).

prometheus_client writes the exposition (escaping, types, `_total` names) and
adds its standard process_* collector; the board stays plain data. Label
values that come from free text (failure reasons) are first mapped to a small
fixed set (`connect_failure_kind`, `tls_refusal_kind`), so a hostile peer
cannot grow the number of series.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .status import STATES, _parse

if TYPE_CHECKING:
    from .status import StatusBoard


def board_exposition(board: StatusBoard) -> str:
    """The board alone (no process_* metrics), as text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoardCollector(board))
    return generate_latest(registry).decode("utf-8")


def render_metrics(board: StatusBoard) -> bytes:
    """GET /metrics: the board plus prometheus_client's standard process_* metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoardCollector(board))
    ProcessCollector(registry=registry)
    return generate_latest(registry)


def connect_failure_kind(reason: str) -> str:
    """A bounded label for a failed dial (metrics must not grow with free text)."""
    text = reason.lower()
    for needle, kind in (("refused", "refused"), ("timed out", "timeout"),
                         ("no route", "unreachable"), ("unreachable", "unreachable"),
                         ("name or service", "dns"), ("nodename", "dns"),
                         ("temporary failure in name", "dns"), ("reset", "reset"),
                         ("tls", "tls")):
        if needle in text:
            return kind
    return "other"


def tls_refusal_kind(reason: str) -> str:
    """A bounded label for a TLS refusal reason."""
    text = reason.lower()
    for needle, kind in (("revoked", "revoked"), ("expired", "expired"),
                         ("not yet valid", "not_yet_valid"), ("pin", "pin_mismatch"),
                         ("unknown ca", "unknown_ca"), ("unable to get local issuer",
                                                        "unknown_ca"),
                         ("self-signed", "unknown_ca"), ("self signed", "unknown_ca"),
                         ("certificate verify failed", "verify_failed"),
                         ("no configured peer", "unknown_peer"), ("does not name",
                                                                  "unknown_peer"),
                         ("no longer configured", "unknown_peer"), ("timed out", "timeout"),
                         ("post-quantum", "not_post_quantum"), ("post quantum",
                                                                "not_post_quantum"),
                         ("version", "protocol_version"), ("crl", "crl")):
        if needle in text:
            return kind
    return "other"


def _ts(value: dt.datetime | str | None) -> float | None:
    if isinstance(value, str):
        value = _parse(value)
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


class BoardCollector(Collector):
    """A prometheus_client collector that reads the board at scrape time."""

    def __init__(self, board: StatusBoard) -> None:
        self.board = board

    def collect(self) -> Iterable[Metric]:
        board = self.board
        peers = list(board.peers.values())
        chans = [(p, c) for p in peers for c in p.channels.values()]
        build = InfoMetricFamily("linkd_build", "linkd build; the value is always 1.")
        build.add_metric([], {"version": board.version, "node": board.node})
        yield build
        info = GaugeMetricFamily("linkd_info", "linkd build and node; the value is always 1.",
                                 labels=["node", "version"])
        info.add_metric([board.node, board.version], 1)
        yield info
        start = GaugeMetricFamily("linkd_start_time_seconds",
                                  "Start time of the daemon, Unix seconds.")
        start.add_metric([], board.started_at.timestamp())
        yield start
        audit = GaugeMetricFamily("linkd_audit_log_failed",
                                  "1 while the audit log cannot be written (every delivery "
                                  "is refused until it can again: after a full disk, by "
                                  "itself; else after a restart), else 0.")
        audit.add_metric([], 1.0 if board.audit_problem() else 0.0)
        yield audit

        def gauge(name: str, text: str, labels: list[str],
                  rows: Iterable[tuple[list[str], float | None]]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, text, labels=labels)
            for values, value in rows:
                if value is not None:
                    family.add_metric(values, float(value))
            return family

        def counter(name: str, text: str, labels: list[str],
                    rows: Iterable[tuple[list[str], float]]) -> CounterMetricFamily:
            family = CounterMetricFamily(name, text, labels=labels)
            for values, value in rows:
                family.add_metric(values, float(value))
            return family

        yield gauge("linkd_cert_expiry_timestamp_seconds",
                    "When our own TLS certificate expires, Unix seconds.", [],
                    [([], _ts(board.cert_not_after))])
        yield gauge("linkd_crl_expiry_timestamp_seconds",
                    "The CRL's nextUpdate, Unix seconds (only with [tls].crl).", [],
                    [([], _ts(board.crl_next_update))])
        yield gauge("linkd_peer_cert_expiry_timestamp_seconds",
                    "When the peer's certificate (as last seen) expires, Unix seconds.",
                    ["peer"], [([p.name], _ts(p.cert_not_after)) for p in peers])
        yield gauge("linkd_peer_up", "1 when a session with the peer is up.", ["peer"],
                    [([p.name], p.state == "connected") for p in peers])
        yield gauge("linkd_peer_state", "1 for the peer's current link state.",
                    ["peer", "state"],
                    [([p.name, s], p.state == s) for p in peers for s in STATES])
        yield gauge("linkd_peer_down_since_timestamp_seconds",
                    "Start of the current outage, Unix seconds (absent while connected).",
                    ["peer"], [([p.name], _ts(p.down_since)) for p in peers])
        yield gauge("linkd_peer_connect_attempts", "Dials during the current outage.",
                    ["peer"], [([p.name], p.attempts) for p in peers])
        yield gauge("linkd_peer_paused", "1 while sending to the peer is paused.", ["peer"],
                    [([p.name], p.paused) for p in peers])
        yield counter("linkd_peer_reconnects", "Sessions re-established.", ["peer"],
                      [([p.name], p.reconnects) for p in peers])
        yield gauge("linkd_peer_rtt_seconds", "Last measured round-trip time.", ["peer"],
                    [([p.name], None if p.rtt_ms is None else p.rtt_ms / 1000)
                     for p in peers])
        yield counter("linkd_peer_priority_held_seconds",
                      "Time lower-priority channels waited while a higher one had a message "
                      "in flight ([link] priority_hold).", ["peer"],
                      [([p.name], p.priority_held_s) for p in peers])
        yield gauge("linkd_peer_quarantine_files", "Files in quarantine/ now.", ["peer"],
                    [([p.name], p.quarantined) for p in peers])
        yield counter("linkd_connect_failures", "Failed dials, by reason.", ["peer", "reason"],
                      [([peer, reason], n)
                       for (peer, reason), n in sorted(board.connect_failures.items())])
        yield counter("linkd_tls_refusals", "TLS handshakes or sessions refused, by reason.",
                      ["reason"], [([r], n) for r, n in sorted(board.tls_refusals.items())])
        tls = [p for p in peers if p.tls]
        if tls:
            family = InfoMetricFamily("linkd_peer_tls", "The live session's TLS parameters.",
                                      labels=["peer"])
            for p in tls:
                assert p.tls is not None
                pq = p.tls.get("post_quantum")
                family.add_metric([p.name], {
                    "version": str(p.tls.get("version") or ""),
                    "cipher": str(p.tls.get("cipher") or ""),
                    "group": str(p.tls.get("group") or ""),
                    "post_quantum": "" if pq is None else str(bool(pq)).lower()})
            yield family
        labels = ["peer", "channel"]
        for suffix, attr, kind, text in (
                ("queued_messages", "queued", "gauge", "Files waiting or unacknowledged."),
                ("queued_bytes", "queued_bytes", "gauge", "Bytes of the queued files."),
                ("sent_messages", "sent", "counter", "Files the peer acknowledged."),
                ("sent_bytes", "sent_bytes", "counter", "Bytes of acknowledged files."),
                ("received_messages", "received", "counter", "Files delivered to in/."),
                ("received_bytes", "received_bytes", "counter", "Bytes delivered."),
                ("failed_files", "failed", "gauge", "Files in failed/<channel>/ now."),
                ("quarantined_messages", "quarantined", "counter",
                 "Inbound files quarantined.")):
            rows = [([p.name, c.name], getattr(c, attr)) for p, c in chans]
            if kind == "counter":
                yield counter(f"linkd_channel_{suffix}", text, labels, rows)
            else:
                yield gauge(f"linkd_channel_{suffix}", text, labels, rows)
        yield gauge("linkd_channel_oldest_queued_age_seconds",
                    "Age of the oldest queued file (absent when none).", labels,
                    [([p.name, c.name], c.oldest_queued_age_s) for p, c in chans])
        unacked = [(p, c, c.unacked()) for p, c in chans]
        yield gauge("linkd_channel_awaiting_ack_messages",
                    "Files sent whole that the peer has not acknowledged yet.", labels,
                    [([p.name, c.name], u[0]) for p, c, u in unacked])
        yield gauge("linkd_channel_oldest_unacked_age_seconds",
                    "Time since the oldest file awaiting the peer's acknowledgement was "
                    "sent (absent when none).", labels,
                    [([p.name, c.name], u[2]) for p, c, u in unacked])
        yield gauge("linkd_channel_paused", "1 while sending on the channel is paused.",
                    labels, [([p.name, c.name], c.paused or p.paused) for p, c in chans])
        yield gauge("linkd_channel_held", "1 while the channel's files are held.", labels,
                    [([p.name, c.name], c.held is not None) for p, c in chans])
        yield gauge("linkd_channel_inbound_failing",
                    "1 while what arrives on the channel cannot be stored (disk full...).",
                    labels, [([p.name, c.name], getattr(c, "inbound_error", None) is not None)
                             for p, c in chans])


