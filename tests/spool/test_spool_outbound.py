"""Outbound spool: pick-up, claim order and numbering, failures, ack and archive."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from spoolkit import FaultyFS, drop

import linkd
from linkd.errors import SpoolError
from linkd.spool import Outbound, SpoolLayout

CH = "data"
ROOT = str(Path(linkd.__file__).resolve().parent.parent)


@pytest.fixture
def layout(tmp_path):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "europol")
    layout.create([CH], archive_sent=True)
    return layout


def outbound(layout, max_bytes=1 << 20, archive_sent=False, fs=None):
    ob = Outbound(layout, CH, max_bytes, archive_sent, fs=fs)
    assert ob.recover() == []
    return ob


_last_ctime: dict[Path, int] = {}


def put(layout, name, data=None, t=0):
    """Drop a file (mtime set from `t`); its ctime (arrival) is later than that of
    every file put before it in the same folder, so arrival order is drop order."""
    out = layout.out_dir(CH)
    path = drop(out, name, name.encode() * 3 if data is None else data,
                mtime_ns=1_700_000_000_000_000_000 + t)
    while os.lstat(path).st_ctime_ns <= _last_ctime.get(out, 0):
        os.utime(path, ns=(os.lstat(path).st_atime_ns, os.lstat(path).st_mtime_ns))
    _last_ctime[out] = os.lstat(path).st_ctime_ns
    return path


def reason_of(layout, name):
    text = (layout.failed_dir(CH) / f"{name}.reason").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 1, repr(text)
    return text


def test_claims_in_arrival_order_with_contiguous_seqs(layout):
    # arrival = ctime (the rename into out/), not mtime: z.txt was written first but
    # arrived last (CONTRACT §4.2: pick-up order)
    put(layout, "c.txt", t=1)
    put(layout, "b.txt", t=2)
    put(layout, "a.txt", t=2)
    put(layout, "z.txt", t=0)
    ob = outbound(layout)
    claimed, failed = ob.scan()
    assert [(c.seq, c.name) for c in claimed] == [(1, "c.txt"), (2, "b.txt"), (3, "a.txt"),
                                                  (4, "z.txt")]
    assert failed == [] and ob.pending() == claimed
    assert os.listdir(layout.out_dir(CH)) == []
    for c in claimed:
        data = c.name.encode() * 3
        assert c.size == len(data) and c.sha256 == hashlib.sha256(data).hexdigest()
        with ob.open(c) as f:
            assert f.read() == data
        meta = json.loads((layout.queue_dir(CH) / f"{c.seq}.meta").read_text())
        st = os.lstat(layout.queue_dir(CH) / f"{c.seq}.data")
        assert c.path == layout.queue_dir(CH) / f"{c.seq}.data"
        assert meta == {"seq": c.seq, "name": c.name, "size": c.size, "sha256": c.sha256,
                        "claimed_at": c.claimed_at, "ino": st.st_ino,
                        "mtime_ns": st.st_mtime_ns}
    assert ob.next_seq == 5


def test_same_ctime_falls_back_to_name_order(layout, monkeypatch):
    for name in ("b", "c", "a"):
        put(layout, name)
    real = os.scandir

    class SameCtime:
        def __init__(self, entry):
            self._e, self.name = entry, entry.name

        def is_dir(self, **kw):
            return self._e.is_dir(**kw)

        def stat(self, **kw):
            st = self._e.stat(**kw)
            return os.stat_result((*st[:7], 0, 0, 0))

    class Listing:
        def __init__(self, path):
            self._it = real(path)

        def __enter__(self):
            return (SameCtime(e) for e in self._it)

        def __exit__(self, *exc):
            self._it.close()

    monkeypatch.setattr(os, "scandir", Listing)
    assert [(c.seq, c.name) for c in outbound(layout).scan()[0]] == [(1, "a"), (2, "b"),
                                                                      (3, "c")]


def test_numbering_continues_across_restarts_and_acks(layout):
    put(layout, "a")
    ob = outbound(layout)
    ob.scan()
    put(layout, "b", t=1)
    ob2 = outbound(layout)                       # a restart: nothing acked yet
    assert [c.seq for c in ob2.pending()] == [1]
    assert [c.seq for c in ob2.scan()[0]] == [2]
    assert [r.item.seq for r in ob2.resolve([2, 1])] == [1, 2]
    put(layout, "c", t=2)
    ob3 = outbound(layout)
    assert (ob3.acked, ob3.next_seq) == (2, 3) and ob3.pending() == []
    assert [c.seq for c in ob3.scan()[0]] == [3]


def test_dot_files_and_subfolders_are_ignored_links_and_fifos_never_followed(layout,
                                                                            tmp_path):
    out = layout.out_dir(CH)
    (out / ".hidden").write_text("no")
    (out / "sub").mkdir()
    (out / "sub" / "inner").write_text("no")
    target = tmp_path / "elsewhere"
    target.write_text("secret")
    os.symlink(target, out / "link")
    os.mkfifo(out / "fifo")
    put(layout, "real.txt")
    ob = outbound(layout)
    assert ob.waiting() == (1, len(b"real.txt" * 3))
    claimed, failed = ob.scan()
    assert [c.name for c in claimed] == ["real.txt"]
    # a link or a FIFO can never be sent: failed/ with a reason (the link itself moved,
    # never followed; the FIFO never opened for a blocking read)
    assert sorted((f.name, f.seq) for f in failed) == [("fifo", None), ("link", None)]
    assert "symbolic link" in reason_of(layout, "link")
    assert "not a regular file" in reason_of(layout, "fifo")
    assert os.readlink(layout.failed_dir(CH) / "link") == str(target)
    assert target.read_text() == "secret"
    assert sorted(os.listdir(out)) == [".hidden", "sub"]
    assert os.listdir(out / "sub") == ["inner"]
    assert ob.waiting() == (0, 0)


def test_oversize_goes_to_failed_with_a_one_line_reason_and_no_seq(layout):
    put(layout, "big.bin", b"x" * 101)
    put(layout, "ok.bin", b"x" * 100, t=1)
    ob = outbound(layout, max_bytes=100)
    claimed, failed = ob.scan()
    assert [(c.seq, c.name) for c in claimed] == [(1, "ok.bin")]
    assert [(f.name, f.seq, f.size) for f in failed] == [("big.bin", None, 101)]
    assert failed[0].path == layout.failed_dir(CH) / "big.bin"
    assert failed[0].path.read_bytes() == b"x" * 101
    assert "101 bytes is over this channel's max_message_bytes (100)" in reason_of(layout,
                                                                                   "big.bin")


def test_over_the_peers_limit_goes_to_failed(layout):
    put(layout, "mid.bin", b"x" * 50)
    ob = outbound(layout, max_bytes=100)
    claimed, failed = ob.scan(peer_max=10)
    assert claimed == [] and failed[0].name == "mid.bin"
    assert "over the peer's max_message_bytes (10)" in reason_of(layout, "mid.bin")


def test_unreadable_file_goes_to_failed_via_the_fs_seam(layout):
    put(layout, "secret.bin")
    put(layout, "fine.bin", t=1)
    denied = str(layout.out_dir(CH) / "secret.bin")
    fs = FaultyFS(fault=lambda i, op, target: PermissionError(
        errno.EACCES, "Permission denied", target) if str(target) == denied else None)
    ob = outbound(layout, fs=fs)
    claimed, failed = ob.scan()
    assert [c.name for c in claimed] == ["fine.bin"]
    assert [(f.name, f.seq) for f in failed] == [("secret.bin", None)]
    assert "cannot read it: Permission denied" in reason_of(layout, "secret.bin")


SCAN_SCRIPT = """
import sys
from pathlib import Path
from linkd.spool import Outbound, SpoolLayout
layout = SpoolLayout(Path(sys.argv[1]), Path(sys.argv[2]), "europol")
ob = Outbound(layout, "data", 1 << 20, False)
ob.recover()
claimed, failed = ob.scan()
print([c.name for c in claimed], [(f.name, f.reason) for f in failed])
"""


def test_unreadable_file_goes_to_failed_for_real(layout):
    """A real EACCES: as root, CAP_DAC_OVERRIDE is dropped with setpriv."""
    path = put(layout, "secret.bin")
    put(layout, "fine.bin", t=1)
    os.chmod(path, 0)
    command = [sys.executable, "-c", SCAN_SCRIPT, str(layout.spool_dir), str(layout.state_dir)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root ignores file modes and setpriv is missing to drop "
                        "CAP_DAC_OVERRIDE (the FS-seam test covers EACCES)")
        caps = "-dac_override,-dac_read_search"
        command = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("['fine.bin'] [('secret.bin', 'cannot read it: "
                                     "Permission denied: check its permissions')]")
    assert "Permission denied" in reason_of(layout, "secret.bin")


def test_failed_names_get_tilde_n_and_never_overwrite(layout):
    failed_dir = layout.failed_dir(CH)
    (failed_dir / "r.txt").write_text("older failure")
    (failed_dir / "r.txt.reason").write_text("older reason\n")
    put(layout, "r.txt", b"y" * 200)
    _, failed = outbound(layout, max_bytes=100).scan()
    assert failed[0].path == failed_dir / "r~1.txt"
    assert (failed_dir / "r.txt").read_text() == "older failure"
    assert (failed_dir / "r.txt.reason").read_text() == "older reason\n"
    assert "over this channel" in reason_of(layout, "r~1.txt")


def test_resolve_deletes_in_seq_order_and_persists_the_state_first(layout):
    for i in range(3):
        put(layout, f"m{i}", t=i)
    fs = FaultyFS()
    ob = outbound(layout, fs=fs)
    ob.scan()
    mark = len(fs.trace)
    got = ob.resolve([2, 1])
    assert [(r.item.seq, r.changed) for r in got] == [(1, False), (2, False)]
    ops = fs.trace[mark:]
    # each file goes, then its record (renamed to a spare dot-name for the next claim
    # while files are queued, see test_records_of_resolved_claims_are_reused)
    removed = [os.path.basename(t) for op, t in ops if op in ("unlink", "rename")]
    first = next(i for i, (op, _) in enumerate(ops) if op in ("unlink", "rename"))
    replace = next(i for i, (op, t) in enumerate(ops) if op == "replace" and t.endswith(".json"))
    assert replace < first
    assert removed == ["1.data", ".spare-0", "2.data", ".spare-1"]
    assert json.loads(layout.state_file_out(CH).read_text()) == {"acked": 2, "next": 4,
                                                                 "checked": 4}
    assert [c.seq for c in ob.pending()] == [3]
    assert ob.resolve([2]) == [] and ob.resolve([1]) == []
    assert sorted(n for n in os.listdir(layout.queue_dir(CH)) if not n.startswith(".")) == \
        ["3.data", "3.meta"]
    ob.resolve([3])
    assert os.listdir(layout.queue_dir(CH)) == []          # drained: no spare is left


def test_records_of_resolved_claims_are_reused(layout):
    """Issue 13: a claim writes its .meta into the file of a resolved claim's record
    (kept under a dot-name while files are queued) instead of creating a new one;
    on ext4 without a journal every new inode is searched for past the recently
    freed ones, which made record churn the largest kernel cost of a backlog."""
    for i in range(5):
        put(layout, f"m{i}", t=i)
    fs = FaultyFS()
    ob = outbound(layout, fs=fs)
    ob.scan(limit=3)
    ob.resolve([1, 2])                          # seq 3 stays queued: the spares are kept
    mark = len(fs.trace)
    got, _ = ob.scan()
    assert [c.seq for c in got] == [4, 5]
    ops = fs.trace[mark:]
    created = [os.path.basename(t) for op, t in ops if op == "open" and t.endswith(".meta")]
    assert created == []                                    # no new record file
    assert [os.path.basename(t) for op, t in ops if op == "rename"] == ["4.meta", "5.meta"]
    for c in got:
        meta = json.loads((layout.queue_dir(CH) / f"{c.seq}.meta").read_text())
        assert (meta["seq"], meta["name"]) == (c.seq, c.name)
    fresh = outbound(layout)                     # a restart finds exactly the queue
    assert [(c.seq, c.name) for c in fresh.pending()] == [(3, "m2"), (4, "m3"), (5, "m4")]
    assert not [n for n in os.listdir(layout.queue_dir(CH)) if n.startswith(".")]


def test_a_reused_record_is_written_over_and_cut_not_truncated_first(layout):
    """A spare record is written over from the start and cut to its new length, not
    opened with O_TRUNC: on ext4 that freed the record's block for the write to
    allocate another (35-40 vs 8-13 us of CPU per record measured). A longer old
    record must leave none of its bytes behind."""
    long = "a-much-longer-name-than-the-next-ones-" * 4
    for i in range(3):
        put(layout, f"{long}{i}", t=i)
    fs = FaultyFS()
    ob = outbound(layout, fs=fs)
    ob.scan()
    ob.resolve([1, 2])                          # two long records become spares
    flags: list[int] = []
    real_open = fs.open

    def open_(path, how, mode=0o600):
        if os.path.basename(str(path)).startswith(".spare-"):
            flags.append(how)
        return real_open(path, how, mode)
    fs.open = open_
    for i in range(2):
        put(layout, f"s{i}", t=10 + i)
    mark = len(fs.trace)
    got, _ = ob.scan()
    assert [c.name for c in got] == ["s0", "s1"]
    assert len(flags) == 2 and not any(f & os.O_TRUNC for f in flags)
    assert [op for op, t in fs.trace[mark:] if op == "truncate"] == ["truncate"] * 2
    for c in got:
        raw = (layout.queue_dir(CH) / f"{c.seq}.meta").read_bytes()
        assert raw.count(b"\n") == 1 and raw.endswith(b"\n")      # nothing of the old
        meta = json.loads(raw)
        assert (meta["seq"], meta["name"], meta["size"]) == (c.seq, c.name, c.size)
    fresh = outbound(layout)
    assert [c.name for c in fresh.pending()] == [f"{long}2", "s0", "s1"]


def test_a_spare_is_not_written_into_before_its_rename_is_durable(layout):
    """A resolve that fails midway (ENOMEM: the channel stays usable) has renamed a
    record to a spare without the queue folder's fsync: the spare must not be written
    into in place (a power cut could then leave a resolved seq's .meta holding another
    record beside its .data). Found by review."""
    for i in range(3):
        put(layout, f"m{i}", t=i)
    fs = FaultyFS(fail_at=("unlink", 1), error=errno.ENOMEM)
    ob = outbound(layout, fs=fs)
    ob.scan()
    with pytest.raises(SpoolError):
        ob.resolve([1, 2])          # 1.data gone, 1.meta a spare, then 2.data: ENOMEM
    assert ob.usable
    assert ".spare-0" in os.listdir(layout.queue_dir(CH))
    put(layout, "next", t=5)
    mark = len(fs.trace)
    got, _ = ob.scan()
    assert [c.name for c in got] == ["next"]
    assert not [t for op, t in fs.trace[mark:] if ".spare-" in t]
    fresh = outbound(layout)        # recovery deletes the unused spare
    assert not [n for n in os.listdir(layout.queue_dir(CH)) if n.startswith(".")]
    assert [c.name for c in fresh.pending()] == ["m1", "m2", "next"]


def test_a_claim_into_spares_killed_at_every_step_loses_and_mislabels_nothing(tmp_path):
    """The crash sweeps never reuse a spare record nor take the batch's syncfs path
    (their queue drains between claims). Here: 12 files queued, 10 resolved (spares
    kept, two files still queued), then 9 more claimed into the spares in one batch
    (syncfs where the kernel reports its errors), the process killed at each of that
    claim's steps in turn. After the restart's recovery every file is in out/ or
    queued under a record naming it, with its size and SHA-256, exactly once."""
    from spoolkit import Crash
    first = {f"a{i:02d}": f"first {i}".encode() * (i + 1) for i in range(12)}
    second = {f"b{i:02d}": f"second {i}".encode() * (i + 2) for i in range(9)}
    n, total = 0, None
    while total is None or n < total:
        lay = SpoolLayout(tmp_path / f"s{n}" / "spool", tmp_path / f"s{n}" / "state",
                          "europol")
        lay.create([CH], archive_sent=False)
        for t, (name, data) in enumerate(first.items()):
            put(lay, name, data, t=t)
        fs = FaultyFS(sync=False)
        ob = outbound(lay, fs=fs)
        ob.scan()
        ob.resolve(list(range(1, 11)))
        for t, (name, data) in enumerate(second.items()):
            put(lay, name, data, t=100 + t)
        fs.crash_at = fs.calls + n
        try:
            ob.scan()
            total = n                   # this many steps: the claim ran to its end
        except Crash:
            pass
        after = Outbound(lay, CH, 1 << 20, False)
        after.recover()
        claimed, _ = after.scan()
        queued = {c.name: c for c in after.pending()}
        assert sorted(queued) == ["a10", "a11", *second], n
        assert len(after.pending()) == len(queued), n              # each exactly once
        for name, c in queued.items():
            data = second.get(name, first.get(name))
            assert (c.size, c.sha256) == (len(data), hashlib.sha256(data).hexdigest()), n
            assert (lay.queue_dir(CH) / f"{c.seq}.data").read_bytes() == data, n
        assert os.listdir(lay.out_dir(CH)) == [], n
        n += 1
    assert total is not None and total > 30
    ops = [(op, os.path.basename(t)) for op, t in fs.trace]   # the run that completed
    assert sum(1 for op, _ in ops if op == "truncate") == 9       # each spare cut to length
    assert sum(1 for op, t in ops if op == "open" and t.startswith(".spare-")) == 9
    assert ("syncfs" in [op for op, _ in ops]) or not _syncfs_ok()


def _syncfs_ok() -> bool:
    from linkd.spool import inbound as _inbound
    return _inbound.SYNCFS_OK


def test_the_peers_committed_seq_moves_numbering_forward_but_resolves_nothing(layout):
    put(layout, "waiting")
    ob = outbound(layout)
    [item] = ob.scan()[0]
    assert ob.raise_floor(41) is True and ob.next_seq == 42
    assert ob.raise_floor(41) is False
    assert ob.acked == 41 and ob.pending() == [item]  # only a matching ack resolves
    assert ob.resolve([41]) == [] and ob.pending() == [item]
    put(layout, "next", t=1)
    assert [c.seq for c in ob.scan()[0]] == [42]
    assert outbound(layout).next_seq == 43           # durable


def test_archive_sent_moves_to_sent_with_tilde_n(layout):
    sent = layout.sent_dir(CH)
    (sent / "keep.txt").write_text("an earlier keep.txt")
    put(layout, "keep.txt", b"new")
    ob = outbound(layout, archive_sent=True)
    ob.scan()
    [done] = ob.resolve([1])
    assert (sent / "keep.txt").read_text() == "an earlier keep.txt"
    assert (sent / "keep~1.txt").read_bytes() == b"new"
    assert os.listdir(layout.queue_dir(CH)) == []


def test_a_peer_whose_committed_went_back_is_remembered_once(layout):
    for i in range(3):
        put(layout, f"m{i}", t=i)
    ob = outbound(layout)
    ob.scan()
    ob.resolve([1, 2, 3])
    assert ob.acked == 3
    assert ob.raise_floor(1) is True         # the peer lost state: remember the lower figure
    assert (ob.acked, ob.next_seq) == (1, 4)
    assert ob.raise_floor(1) is False
    assert outbound(layout).acked == 1


def test_a_reported_committed_seq_counts_even_without_an_ack(layout):
    """The peer reported committed 148 in a hello but its acks never reached us (the
    session ended first); later it reports 0 (its state was lost or restored): that is
    a regression too, so `acked` follows the reports (campaign seed 1733724005 found a
    file delivered twice with no duplicate_possible)."""
    ob = outbound(layout)
    assert ob.raise_floor(148) is True and ob.acked == 148
    assert outbound(layout).acked == 148             # durable
    assert ob.raise_floor(0) is True and ob.acked == 0


def test_configure_applies_reloaded_limits_to_the_next_pick_up_and_resolve(layout):
    put(layout, "a", b"x" * 150)
    ob = outbound(layout, max_bytes=100)
    assert [f.name for f in ob.scan()[1]] == ["a"]
    ob.configure(200, archive_sent=True)
    put(layout, "b", b"y" * 150, t=1)
    [item] = ob.scan()[0]
    assert item.name == "b"
    ob.resolve([item.seq])
    assert (layout.sent_dir(CH) / "b").read_bytes() == b"y" * 150


def test_fail_moves_a_claimed_file_with_tilde_n_and_keeps_its_number(layout):
    (layout.failed_dir(CH) / "x.bin").write_text("old")
    for i, name in enumerate(["a", "x.bin", "c"]):
        put(layout, name, t=i)
    ob = outbound(layout)
    a, x, c = ob.scan()[0]
    f = ob.fail(x, "the peer refused it:\nname taken")
    assert (f.seq, f.name, f.path) == (2, "x.bin", layout.failed_dir(CH) / "x~1.bin")
    assert f.path.read_bytes() == b"x.bin" * 3
    assert reason_of(layout, "x~1.bin") == "the peer refused it: name taken\n"
    assert [p.seq for p in ob.pending()] == [1, 3]
    assert sorted(os.listdir(layout.queue_dir(CH))) == ["1.data", "1.meta", "3.data",
                                                        "3.meta"]
    with pytest.raises(SpoolError, match="not pending"):
        ob.fail(x, "again")
    ob2 = outbound(layout)                         # the failure survives a restart
    assert [p.seq for p in ob2.pending()] == [1, 3]
    put(layout, "d", t=9)
    assert [c.seq for c in ob2.scan()[0]] == [4]   # 2 is never reused
    assert [r.item.seq for r in ob2.resolve([1])] == [1]
    assert [r.item.seq for r in ob2.resolve([2, 3, 4])] == [3, 4]
    assert os.listdir(layout.queue_dir(CH)) == []


def test_failing_the_last_claim_keeps_its_number_used(layout):
    put(layout, "only")
    ob = outbound(layout)
    [item] = ob.scan()[0]
    ob.fail(item, "refused")
    assert ob.next_seq == 2
    put(layout, "next", t=1)
    # after a restart too: seq 1 was logged as failed, it never names another file
    assert [c.seq for c in outbound(layout).scan()[0]] == [2]


def test_a_claim_without_its_record_goes_to_failed_without_blocking(layout):
    for i in range(3):
        put(layout, f"m{i}", t=i)
    outbound(layout).scan()
    (layout.queue_dir(CH) / "2.meta").write_text("{not json")
    ob = Outbound(layout, CH, 1 << 20, False)
    problems = ob.recover()
    assert len(problems) == 1 and "seq 2" in problems[0] and "missing or unreadable" in problems[0]
    assert [p.seq for p in ob.pending()] == [1, 3]
    # under its own name where the file system keeps user xattrs, else seq-2
    name = "m1" if xattrs_work(layout.queue_dir(CH)) else "seq-2"
    failed = layout.failed_dir(CH) / name
    assert failed.read_bytes() == b"m1" * 3
    assert "claim record" in reason_of(layout, name)
    assert sorted(os.listdir(layout.queue_dir(CH))) == ["1.data", "1.meta", "3.data", "3.meta"]


def xattrs_work(folder: Path) -> bool:
    probe = folder / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.linkd.test", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def test_recover_removes_a_cut_claim_and_orphan_temporaries(layout):
    put(layout, "a")
    queue = layout.queue_dir(CH)
    (queue / "1.meta").write_text('{"seq": 1}')    # claim cut before rename
    (queue / ".1.meta.tmp").write_text("half")
    (layout.failed_dir(CH) / ".x.reason.tmp").write_text("half")
    ob = outbound(layout)
    assert os.listdir(queue) == [] and os.listdir(layout.failed_dir(CH)) == []
    assert [c.seq for c in ob.scan()[0]] == [1]


def test_unknown_files_in_the_queue_are_reported_and_left_alone(layout):
    (layout.queue_dir(CH) / "stray.txt").write_text("someone put this here")
    ob = Outbound(layout, CH, 1 << 20, False)
    [problem] = ob.recover()
    assert "stray.txt" in problem and "left alone" in problem
    assert (layout.queue_dir(CH) / "stray.txt").exists() and ob.pending() == []


def test_corrupt_state_is_moved_aside_and_numbering_continues_above_the_queue(layout):
    for i, name in enumerate("abc"):
        put(layout, name, t=i)
    ob = outbound(layout)
    ob.scan()
    ob.resolve([1])
    layout.state_file_out(CH).write_text('{"next": 4, trailing garbage')
    ob2 = Outbound(layout, CH, 1 << 20, False)
    [problem] = ob2.recover()
    assert "moved to" in problem and "nothing is lost" in problem
    assert [p.seq for p in ob2.pending()] == [2, 3] and ob2.next_seq == 4
    assert any(n.startswith("out.json.corrupt-") for n in
               os.listdir(layout.state_file_out(CH).parent))


def test_operations_before_recover_or_after_an_error_are_refused(layout):
    ob = Outbound(layout, CH, 1 << 20, False)
    with pytest.raises(SpoolError, match="recover"):
        ob.scan()
    fs = FaultyFS()
    ob = Outbound(layout, CH, 1 << 20, False, fs=fs)
    ob.recover()
    fs.fail_at = ("fsync_dir", fs.op_calls.get("fsync_dir", 0))
    put(layout, "a")
    with pytest.raises(SpoolError, match="Input/output error"):
        ob.scan()
    assert not ob.usable
    for refused in (lambda: ob.resolve([1]), lambda: ob.scan(), lambda: ob.raise_floor(5)):
        with pytest.raises(SpoolError, match="recover"):
            refused()
    ob.recover()                                    # the cut claim is undone...
    assert ob.pending() == [] and ob.waiting() == (1, 3)
    assert [c.seq for c in ob.scan()[0]] == [1]     # ...and its number used again


def test_file_removed_between_examine_and_claim_leaves_no_record(layout):
    # (revision 1 also promised that no number is skipped; seqs are now labels,
    # only increasing: the vanished file's number stays unused)
    for i, name in enumerate(["a", "b", "c"]):
        put(layout, name, t=i)

    class Vanishing(FaultyFS):
        def rename_noreplace(self, src, dst):
            if str(src).endswith("/b"):
                os.unlink(src)                      # someone removed b after we hashed it
            super().rename_noreplace(src, dst)

    ob = outbound(layout, fs=Vanishing())
    claimed, failed = ob.scan()
    assert [c.name for c in claimed] == ["a", "c"] and failed == []
    assert claimed[0].seq < claimed[1].seq and ob.next_seq > claimed[1].seq
    assert sorted(os.listdir(layout.queue_dir(CH))) == sorted(
        f"{c.seq}.{k}" for c in claimed for k in ("data", "meta"))
    assert [p.seq for p in outbound(layout).pending()] == [c.seq for c in claimed]


def test_queue_stats_stay_exact_through_claim_resolve_fail_renumber_and_restart(layout):
    """queue_stats() is O(1) (kept up to date, not recounted per batch: issue 13) and
    must agree with a full count after every kind of change."""
    def full(ob):
        pending = ob.pending()
        waiting = ob.waiting()
        return (len(pending), sum(i.size for i in pending),
                min((i.claimed_at for i in pending), default=None), *waiting)

    for i in range(6):
        put(layout, f"f{i}.txt", b"x" * (10 + i), t=i)
    ob = outbound(layout)
    found = ob.examine(limit=2)
    assert ob.queue_stats()[3:] == (4, 12 + 13 + 14 + 15)   # still waiting in out/
    ob.claim(found.ready)
    assert ob.queue_stats() == full(ob)
    claimed, _ = ob.scan()
    assert ob.queue_stats() == full(ob) and ob.queue_stats()[:2] == (6, sum(range(10, 16)))
    items = ob.pending()
    ob.resolve([items[0].seq])
    assert ob.queue_stats() == full(ob)
    ob.fail(items[1], "test")
    assert ob.queue_stats() == full(ob)
    ob.renumber(items[2], 100)              # its claim time is now out of seq order
    assert ob.queue_stats() == full(ob)
    ob.resolve([i.seq for i in ob.pending()[:-1]])
    assert ob.queue_stats() == full(ob)
    again = outbound(layout)                # a restart reads the queue from disk
    assert again.queue_stats() == full(again) and again.queue_stats()[0] == 1


def test_a_claim_batch_shares_one_syncfs_and_the_meta_precedes_every_rename(layout,
                                                                            monkeypatch):
    """Issue 13: a batch of >= SYNCFS_MIN claims writes every .meta, syncs the file
    system once (no fsync per .meta) and fsyncs queue/ before the first rename, so a
    claimed file never exists without its durable record. Small batches keep their
    per-file fsync."""
    from linkd.spool import inbound as inbound_module
    monkeypatch.setattr(inbound_module, "SYNCFS_OK", True)
    for i in range(inbound_module.SYNCFS_MIN):
        put(layout, f"f{i}.txt", t=i)
    fs = FaultyFS()
    ob = outbound(layout, fs=fs)
    fs.trace.clear()
    claimed, _ = ob.scan()
    assert len(claimed) == inbound_module.SYNCFS_MIN
    ops = [op for op, _ in fs.trace]
    first_rename = ops.index("rename_noreplace")
    assert ops[:first_rename].count("syncfs") == 1 and "fsync" not in ops
    assert ops[first_rename - 1] == "fsync_dir"
    assert ops.count("rename_noreplace") == len(claimed)
    put(layout, "one.txt", t=99)
    fs.trace.clear()
    ob.scan()
    assert [op for op, _ in fs.trace].count("fsync") == 1 and \
        "syncfs" not in [op for op, _ in fs.trace]


def test_out_of_descriptors_after_a_rename_leaves_nothing_unsent(layout):
    """Found by the operator campaign under a descriptor squeeze: a claim that ran
    out of descriptors (EMFILE: "retry later") after moving a file into queue/ left it
    there, under a seq the next claim skipped, never sent. Now the claim marks the
    outbound for recovery, which adopts the file."""
    from linkd.spool import ResourceBusy

    def emfile(i, op, target):
        if op == "fsync_dir" and str(target).endswith("/out/data") and not fired:
            fired.append(True)
            return OSError(errno.EMFILE, "Too many open files", str(target))
        return None
    fired: list[bool] = []
    ob = outbound(layout, fs=FaultyFS(fault=emfile, sync=False))
    put(layout, "a.txt")
    with pytest.raises(ResourceBusy):
        ob.scan()
    assert fired
    if not ob.usable:               # as pick-up does (net/peer.py): recover first
        assert ob.recover() == []
    put(layout, "b.txt", t=1)
    ob.scan()
    assert [(i.seq, i.name) for i in ob.pending()] == [(1, "a.txt"), (2, "b.txt")]


def test_content_differs_reads_what_inode_size_and_mtime_cannot_tell(layout):
    """The sender's second look after the peer refused a checksum (net/sender.py).
    Items read back after a restart: the ctime noted at the claim is gone with it."""
    put(layout, "a.bin", b"A" * 5000)
    put(layout, "b.bin", b"B" * 5000)
    put(layout, "c.bin", b"C" * 5000)
    outbound(layout).scan()
    ob = outbound(layout)
    assert ob.recover() == []
    a, b, c = ob.pending()
    assert not ob.content_differs(a)                    # as claimed
    st = os.stat(b.path)
    with open(b.path, "r+b") as fh:                     # same size, mtime put back
        fh.seek(100)
        fh.write(b"x")
    os.utime(b.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not ob.changed(b) and ob.content_differs(b)
    os.unlink(c.path)                                   # gone: changed
    assert ob.content_differs(c)


def test_changed_sees_a_rewrite_that_put_the_mtime_back_by_the_claims_ctime(layout):
    put(layout, "a.bin", b"A" * 5000)
    ob = outbound(layout)
    (a,) = ob.scan()[0]
    assert not ob.changed(a)
    st = os.stat(a.path)
    with open(a.path, "r+b") as fh:                     # same size, mtime put back
        fh.write(b"x")
    os.utime(a.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ob.changed(a)


def test_content_differs_does_not_call_an_unreadable_file_changed(layout):
    """EIO, EMFILE, EACCES... prove nothing about the content: the ordinary retry
    meets the error again when it opens the file, and handles it as such."""
    put(layout, "a.bin", b"A" * 5000)
    ob = outbound(layout)
    (a,) = ob.scan()[0]
    real_open = ob.fs.open
    for err in (errno.EIO, errno.EMFILE, errno.EACCES, errno.ENOENT, errno.ELOOP):
        def failing_open(path, flags, *rest, err=err):
            if os.fspath(path) == os.fspath(a.path):
                raise OSError(err, os.strerror(err), os.fspath(path))
            return real_open(path, flags, *rest)
        ob.fs.open = failing_open
        # gone, or a symlink now: it differs; anything else proves nothing
        assert ob.content_differs(a) is (err in (errno.ENOENT, errno.ELOOP)), \
            errno.errorcode[err]
    ob.fs.open = real_open
    assert not ob.content_differs(a)
