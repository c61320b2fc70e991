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

import linkd
from linkd.errors import SpoolError
from linkd.spool import Outbound, SpoolLayout
from linkd.spool.testing import FaultyFS, drop

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


def put(layout, name, data=None, t=0):
    return drop(layout.out_dir(CH), name, name.encode() * 3 if data is None else data,
                mtime_ns=1_700_000_000_000_000_000 + t)


def reason_of(layout, name):
    text = (layout.failed_dir(CH) / f"{name}.reason").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 1, repr(text)
    return text


def test_claims_in_mtime_then_name_order_with_contiguous_seqs(layout):
    put(layout, "c.txt", t=1)
    put(layout, "b.txt", t=2)
    put(layout, "a.txt", t=2)
    put(layout, "z.txt", t=0)
    ob = outbound(layout)
    claimed, failed = ob.scan()
    assert [(c.seq, c.name) for c in claimed] == [(1, "z.txt"), (2, "c.txt"), (3, "a.txt"),
                                                  (4, "b.txt")]
    assert failed == [] and ob.pending() == claimed
    assert os.listdir(layout.out_dir(CH)) == []
    for c in claimed:
        data = c.name.encode() * 3
        assert c.size == len(data) and c.sha256 == hashlib.sha256(data).hexdigest()
        with ob.open(c) as f:
            assert f.read() == data
        meta = json.loads((layout.claimed_dir(CH) / f"{c.seq:012d}.meta").read_text())
        assert meta == {"seq": c.seq, "name": c.name, "size": c.size, "sha256": c.sha256,
                        "claimed_at": c.claimed_at}


def test_numbering_continues_across_restarts_and_acks(layout):
    put(layout, "a")
    ob = outbound(layout)
    ob.scan()
    put(layout, "b", t=1)
    ob2 = outbound(layout)                       # a restart: nothing acked yet
    assert [c.seq for c in ob2.pending()] == [1]
    assert [c.seq for c in ob2.scan()[0]] == [2]
    assert [c.seq for c in ob2.ack(2)] == [1, 2]
    put(layout, "c", t=2)
    ob3 = outbound(layout)
    assert ob3.last_done == 2 and ob3.pending() == []
    assert [c.seq for c in ob3.scan()[0]] == [3]


def test_dot_files_subfolders_and_symlinks_are_ignored(layout, tmp_path):
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
    assert [c.name for c in claimed] == ["real.txt"] and failed == []
    assert sorted(os.listdir(out)) == [".hidden", "fifo", "link", "sub"]
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
    assert result.stdout.strip() == \
        "['fine.bin'] [('secret.bin', 'cannot read it: Permission denied')]"
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


def test_ack_deletes_in_seq_order_and_persists_last_done_first(layout):
    for i in range(3):
        put(layout, f"m{i}", t=i)
    fs = FaultyFS()
    ob = outbound(layout, fs=fs)
    ob.scan()
    mark = len(fs.trace)
    assert [c.seq for c in ob.ack(2)] == [1, 2]
    ops = fs.trace[mark:]
    first_unlink = next(i for i, (op, _) in enumerate(ops) if op == "unlink")
    replace = next(i for i, (op, t) in enumerate(ops) if op == "replace" and t.endswith(".json"))
    assert replace < first_unlink
    assert json.loads(layout.state_file_out(CH).read_text()) == {"last_done": 2}
    assert [c.seq for c in ob.pending()] == [3]
    assert ob.ack(2) == [] and ob.ack(1) == []
    assert sorted(os.listdir(layout.claimed_dir(CH))) == ["000000000003.data",
                                                         "000000000003.meta"]


def test_ack_beyond_everything_moves_numbering_forward(layout):
    ob = outbound(layout)
    assert ob.ack(41) == [] and ob.last_done == 41
    put(layout, "next")
    assert [c.seq for c in ob.scan()[0]] == [42]


