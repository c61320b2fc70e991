"""The audit log after a full disk (55ac042), from its review (helper-27): resume()
records every fragment it cut, a shutdown while failed never appends after a
fragment, lines dropped while failed are noticed by the caller that needs them, and
what recovery completed is logged by the reconciliation after a resume."""

import errno
import json
import os
import time

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from linkd.evidence import audit as A
from linkd.evidence import keys


def signer():
    cert = trustme.CA().issue_cert("bravo", common_name="bravo")
    return keys.Signer(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()),
                       load_pem_private_key(cert.private_key_pem.bytes(), None))


class Disk:
    """os.write for the audit module: 'full' fails with ENOSPC after `room` bytes."""
    def __init__(self, monkeypatch):
        self.real = os.write
        self.full = False
        self.room = 0
        monkeypatch.setattr(A.os, "write", self.write)

    def write(self, fd, data):
        data = bytes(data)
        if not self.full:
            return self.real(fd, data)
        if self.room > 0:
            n = self.real(fd, data[:self.room])
            self.room -= n
            return n
        raise OSError(errno.ENOSPC, "No space left on device")


def opened(tmp_path, every=100):
    log = A.AuditLog(tmp_path / "a", "bravo", signer(), checkpoint_lines=every)
    log.open()
    return log


def assert_restart_verifies(tmp_path):
    """linkd started again on the folder (open() cuts a fragment): the chain verifies."""
    log = opened(tmp_path)
    log.close()
    v = verdict(log)
    assert v.ok, v.message


def verdict(log):
    return A.verify(A.rotated_files(log.folder) + [log.path])


def events(log):
    return [json.loads(x)["event"] for x in log.path.read_bytes().splitlines()]


def test_torn_fragment_recorded_when_first_resume_attempt_finds_disk_still_full(
        tmp_path, monkeypatch):
    log = opened(tmp_path)
    disk = Disk(monkeypatch)
    disk.full, disk.room = True, 40           # a short write: 40 bytes of the line go in
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 1})
    assert log.failed is not None and log.resumable()
    assert not log.path.read_bytes().endswith(b"\n")   # fragment on disk
    assert log.resume() is False               # disk still full: 5 s later
    disk.full = False                          # space freed
    assert log.resume() is True
    log.close()
    assert verdict(log).ok, verdict(log).message
    assert "audit_torn_tail" in events(log), events(log)


def test_close_while_failed_after_a_short_write(tmp_path, monkeypatch):
    """Shutdown (SIGTERM, or 'free space then restart') before resume ran."""
    log = opened(tmp_path)
    disk = Disk(monkeypatch)
    disk.full, disk.room = True, 40
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 1})
    assert log.failed is not None
    disk.full = False                          # space freed, then linkd stopped
    log.close()
    assert_restart_verifies(tmp_path)


def test_close_while_failed_after_whole_lines_plus_fragment(tmp_path, monkeypatch):
    log = opened(tmp_path)
    disk = Disk(monkeypatch)
    one = A.AuditLog._encode({"event": "message_delivered", "peer": "alpha", "seq": 1}, 0, A.ZERO)
    disk.full, disk.room = True, len(one) + 60   # first line whole + part of the second
    log.record_many([{"event": "message_delivered", "peer": "alpha", "seq": 1},
                     {"event": "message_delivered", "peer": "alpha", "seq": 2}])
    assert log.failed is not None
    disk.full = False
    log.close()
    assert_restart_verifies(tmp_path)


def test_resume_with_whole_lines_plus_fragment_verifies(tmp_path, monkeypatch):
    log = opened(tmp_path)
    disk = Disk(monkeypatch)
    disk.full, disk.room = True, 900
    log.record_many([{"event": "message_delivered", "peer": "alpha", "seq": i}
                     for i in range(1, 10)])
    assert log.failed is not None
    disk.full = False
    assert log.resume()
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 99})
    log.close()
    v = verdict(log)
    assert v.ok, v.message


def test_failed_resume_attempt_then_close(tmp_path, monkeypatch):
    """resume(): torn-tail line fits, audit_resumed does not -> line/prev restored to
    stale values; a shutdown then writes a checkpoint off the stale values."""
    log = opened(tmp_path)
    disk = Disk(monkeypatch)
    disk.full, disk.room = True, 40
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 1})
    disk.room = 10_000                         # a little space: the torn-tail line fits
    real_write = A.AuditLog._write
    def write(self, obj):
        if obj.get("event") == "audit_resumed":
            disk.room = 0
        return real_write(self, obj)
    monkeypatch.setattr(A.AuditLog, "_write", write)
    assert log.resume() is False
    disk.full = False
    log.close()
    assert_restart_verifies(tmp_path)


