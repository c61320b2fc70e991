"""The late SHA-256 of a big file (spool/outbound.py, "The late SHA-256"): claimed
without it, hashed after the claim with the same checks as at pick-up, recorded, and,
on the receiving side, checked against a SHA-256 that arrives after the data."""

from __future__ import annotations

import errno
import json
import os

import pytest
from spool.test_spool_inbound import inbound, receive, sha
from spool.test_spool_outbound import outbound, put

from linkd.errors import FileChanged
from linkd.spool import ChecksumMismatch, InboundRefused, SpoolLayout, outbound_items

CH = "data"
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def layout(tmp_path):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "europol")
    layout.create([CH], archive_sent=False)
    return layout


@pytest.fixture(autouse=True)
def late_from_64_kib(monkeypatch):
    monkeypatch.setattr(outbound_items, "LATE_HASH", 64 * KiB)


def claimed(layout, size=200 * KiB):
    ob = outbound(layout, max_bytes=1 << 30)
    data = os.urandom(size)
    put(layout, "big.bin", data)
    [item], failed = ob.scan()
    assert failed == []
    return ob, item, data


def record(layout, seq):
    return json.loads((layout.queue_dir(CH) / f"{seq}.meta").read_text())


def test_a_big_file_is_claimed_without_its_sha256_and_a_small_one_with_it(layout):
    ob = outbound(layout, max_bytes=1 << 30)
    put(layout, "big.bin", os.urandom(64 * KiB))
    put(layout, "small.bin", os.urandom(64 * KiB - 1))
    [big, small], _ = ob.scan()
    assert (big.name, big.sha256) == ("big.bin", "")
    assert small.sha256 == sha(small.path.read_bytes())
    assert record(layout, 1)["sha256"] == "" and record(layout, 2)["sha256"] == small.sha256
    # a restart keeps the claim as it is (the SHA-256 is taken when it is sent)
    again = outbound(layout, max_bytes=1 << 30)
    assert [(i.seq, i.sha256) for i in again.pending()] == [(1, ""), (2, small.sha256)]


def test_the_late_digest_is_recorded_once_in_the_record_and_the_window(layout):
    ob, item, data = claimed(layout)
    digest = ob.digest_late(item)
    assert digest == sha(data)
    new = ob.record_sha256(item, digest)
    assert new.sha256 == digest and ob.pending()[0] is new
    assert record(layout, 1)["sha256"] == digest
    assert ob.record_sha256(item, "0" * 64) is new           # hashed already: kept
    assert outbound(layout, max_bytes=1 << 30).pending()[0].sha256 == digest


def test_a_file_changed_after_its_claim_is_refused_by_the_late_digest(layout):
    ob, item, _ = claimed(layout)
    with open(item.path, "r+b") as f:
        f.write(b"changed")
    # (an operator trial read "(now 9 bytes, claimed with 9)" for a same-size change)
    with pytest.raises(FileChanged, match=r"changed after it was queued \(written to in "
                                          r"place: the same size"):
        ob.digest_late(item)


def test_a_writer_holding_the_queued_file_open_is_refused(layout):
    ob, item, _ = claimed(layout)
    probe = os.open(item.path, os.O_RDONLY)
    try:
        if ob._lease(probe) is False:
            pytest.skip("no file leases here (not the owner, or no support)")
    finally:
        os.close(probe)
    fd = os.open(item.path, os.O_WRONLY)
    try:
        with pytest.raises(FileChanged, match="opened for writing after it was queued"):
            ob.digest_late(item)
    finally:
        os.close(fd)


def during_the_digest(ob, monkeypatch, act):
    """Run `act()` between the digest's first and second read."""
    real_read = ob.fs.read
    reads = []

    def read(fd, n):
        reads.append(n)
        if len(reads) == 2:
            act()
        return real_read(fd, n)
    monkeypatch.setattr(ob.fs, "read", read)
    return reads


def test_a_writer_opening_it_while_it_is_hashed_is_noticed(layout, monkeypatch):
    ob, item, _ = claimed(layout, size=8 * MiB)
    leased = []

    def writer():
        # O_NONBLOCK: with our lease held the open fails at once (a blocking one
        # would wait for the lease break), but the break is started all the same;
        # where there is no lease it opens and writes.
        try:
            fd = os.open(item.path, os.O_WRONLY | os.O_NONBLOCK)
        except BlockingIOError:
            leased.append(True)
            return
        try:
            os.write(fd, b"changed")
        finally:
            os.close(fd)
    reads = during_the_digest(ob, monkeypatch, writer)
    with pytest.raises(FileChanged, match="while it was being hashed"):
        ob.digest_late(item)
    if not leased:
        pytest.skip("no file leases here (not the owner, or no support)")
    else:
        # the lease break stopped it at once (and its close released the lease), not
        # after reading the 6 MiB left while the writer waited
        assert len(reads) == 2, len(reads)
        fd = os.open(item.path, os.O_WRONLY | os.O_NONBLOCK)    # no lease left
        os.close(fd)


