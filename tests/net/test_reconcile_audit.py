"""Start-up reconciliation of the delivery journal with the audit log's tail
(PeerLink.reconcile_audit, docs/EVIDENCE.md): a delivery made since the tail began
with no message_delivered line in it gets one (recovered=True); one that has its
line, one older than the tail, and one dated in the future (the clock was stepped
back since) get none."""

from __future__ import annotations

import hashlib
import json
import time

import structlog.testing
import trustme
from memlink import make_link, node_config, peer_config

from linkd.evidence.audit import AuditTail


def _deliver(link, seq: int, data: bytes) -> str:
    inbound = link.inbound["data"]
    sha = hashlib.sha256(data).hexdigest()
    inbound.begin(seq, f"f{seq}.bin", len(data), sha)
    inbound.write(data)
    inbound.commit([inbound.finish()])
    return sha


def test_reconcile_logs_only_the_journaled_deliveries_the_tail_lacks(tmp_path):
    ca = trustme.CA()
    link = make_link(node_config(tmp_path, ca, "bravo", [peer_config("alpha")]), "alpha")
    shas = {seq: _deliver(link, seq, bytes([seq]) * 100) for seq in (1, 2, 3, 4)}
    journal = link.inbound["data"]._journal
    now = time.time()
    entries = [json.loads(line) for line in journal.path.read_text().splitlines()]
    entries[0]["delivered_at"] = now - 3600         # before the tail began: not judged
    entries[3]["delivered_at"] = now + 3600         # "in the future": not judged
    journal.path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    journal.load(link.inbound["data"].fs, [])
    tail = AuditTail(since=now - 60, delivered={("alpha", "data", 2, shas[2]),
                                                ("alpha", "data", 3, "0" * 64)})
    with structlog.testing.capture_logs() as logs:
        link.reconcile_audit(tail, link.journaled())
    lines = [(e["seq"], e["sha256"], e["recovered"]) for e in logs
             if e["event"] == "message_delivered"]
    # 2 has its line; 3's line names other content, so 3 has none
    assert lines == [(3, shas[3], True)]
