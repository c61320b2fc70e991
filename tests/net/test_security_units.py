"""Unit tests for the flood defences: the log rate limiter and the admission gate."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from linkd import log as logmod
from linkd.net.admission import Gate, Limits, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(ip: str, port: int = 5555) -> dict[str, Any]:
    return {"event": "tls_refused", "remote": f"{ip}:{port}", "reason": "x"}


def test_limiter_bounds_one_source_and_reports_counts() -> None:
    clock = Clock()
    rl = logmod.RateLimiter(clock)
    passed = sum(rl.allow(refusal("10.0.0.1", p)) for p in range(10_000))
    assert passed == rl.BURST
    # another source and another kind are not affected
    assert rl.allow(refusal("10.0.0.2"))
    assert rl.allow({"event": "protocol_violation", "peer": "b", "reason": "r"})
    assert rl.summary() is None                     # not due yet
    clock.now += rl.SUMMARY_INTERVAL
    s = rl.summary()
    assert s is not None and s["total"] == 10_000 - rl.BURST
    assert s["counts"] == [{"event": "tls_refused", "source": "10.0.0.1",
                            "count": 10_000 - rl.BURST}]
    assert rl.summary(force=True) is None           # counts reset after a summary
    # the bucket refills at RATE
    clock.now += 4 / rl.RATE
    assert sum(rl.allow(refusal("10.0.0.1")) for _ in range(100)) >= 4


def test_limiter_never_suppresses_audit_events() -> None:
    rl = logmod.RateLimiter(Clock())
    for name in ("message_delivered", "message_sent", "message_failed", "duplicate_possible",
                 "link_up", "link_down"):
        assert all(rl.allow({"event": name, "peer": "b"}) for _ in range(1000)), name


def test_limiter_keys_are_bounded() -> None:
    rl = logmod.RateLimiter(Clock())
    for i in range(rl.MAX_KEYS + 500):
        for _ in range(int(rl.BURST) + 1):
            rl.allow(refusal(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"))
    assert len(rl._buckets) <= rl.MAX_KEYS + 1


def test_limiter_drops_through_structlog() -> None:
    rl = logmod.RateLimiter(Clock())
    for _ in range(int(rl.BURST)):
        assert rl(None, "warning", refusal("10.0.0.9")) is not None
    with pytest.raises(structlog.DropEvent):
        rl(None, "warning", refusal("10.0.0.9"))


def test_limits_from_descriptor_limit() -> None:
    small = Limits.from_nofile(1024)
    assert small.total + small.reserve < 1024 // 2 + small.reserve     # well below the limit
    assert small.reserve >= 256 and 2 <= small.per_source < small.total
    big = Limits.from_nofile(65536)
    assert big.total == 1024 and big.per_source == 32
    tiny = Limits.from_nofile(64)
    assert tiny.total >= 4 and tiny.per_source >= 2


def test_gate_counts_total_and_per_source() -> None:
    gate = Gate(Limits(nofile=100, reserve=10, total=5, per_source=2))
    a1, a2 = gate.admit("a"), gate.admit("a")
    assert isinstance(a1, Ticket) and isinstance(a2, Ticket)
    assert "from a" in str(gate.admit("a"))
    tickets = [gate.admit(s) for s in ("b", "c", "d")]
    assert all(isinstance(t, Ticket) for t in tickets)
    assert "too many unauthenticated connections (5" in str(gate.admit("e"))
    a1.release()
    a1.release()                     # idempotent
    assert gate.count == 4 and gate.by_source["a"] == 1
    assert isinstance(gate.admit("a"), Ticket)
    assert gate.refused == 2


def _cert_naming(*names: str) -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


def test_certificate_naming_several_peers_is_refused() -> None:
    from linkd.config import PeerConfig
    from linkd.net.tls import IdentityError, identify

    alpha, charlie = PeerConfig("alpha"), PeerConfig("charlie")
    assert identify(_cert_naming("alpha"), [alpha, charlie]).peer is alpha
    with pytest.raises(IdentityError, match="several configured peers.*alpha, charlie"):
        identify(_cert_naming("alpha", "charlie"), [alpha, charlie])
    # the dialler checks against every configured peer too, not only the dialled one
    with pytest.raises(IdentityError, match="ambiguous"):
        identify(_cert_naming("alpha", "charlie"), [alpha], [alpha, charlie])
    # a name that is not a configured peer is no ambiguity
    assert identify(_cert_naming("alpha", "www"), [alpha], [alpha, charlie]).peer is alpha


def test_bye_and_violation_reasons_are_never_empty() -> None:
    from linkd.proto import frames as F
    from linkd.proto import session as S
    from linkd.proto.framing import FrameDecoder, encode_frame

    def session() -> S.Session:
        s = S.Session(node="a", peer="b", channels=[], now=0.0)
        s.data_to_send(0.0)
        return s

    # a body msgpack refuses with an empty message
    s = session()
    events = s.receive_data(b"\x00\x00\x00\x01\xc1", 0.0)
    reason = events[-1].reason
    assert reason.startswith("protocol violation: frame body is not valid msgpack")
    assert not reason.rstrip().endswith(":")
    sent = FrameDecoder().__class__()
    sent.feed(s.data_to_send(0.0))
    bye = sent.next_frame()
    assert isinstance(bye, F.Bye) and bye.reason == reason
    # a peer's empty goodbye
    s = session()
    events = s.receive_data(encode_frame(F.Bye("")), 0.0)
    assert events[-1].reason == "refused by the peer: (the peer gave no reason)"
    # our own empty close
    s = session()
    s.close("  ")
    assert s.close_reason == "no reason given"