def test_a_change_of_times_while_it_is_hashed_is_noticed(layout, monkeypatch):
    ob, item, _ = claimed(layout, size=3 * MiB)
    during_the_digest(ob, monkeypatch, lambda: os.utime(item.path, ns=(1, 1)))
    with pytest.raises(FileChanged, match="while it was being hashed"):
        ob.digest_late(item)


def test_a_stopped_digest_ends_at_its_next_read(layout):
    ob, item, _ = claimed(layout, size=3 * MiB)
    with pytest.raises(OSError) as info:
        ob.digest_late(item, stop=lambda: True)
    assert info.value.errno == errno.ECANCELED


def test_content_differs_says_nothing_before_the_sha256_is_known(layout):
    ob, item, _ = claimed(layout)
    assert ob.content_differs(item) is False


# -- receiving: the SHA-256 after the data ----------------------------------------------

def test_a_message_begun_without_its_sha256_is_checked_against_the_late_one(layout):
    ib = inbound(layout)
    data = os.urandom(300 * KiB)
    ib.begin(1, "late.bin", len(data), "")
    ib.write(data)
    done = ib.finish(sha(data).upper())
    assert done.sha256 == sha(data)
    [d] = ib.commit([done])
    assert d.path.read_bytes() == data and d.sha256 == sha(data)


def test_a_late_sha256_that_does_not_match_is_quarantined(layout):
    ib = inbound(layout)
    ib.begin(1, "late.bin", 5, "")
    ib.write(b"hello")
    with pytest.raises(ChecksumMismatch):
        ib.finish(sha(b"other"))
    assert os.listdir(layout.in_dir(CH)) == []


def test_a_message_without_any_sha256_is_never_committed(layout):
    ib = inbound(layout)
    ib.begin(1, "late.bin", 5, "")
    ib.write(b"hello")
    with pytest.raises(InboundRefused, match="no SHA-256 was announced"):
        ib.finish()


@pytest.mark.parametrize("first, resumed", [("", ""), ("", "late"), ("early", "")])
def test_a_checkpoint_resumes_whichever_side_lacks_the_sha256(layout, first, resumed):
    data = os.urandom(3 * MiB)
    digest = sha(data)
    ib = inbound(layout, checkpoint_bytes=1 * MiB)
    ib.begin(1, "late.bin", len(data), digest if first else "")
    ib.write(data[:2 * MiB])
    ib.abort()                                   # the session ended: checkpoint kept
    ib = inbound(layout, checkpoint_bytes=1 * MiB)
    assert ib.resume_point() == (1, 2 * MiB)
    ib.begin(1, "late.bin", len(data), digest if resumed else "", 2 * MiB)
    ib.write(data[2 * MiB:])
    done = ib.finish(None if resumed else digest)
    assert ib.commit([done])[0].path.read_bytes() == data


def test_a_resume_whose_known_sha256s_differ_is_refused(layout):
    data = os.urandom(2 * MiB)
    ib = inbound(layout, checkpoint_bytes=1 * MiB)
    ib.begin(1, "late.bin", len(data), sha(data))
    ib.write(data[:1 * MiB])
    ib.abort()
    ib = inbound(layout, checkpoint_bytes=1 * MiB)
    with pytest.raises(InboundRefused, match="cannot resume"):
        ib.begin(1, "late.bin", len(data), sha(b"other"), 1 * MiB)


def test_receive_still_needs_a_sha256_up_front_by_default(layout):
    ib = inbound(layout)
    assert receive(ib, 1, "a.txt", b"abc").sha256 == sha(b"abc")


def test_a_big_file_rewritten_between_examine_and_claim_is_hashed_at_its_claim(layout):
    """Its mtime put back, only its ctime says it was written to since examine():
    the claim hashes it then, so what is queued is what was hashed."""
    ob = outbound(layout, max_bytes=1 << 30)
    path = put(layout, "big.bin", os.urandom(200 * KiB))
    found = ob.examine()
    [c] = found.ready
    assert c.sha256 == "" and c.ctime_ns
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"changed")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    [item], _ = ob.claim(found.ready)
    assert item.sha256 == sha(item.path.read_bytes()) and item.ctime_ns == 0


def test_a_renumbered_late_claim_is_hashed_without_a_false_alarm(layout):
    """A renumbering renames the file (its ctime moves): the late hash then checks
    inode, size and mtime as for any claim."""
    ob, item, data = claimed(layout)
    assert item.ctime_ns
    new = ob.renumber(item, 100)
    assert new.seq > 100 and new.ctime_ns == 0
    assert ob.digest_late(new) == sha(data)
