"""`log.info_many`: a batch of per-message audit events (message_queued, message_sent,
message_delivered) logged at once gives the same lines as logging them one by one
(stderr and the hash-chained audit log), with one timestamp for the batch and one
write for each; `AuditLog.record_many` puts checkpoints where `record` would."""

import contextlib
import io
import json
import re
import threading

import pytest
import structlog
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from linkd import log as logmod
from linkd.evidence import audit as A
from linkd.evidence import keys

STAMP = re.compile(r'"timestamp": ?"[^"]*"')


def rows(n, start=0):
    out = []
    for i in range(start, start + n):
        row = dict(channel="data", name=f"f{i:03d}.bin", seq=i, size=4096, sha256="ab" * 32)
        if i % 3 == 0:
            row["delivered_name"] = f"f{i:03d}~1.bin"
        out.append(row)
    return out


def audit_items(path):
    """Each audit line's fields in order, without what the time changes."""
    out = []
    for raw in path.read_text().splitlines():
        obj = json.loads(raw)
        out.append([(k, v) for k, v in obj.items() if k not in ("prev", "timestamp")])
    return out


def run(tmp_path, name, fmt, level, batched, journald=False, monkeypatch=None,
        batch=None, raises=None):
    """Log `batch` (7 rows by default) as message_sent lines, in one batch or one by
    one: (stderr, the audit lines' fields, the audit log's path)."""
    batch = rows(7) if batch is None else batch
    stream = io.StringIO()
    audit_log = A.AuditLog(tmp_path / name, "alpha", None)
    audit_log.open()
    A.install(audit_log)
    monkeypatch.setattr(logmod.sys, "stderr", stream)
    monkeypatch.setattr(logmod, "journald_stream", lambda stream=None: journald)
    try:
        logmod.configure(fmt, level=level, node="alpha")
        logger = logmod.get(peer="bravo", remote="127.0.0.1:9")  # bound context first
        with pytest.raises(raises) if raises else contextlib.nullcontext():
            if batched:
                logmod.info_many(logger, "message_sent", batch)
            else:
                for row in batch:
                    logger.info("message_sent", **row)
    finally:
        A.install(None)
        audit_log.close()
        logmod.configure("json")
        structlog.reset_defaults()
    return stream.getvalue(), audit_items(audit_log.path), audit_log.path


@pytest.mark.parametrize("fmt,level,journald", [
    ("json", "info", False), ("json", "info", True), ("json", "error", False),
    ("console", "info", False)])
def test_a_batch_gives_the_lines_logging_one_by_one_gives(tmp_path, monkeypatch, fmt,
                                                          level, journald):
    one_err, one_audit, _ = run(tmp_path, "one", fmt, level, False, journald, monkeypatch)
    many_err, many_audit, path = run(tmp_path, "many", fmt, level, True, journald,
                                     monkeypatch)
    assert many_audit == one_audit and len(one_audit) == 7
    assert A.verify([path]).ok
    if fmt == "json":
        assert STAMP.sub("T", many_err) == STAMP.sub("T", one_err)
        lines = many_err.splitlines()
        if level == "error":
            assert lines == []          # thinned from stderr, never from the audit log
        else:
            assert len(lines) == 7
            assert all(line.startswith("<6>{") == journald for line in lines)
            assert len({STAMP.search(line)[0] for line in lines}) == 1   # one stamp
    else:
        # the console renderer is the same processor: same lines but for the time
        strip = re.compile(r"^\S+ ")
        assert [strip.sub("", x) for x in many_err.splitlines()] == \
            [strip.sub("", x) for x in one_err.splitlines()]


def signer_for(ca: trustme.CA, name: str) -> keys.Signer:
    cert = ca.issue_cert(name, common_name=name)
    return keys.Signer(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()),
                       load_pem_private_key(cert.private_key_pem.bytes(), None))


def test_record_many_puts_checkpoints_where_record_does(tmp_path):
    signer = signer_for(trustme.CA(), "alpha")
    events = [{"event": "message_sent", "node": "alpha", "seq": i, "timestamp": "T"}
              for i in range(23)]
    events.insert(5, {"event": "not_audited", "seq": -1})
    where = {}
    for mode in ("one", "many"):
        log = A.AuditLog(tmp_path / mode, "alpha", signer, checkpoint_lines=5)
        log.open()
        if mode == "one":
            for event in events:
                log.record(event)
        else:
            log.record_many(events[:11])
            log.record_many(events[11:])
        log.sync()
        log.close()
        lines = [json.loads(x) for x in log.path.read_text().splitlines()]
        where[mode] = [(x["line"], x["event"], x.get("seq")) for x in lines]
        assert A.verify([log.path]).ok
    assert where["many"] == where["one"]
    assert sum(1 for _, ev, _ in where["one"] if ev == "audit_checkpoint") >= 5


class Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_a_processor_error_mid_batch_keeps_the_lines_before_it(tmp_path, monkeypatch):
    """Row 2 cannot be encoded: as when logging one by one, rows 0 and 1 are on
    stderr and in the audit log, row 2 in neither, and the error reaches the caller
    (a batch that gave up whole lost rows 0 and 1 as well)."""
    got = {}
    for mode in ("one", "many"):
        batch = rows(4)
        batch[2]["oops"] = Unrepresentable()
        err, audited, _ = run(tmp_path, mode, "json", "info", mode == "many",
                              monkeypatch=monkeypatch, batch=batch, raises=RuntimeError)
        got[mode] = ([json.loads(x)["seq"] for x in err.splitlines()],
                     [dict(e)["seq"] for e in audited if dict(e)["event"] == "message_sent"])
    assert got["many"] == got["one"] == ([0, 1], [0, 1])


def test_batches_and_single_lines_from_threads_never_split_a_line(tmp_path, monkeypatch):
    # a stream whose every write is a system call (as stderr is): a line written in
    # two parts could have another thread's batch land between them
    stream = io.TextIOWrapper(open(tmp_path / "err", "wb", buffering=0),
                              write_through=True)
    monkeypatch.setattr(logmod.sys, "stderr", stream)
    try:
        logmod.configure("json", node="alpha")
        logger = logmod.get(peer="bravo")

        def singles():
            for i in range(300):
                logger.info("message_queued", seq=i, name="x" * 200)

        def batches():
            for i in range(30):
                logmod.info_many(logger, "message_sent", rows(10, 10 * i))
        threads = [threading.Thread(target=f) for f in (singles, batches, singles)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        logmod.configure("json")
        structlog.reset_defaults()
    stream.close()
    lines = (tmp_path / "err").read_text().splitlines()
    assert len(lines) == 900
    assert all(json.loads(line)["event"] in ("message_queued", "message_sent")
               for line in lines)
