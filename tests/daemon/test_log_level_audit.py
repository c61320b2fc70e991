"""`[node] log_level` thins stderr, never the audit log: an info-level audit event
(message_delivered) reaches the audit sink even with log_level = "error"."""

import structlog

from linkd import log as logmod
from linkd.evidence import audit


def test_a_high_log_level_still_feeds_the_audit_log(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(audit, "sink", lambda event: seen.append(dict(event)))
    try:
        logmod.configure("json", level="error", node="alpha")
        logger = logmod.get(peer="bravo")
        logger.info("message_delivered", channel="data", name="a.txt", seq=1)
        logger.error("inbound_storage_failed", reason="disk")
        err = capsys.readouterr().err
    finally:
        logmod.configure("json")
        structlog.reset_defaults()
    assert [e["event"] for e in seen] == ["message_delivered", "inbound_storage_failed"]
    assert "message_delivered" not in err and "inbound_storage_failed" in err