def test_a_line_dropped_while_failed_is_noticed_after_a_resume(tmp_path, monkeypatch):
    """_announce records a delivery's line (dropped: the log is failed), resume() runs
    in the audit loop's thread, then _announce's sync() succeeds: the commit must
    still fail, or the ack leaves without its line."""
    log = opened(tmp_path)
    disk = Disk(monkeypatch)
    disk.full = True
    log.record({"event": "link_down", "peer": "alpha"})    # the log fails on some line
    disk.full = False
    mark = log.failures                                    # _announce, before recording
    log.record_many([{"event": "message_delivered", "peer": "alpha", "seq": 7}])  # dropped
    assert log.resume()                                    # audit_loop, other thread
    log.sync()
    assert log.lost_since(mark)                            # _announce raises on this
    mark = log.failures
    log.record_many([{"event": "message_delivered", "peer": "alpha", "seq": 8}])
    log.sync()
    assert not log.lost_since(mark)
    log.close()


def test_reconcile_until_takes_a_recovered_delivery_it_does_not_judge(tmp_path):
    """audit_loop's reconcile after resume calls take_recovered() (status only) but
    judges only journal entries with delivered_at <= until: a delivery recover()
    completed just after the resume (delivered_at = recovery time > until) is taken
    from log_recovered and logged by neither."""
    import types
    from pathlib import Path

    from linkd.net.peer import PeerLink
    from linkd.spool.inbound import Delivered
    until = time.time()
    d = Delivered("data", 5, "f", "f", 3, "ab" * 32, Path("/x"), until + 0.01)
    logged = []
    ib = types.SimpleNamespace(recovered=[d])
    ib.take_recovered = lambda: [ib.recovered.pop()] if ib.recovered else []
    fake = types.SimpleNamespace(
        name="alpha", inbound={"data": ib},
        status=types.SimpleNamespace(
            channel=lambda n: types.SimpleNamespace(note_received=lambda s: None)),
        log=types.SimpleNamespace(info=lambda ev, **kw: logged.append((ev, kw))))
    journal = {"data": [d.journal_entry() | {"delivered_at": d.delivered_at}]}
    PeerLink.reconcile_audit(fake, A.AuditTail(until - 100, set()), journal, until=until)
    assert ib.recovered == []            # taken: log_recovered() will find nothing
    assert logged, "the recovered delivery was logged by nobody"


def test_a_rotation_cut_short_by_a_full_disk_waits_for_a_restart(tmp_path, monkeypatch):
    """A new file without its audit_rotated/audit_key lines would not verify alone."""
    log = A.AuditLog(tmp_path / "a", "bravo", signer(), checkpoint_lines=1000, max_bytes=4000)
    log.open()
    disk = Disk(monkeypatch)
    for i in range(3):
        log.record({"event": "message_delivered", "peer": "alpha", "seq": i, "pad": "x" * 300})
    disk.full = True
    log.record({"event": "link_down", "peer": "alpha"})
    assert log.failed is not None
    log.max_bytes = log.path.stat().st_size + 10
    disk.room = 3000        # room for audit_resumed and the checkpoint, not the new file
    real_rotate = A.AuditLog._rotate_now

    def rotate(self):
        disk.room = 0
        return real_rotate(self)
    monkeypatch.setattr(A.AuditLog, "_rotate_now", rotate)
    assert log.resume() is False
    assert not log.resumable(), log.failed
    disk.full = False
    log.close()
    log2 = A.AuditLog(tmp_path / "a", "bravo", signer(), checkpoint_lines=1000)
    log2.open()
    log2.close()
    v = verdict(log2)
    assert v.ok, v.message


def test_failed_resume_attempts_leave_one_torn_record_not_one_each(tmp_path, monkeypatch):
    """From the second re-trial (helper-28): each resume attempt while the disk was
    still full wrote part of its own audit_torn_tail line, which the next attempt cut
    and recorded as another "write cut short": 10 such records after 50 s, for one
    line really lost."""
    log = opened(tmp_path)
    disk = Disk(monkeypatch)
    disk.full, disk.room = True, 40           # the real loss: part of one line
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 1})
    for _ in range(3):                        # attempts 5 s apart, the disk still full
        disk.room = 100                       # room for part of the attempt's own line
        assert log.resume() is False
        assert log.resumable()
    disk.full = False
    assert log.resume() is True
    log.close()
    assert verdict(log).ok, verdict(log).message
    assert events(log).count("audit_torn_tail") == 1, events(log)


def test_an_audit_refusal_asks_for_the_resend_when_the_log_tries_again(tmp_path,
                                                                      monkeypatch):
    from linkd.evidence import service
    from linkd.net import receiver
    log = A.AuditLog(tmp_path / "a", "bravo", None)
    log.open()
    A.install(log)
    try:
        disk = Disk(monkeypatch)
        disk.full = True
        log.record({"event": "link_down", "peer": "alpha"})
        assert log.refusal().startswith(receiver.AUDIT_REFUSAL)
        assert service.refusal_wait(receiver.QUARANTINE_WAIT) == service.RESUME_INTERVAL
        log._write_error = None               # as after a failed fsync: a restart's job
        assert service.refusal_wait(receiver.QUARANTINE_WAIT) == receiver.QUARANTINE_WAIT
    finally:
        A.install(None)
        disk.full = False