def test_archive_sent_moves_to_sent_with_tilde_n(layout):
    sent = layout.sent_dir(CH)
    (sent / "keep.txt").write_text("an earlier keep.txt")
    put(layout, "keep.txt", b"new")
    ob = outbound(layout, archive_sent=True)
    ob.scan()
    [done] = ob.ack(1)
    assert (sent / "keep.txt").read_text() == "an earlier keep.txt"
    assert (sent / "keep~1.txt").read_bytes() == b"new"
    assert os.listdir(layout.claimed_dir(CH)) == []


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
    assert ob.last_done == 0                       # seq 1 is still pending below it
    assert [p.seq for p in ob.pending()] == [1, 3]
    ob2 = outbound(layout)                         # the tombstone survives a restart
    assert [p.seq for p in ob2.pending()] == [1, 3]
    put(layout, "d", t=9)
    assert [c.seq for c in ob2.scan()[0]] == [4]   # 2 is never reused
    assert [p.seq for p in ob2.ack(1)] == [1]
    assert ob2.last_done == 2                      # passes over the failed seq
    assert [p.seq for p in ob2.ack(4)] == [3, 4]
    assert os.listdir(layout.claimed_dir(CH)) == []


def test_failing_the_last_claim_keeps_its_number_used(layout):
    put(layout, "only")
    ob = outbound(layout)
    [item] = ob.scan()[0]
    ob.fail(item, "refused")
    assert ob.last_done == 1
    put(layout, "next", t=1)
    assert [c.seq for c in outbound(layout).scan()[0]] == [2]


def test_a_claim_without_its_record_goes_to_failed_without_blocking(layout):
    for i in range(3):
        put(layout, f"m{i}", t=i)
    outbound(layout).scan()
    (layout.claimed_dir(CH) / "000000000002.meta").write_text("{not json")
    ob = Outbound(layout, CH, 1 << 20, False)
    problems = ob.recover()
    assert len(problems) == 1 and "seq 2" in problems[0] and "missing or unreadable" in problems[0]
    assert [p.seq for p in ob.pending()] == [1, 3]
    failed = layout.failed_dir(CH) / "000000000002.data"
    assert failed.read_bytes() == b"m1" * 3
    assert "claim record" in reason_of(layout, "000000000002.data")


def test_recover_removes_a_cut_claim_and_orphan_temporaries(layout):
    put(layout, "a")
    claimed = layout.claimed_dir(CH)
    (claimed / "000000000001.meta").write_text('{"seq": 1}')    # claim cut before rename
    (claimed / ".000000000001.meta.tmp").write_text("half")
    ob = outbound(layout)
    assert os.listdir(claimed) == []
    assert [c.seq for c in ob.scan()[0]] == [1]


def test_corrupt_last_done_is_moved_aside_and_salvaged(layout):
    put(layout, "a")
    ob = outbound(layout)
    ob.scan()
    ob.ack(1)
    layout.state_file_out(CH).write_text('{"last_done": 1, trailing garbage')
    ob2 = Outbound(layout, CH, 1 << 20, False)
    [problem] = ob2.recover()
    assert "moved to" in problem and ob2.last_done == 1
    assert any(n.startswith("data.json.corrupt-") for n in
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
    with pytest.raises(SpoolError, match="recover"):
        ob.ack(1)
    ob.recover()                                    # the cut claim is undone...
    assert ob.pending() == [] and ob.waiting() == (1, 3)
    assert [c.seq for c in ob.scan()[0]] == [1]     # ...and its number used again


def test_file_removed_before_rename_does_not_skip_a_number(layout, monkeypatch):
    for i, name in enumerate(["a", "b", "c"]):
        put(layout, name, t=i)

    class Vanishing(FaultyFS):
        def rename(self, src, dst):
            if str(src).endswith("/b"):
                os.unlink(src)                      # someone removed b after we hashed it
            super().rename(src, dst)

    ob = outbound(layout, fs=Vanishing())
    claimed, _ = ob.scan()
    assert [(c.seq, c.name) for c in claimed] == [(1, "a"), (2, "c")]
    assert sorted(os.listdir(layout.claimed_dir(CH))) == [
        "000000000001.data", "000000000001.meta", "000000000002.data", "000000000002.meta"]


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
