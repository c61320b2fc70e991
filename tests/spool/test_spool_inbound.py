"""Inbound spool: receive, verify, group commit, names, modes, duplicates, resume."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat

import pytest
from spoolkit import FaultyFS

from linkd.errors import SpoolError
from linkd.spool import ChecksumMismatch, Inbound, InboundRefused, SpoolLayout
from linkd.spool.fs import FS

CH = "data"
MiB = 1 << 20


@pytest.fixture
def layout(tmp_path):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "europol")
    layout.create([CH], archive_sent=False)
    return layout


def inbound(layout, file_mode=0o640, checkpoint_bytes=8 << 20, fs=None, max_bytes=1 << 30):
    ib = Inbound(layout, CH, max_bytes, file_mode, checkpoint_bytes, fs=fs)
    assert ib.recover() == []
    return ib


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def receive(ib, seq, name, data, chunk=65536):
    ib.begin(seq, name, len(data), sha(data))
    for i in range(0, len(data), chunk):
        ib.write(data[i:i + chunk])
    return ib.finish()


def test_happy_path_delivers_in_one_group_commit(layout):
    ib = inbound(layout)
    batch = [receive(ib, seq, f"f{seq}.txt", f"message {seq}".encode()) for seq in (1, 2, 3)]
    assert sorted(os.listdir(layout.tmp_dir())) == ["data.1.part", "data.2.part", "data.3.part"]
    assert os.listdir(layout.in_dir(CH)) == []          # nothing visible before commit
    delivered = ib.commit(batch)
    assert [(d.seq, d.name, d.sent_name) for d in delivered] == [
        (1, "f1.txt", "f1.txt"), (2, "f2.txt", "f2.txt"), (3, "f3.txt", "f3.txt")]
    for d in delivered:
        assert d.path.read_bytes() == f"message {d.seq}".encode()
        assert d.sha256 == sha(d.path.read_bytes()) and d.size == d.path.stat().st_size
    assert ib.committed == 3 and os.listdir(layout.tmp_dir()) == []
    assert json.loads(layout.state_file_in(CH).read_text()) == {
        "committed": 3, "intent": None, "partial": None}


def test_collisions_get_tilde_n_before_the_first_extension(layout):
    in_dir = layout.in_dir(CH)
    for name in ("report.txt", "a.tar.gz", "README", "x~1.txt", "x.txt"):
        (in_dir / name).write_text("already here")
    ib = inbound(layout)
    names = ["report.txt", "report.txt", "a.tar.gz", "README", "x.txt"]
    batch = [receive(ib, seq, name, f"new {seq}".encode()) for seq, name in enumerate(names, 1)]
    delivered = ib.commit(batch)
    assert [(d.name, d.sent_name) for d in delivered] == [
        ("report~1.txt", "report.txt"), ("report~2.txt", "report.txt"),
        ("a~1.tar.gz", "a.tar.gz"), ("README~1", "README"), ("x~2.txt", "x.txt")]
    for name in ("report.txt", "a.tar.gz", "README", "x~1.txt", "x.txt"):
        assert (in_dir / name).read_text() == "already here"
    # the smallest free N: once report~1.txt is gone, it is used again
    (in_dir / "report~1.txt").unlink()
    [d] = ib.commit([receive(ib, 6, "report.txt", b"again")])
    assert d.name == "report~1.txt"


@pytest.mark.parametrize("file_mode", [0o640, 0o600, 0o644])
def test_file_mode_is_applied_whatever_the_umask(layout, file_mode):
    old = os.umask(0o077)
    try:
        ib = inbound(layout, file_mode=file_mode)
        small = [receive(ib, 1, "one", b"1")]
        [d] = ib.commit(small)
        many = [receive(ib, seq, f"n{seq}", b"n") for seq in range(2, 40)]   # syncfs path
        delivered = ib.commit(many)
    finally:
        os.umask(old)
    for path in [d.path] + [x.path for x in delivered]:
        assert stat.S_IMODE(os.stat(path).st_mode) == file_mode


def test_duplicates_stay_duplicates_after_the_consumer_deletes_the_file(layout):
    ib = inbound(layout)
    [d] = ib.commit([receive(ib, 1, "once.txt", b"once")])
    d.path.unlink()                                   # the application consumed it
    ib2 = inbound(layout)                              # and linkd restarted
    assert ib2.committed == 1
    with pytest.raises(InboundRefused, match="duplicate"):
        ib2.begin(1, "once.txt", 4, sha(b"once"))
    assert os.listdir(layout.in_dir(CH)) == []


def test_resume_from_the_last_checkpoint(layout):
    data = os.urandom(24 * MiB)
    ib = inbound(layout, checkpoint_bytes=4 * MiB)
    ib.begin(1, "big.bin", len(data), sha(data))
    for i in range(0, 20 * MiB + 1000, 1 * MiB):
        ib.write(data[i:i + MiB] if i < 20 * MiB else data[i:i + 1000])
    written = 20 * MiB + 1000
    # a crash: the object is simply dropped (no abort); the last checkpoint was at 20 MiB
    crashed = inbound(layout, checkpoint_bytes=4 * MiB)
    assert crashed.resume_point() == (1, 20 * MiB)
    assert os.path.getsize(layout.tmp_dir() / "data.1.part") == 20 * MiB   # truncated
    # a clean disconnect instead: abort() makes everything written durable
    crashed.begin(1, "big.bin", len(data), sha(data), 20 * MiB)
    crashed.write(data[20 * MiB:written])
    crashed.abort()
    ib = inbound(layout, checkpoint_bytes=4 * MiB)
    assert ib.resume_point() == (1, written)
    with pytest.raises(InboundRefused, match="durable offset is"):
        ib.begin(1, "big.bin", len(data), sha(data), 16 * MiB)
    assert ib.begin(1, "big.bin", len(data), sha(data), written) == written
    ib.write(data[written:])
    done = ib.finish()
    [d] = ib.commit([done])
    assert d.path.read_bytes() == data
    assert ib.resume_point() is None and os.listdir(layout.tmp_dir()) == []


def test_bytes_past_the_checkpoint_are_cut_off_at_recovery(layout):
    data = b"A" * 100
    ib = inbound(layout, checkpoint_bytes=40)
    ib.begin(7, "x", 100, sha(data))
    ib.write(data[:50])                                # checkpoint at 50
    with open(layout.tmp_dir() / "data.7.part", "ab") as f:
        f.write(b"garbage never made durable")
    ib = inbound(layout, checkpoint_bytes=40)
    assert ib.resume_point() == (7, 50)
    assert (layout.tmp_dir() / "data.7.part").read_bytes() == data[:50]


def test_offset_zero_discards_an_old_partial(layout):
    ib = inbound(layout, checkpoint_bytes=10)
    ib.begin(5, "x", 30, sha(b"x" * 30))
    ib.write(b"x" * 20)
    ib.abort()
    assert ib.resume_point() == (5, 20)
    assert ib.begin(6, "y", 1, sha(b"y")) == 0        # the sender started something else
    assert not (layout.tmp_dir() / "data.5.part").exists()
    assert ib.resume_point() is None


def test_checksum_mismatch_goes_to_quarantine_and_nothing_to_in(layout):
    ib = inbound(layout)
    ib.begin(1, "evil.bin", 5, sha(b"hello"))
    ib.write(b"HELLO")
    with pytest.raises(ChecksumMismatch) as caught:
        ib.finish()
    q = layout.quarantine_dir()
    assert caught.value.quarantined == q / "evil.bin"
    assert (q / "evil.bin").read_bytes() == b"HELLO"
    reason = (q / "evil.bin.reason").read_text()
    assert len(reason.splitlines()) == 1 and "sha256" in reason
    assert os.listdir(layout.in_dir(CH)) == [] and os.listdir(layout.tmp_dir()) == []
    assert ib.committed == 0
    ib.begin(1, "evil.bin", 5, sha(b"hello"))          # the sender may try again
    ib.write(b"hello")
    ib.commit([ib.finish()])
    assert (layout.in_dir(CH) / "evil.bin").read_bytes() == b"hello"


@pytest.mark.parametrize("args,match", [
    ((1, "../x", 1, "0" * 64), "file name"), ((1, ".hidden", 1, "0" * 64), "starts with"),
    ((1, "a/b", 1, "0" * 64), "'/'"), ((1, "x" * 256, 1, "0" * 64), "256 bytes"),
    ((1, "ok", 101, "0" * 64), "max_message_bytes"), ((1, "ok", 1, "xyz"), "sha256"),
    ((0, "ok", 1, "0" * 64), "positive"), ((1, "ok", 1, "0" * 64, 2), "offset"),
    ((1, "ok", 1, "0" * 64, 1), "cannot resume"),
])
def test_refusals(layout, args, match):
    ib = inbound(layout, max_bytes=100)
    with pytest.raises(InboundRefused, match=match):
        ib.begin(*args)
    assert os.listdir(layout.tmp_dir()) == []


def test_writes_beyond_the_announced_size_and_short_finishes_are_refused(layout):
    ib = inbound(layout)
    ib.begin(1, "x", 3, sha(b"abc"))
    with pytest.raises(InboundRefused, match="more than"):
        ib.write(b"abcd")
    ib.write(b"ab")
    with pytest.raises(InboundRefused, match="ended at 2 of 3"):
        ib.finish()
    ib.abort()
    assert ib.resume_point() == (1, 2)


def test_quarantine_helper_makes_bad_names_plain(layout, tmp_path):
    ib = inbound(layout)
    src = tmp_path / "payload"
    src.write_bytes(b"p")
    path = ib.quarantine("../../etc/passwd", src, "bad name\nsecond line")
    assert path.parent == layout.quarantine_dir() and path.read_bytes() == b"p"
    assert "/" not in path.name and not path.name.startswith(".")
    assert (layout.quarantine_dir() / f"{path.name}.reason").read_text() == \
        "bad name second line\n"
    only = ib.quarantine("nodata.txt", None, "refused before any byte")
    assert only == layout.quarantine_dir() / "nodata.txt.reason"


def test_commit_of_something_not_finished_here_is_refused(layout):
    ib = inbound(layout)
    done = receive(ib, 1, "a", b"a")
    ib.commit([done])
    with pytest.raises(SpoolError, match="not a finished"):
        ib.commit([done])


def test_begin_refuses_until_recovered_after_a_failed_commit(layout):
    fs = FaultyFS(sync=False)
    ib = inbound(layout, fs=fs)
    batch = [receive(ib, 1, "a", b"a"), receive(ib, 2, "b", b"b")]
    fs.fail_at, fs.error = ("replace", fs.op_calls.get("replace", 0)), errno.ENOSPC
    with pytest.raises(SpoolError, match="No space left"):
        ib.commit(batch)                                  # the intent could not be written
    assert ib.committed == 0
    with pytest.raises(SpoolError, match="recover"):
        ib.begin(3, "c", 1, sha(b"c"))
    ib.recover()
    assert ib.committed == 0 and ib.recovered == []
    assert os.listdir(layout.tmp_dir()) == []             # the sender will send them again
    assert os.listdir(layout.in_dir(CH)) == []


def test_corrupt_state_is_moved_aside_and_committed_salvaged(layout):
    ib = inbound(layout)
    ib.commit([receive(ib, 1, "a", b"a"), receive(ib, 2, "b", b"b")])
    path = layout.state_file_in(CH)
    path.write_text('{"committed": 2, "intent": [[')
    ib = Inbound(layout, CH, 1 << 30, 0o640)
    [problem] = ib.recover()
    assert "moved to" in problem and "committed falls back to 2" in problem
    assert ib.committed == 2
    assert any(n.startswith("in.json.corrupt-") for n in os.listdir(path.parent))
    assert json.loads(path.read_text())["committed"] == 2
    path.write_text("[]")
    ib = Inbound(layout, CH, 1 << 30, 0o640)
    [problem] = ib.recover()
    assert "committed falls back to 0" in problem and ib.committed == 0


def test_an_intent_whose_name_was_taken_meanwhile_picks_the_next_free_one(layout):
    fs = FaultyFS(sync=False, tag="receiver")
    ib = inbound(layout, fs=fs)
    batch = [receive(ib, 1, "a.txt", b"ours")]
    fs.crash_at = ("rename_noreplace", fs.op_calls.get("rename_noreplace", 0))
    with pytest.raises(BaseException, match="simulated crash"):
        ib.commit(batch)
    (layout.in_dir(CH) / "a.txt").write_bytes(b"someone else's")
    ib = Inbound(layout, CH, 1 << 30, 0o640)
    ib.recover()
    assert [(d.name, d.sent_name) for d in ib.recovered] == [("a~1.txt", "a.txt")]
    assert (layout.in_dir(CH) / "a~1.txt").read_bytes() == b"ours"
    assert (layout.in_dir(CH) / "a.txt").read_bytes() == b"someone else's"
    assert ib.committed == 1


def test_the_journal_answers_what_was_committed_under_a_seq_across_restarts(layout):
    ib = inbound(layout)
    (layout.in_dir(CH) / "a.txt").write_text("taken")
    ib.commit([receive(ib, 1, "a.txt", b"one"), receive(ib, 2, "b", b"two")])
    assert ib.lookup(3) is None
    for got in (ib, inbound(layout)):
        one, two = got.lookup(1), got.lookup(2)
        assert {k: one[k] for k in ("seq", "sha256", "size", "sent_name", "name")} == {
            "seq": 1, "sha256": sha(b"one"), "size": 3, "sent_name": "a.txt",
            "name": "a~1.txt"}
        assert (two["sha256"], two["name"]) == (sha(b"two"), "b")


def test_a_torn_journal_line_is_ignored_and_the_last_line_of_a_seq_wins(layout):
    ib = inbound(layout)
    ib.commit([receive(ib, 1, "a", b"a")])
    journal = layout.journal_file(CH)
    with open(journal, "ab") as f:
        f.write(json.dumps({"seq": 1, "sha256": sha(b"z"), "size": 1, "sent_name": "z",
                            "name": "z"}).encode() + b"\n")
        f.write(b'{"seq": 2, "sha2')                   # a crash mid-append
    ib = inbound(layout)
    assert ib.lookup(1)["sha256"] == sha(b"z") and ib.lookup(2) is None
    ib.commit([receive(ib, 2, "b", b"b")])             # appends after the torn line
    assert inbound(layout).lookup(2)["sha256"] == sha(b"b")


def test_the_journal_keeps_the_newest_entries_and_is_compacted(layout, monkeypatch):
    from linkd.spool import records
    monkeypatch.setattr(records, "KEEP", 4)
    ib = inbound(layout)
    for seq in range(1, 12):
        ib.commit([receive(ib, seq, f"f{seq}", str(seq).encode())])
    assert [s for s in range(1, 12) if ib.lookup(s)] == [8, 9, 10, 11]
    assert len(layout.journal_file(CH).read_text().splitlines()) <= 2 * 4 + 1
    assert [s for s in range(1, 12) if inbound(layout).lookup(s)] == [8, 9, 10, 11]


def test_revision_1_state_file_is_moved_to_the_channel_folder(layout):
    legacy = layout.legacy_state_file_in(CH)
    legacy.parent.mkdir(parents=True)
    legacy.write_text('{"committed": 7, "intent": null, "partial": null}')
    ib = inbound(layout)
    assert ib.committed == 7 and not legacy.exists()
    assert json.loads(layout.state_file_in(CH).read_text())["committed"] == 7
    with pytest.raises(InboundRefused, match="duplicate"):
        ib.begin(7, "x", 1, sha(b"x"))


def test_configure_applies_reloaded_limits_to_the_next_message(layout):
    ib = inbound(layout, max_bytes=10)
    with pytest.raises(InboundRefused, match="max_message_bytes"):
        ib.begin(1, "big", 20, sha(b"y" * 20))
    ib.configure(100, 0o600)
    [d] = ib.commit([receive(ib, 1, "big", b"y" * 20)])
    assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o600


def test_the_journal_keeps_only_where_each_entry_is_in_memory(layout):
    """A channel that has received KEEP messages held ~1 KiB per journal entry
    (4 MiB: a hub of 200 such peers, 800 MiB); only a line offset is kept now."""
    import tracemalloc

    from linkd.spool import records
    lines = b"".join(json.dumps({"seq": s, "sha256": sha(str(s).encode()), "size": 4096,
                                 "sent_name": f"report-{s:06d}.pdf",
                                 "name": f"report-{s:06d}.pdf",
                                 "delivered_at": 1.8e9 + s}).encode() + b"\n"
                     for s in range(1, records.KEEP + 1))
    path = layout.journal_file(CH)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lines)
    journal = records.Journal(path)
    tracemalloc.start()
    try:
        journal.load(FS(), [])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(journal.index) == records.KEEP
    assert held / records.KEEP < 300, held / records.KEEP
    assert journal.lookup(records.KEEP)["name"] == f"report-{records.KEEP:06d}.pdf"


def test_the_journal_appends_after_a_line_cut_short_in_this_process(layout):
    # an append that failed midway (disk full): the next one starts on a new line
    # and every offset still points at its own entry, with or without a reload
    ib = inbound(layout)
    ib.commit([receive(ib, 1, "a", b"a")])
    with open(layout.journal_file(CH), "ab") as f:
        f.write(b'{"seq": 2, "sha256": "ab')
    ib.commit([receive(ib, 2, "b", b"b"), receive(ib, 3, "c", b"c")])
    for got in (ib, inbound(layout)):
        assert [got.lookup(s)["sha256"] for s in (1, 2, 3)] == [sha(b"a"), sha(b"b"),
                                                                 sha(b"c")]


def test_a_journal_line_that_is_not_where_it_was_answers_nothing(layout):
    # the file replaced behind our back: "cannot say" (a stale nack), never another
    # seq's entry
    ib = inbound(layout)
    ib.commit([receive(ib, 1, "a", b"a"), receive(ib, 2, "b", b"b")])
    journal = layout.journal_file(CH)
    journal.write_bytes(journal.read_bytes().split(b"\n", 1)[1])   # line 1 removed
    assert ib.lookup(1) is None and ib.lookup(2) is None


def test_a_journal_file_removed_behind_our_back_answers_nothing(layout):
    # "cannot say" (a stale nack), as the entries() of a missing file are none: not an
    # I/O error that fails the batch and sends it round the busy-nack loop
    ib = inbound(layout)
    ib.commit([receive(ib, 1, "a", b"a")])
    layout.journal_file(CH).unlink()
    assert ib.lookup(1) is None and ib.journaled() == []


def test_a_spool_group_the_daemon_is_not_in_is_one_line_and_leaks_nothing(layout,
                                                                          monkeypatch):
    # review: the fchown of each partial to spool_group failed (EPERM: linkd not a
    # member) after the partial was opened, before anything would close it: every
    # delivery leaked a descriptor, with "Operation not permitted" and no fix
    import grp
    try:
        group = grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        pytest.skip("our group has no name")
    layout.spool_group = group
    ib = inbound(layout)

    def refuse(fd, uid, gid):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "fchown", refuse)
    before = len(os.listdir("/proc/self/fd"))
    for seq in (1, 2, 3):
        with pytest.raises(SpoolError, match=f"must be a member of it .*usermod -aG {group}"):
            ib.begin(seq, "a.txt", 1, sha(b"a"))
    assert len(os.listdir("/proc/self/fd")) == before
