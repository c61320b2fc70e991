"""Issue 13: a long queue costs a bounded start-up and little memory.

Outbound keeps only a window of the lowest queued seqs loaded (Claimed objects)
and a compact index of the rest; recovery looks at names only below the
checkpoint (`checked` in out.json) and reads the records of the seqs above it
(what a crash can have cut) and of the window. Here: the number of claim
records recovery opens for a queue far longer than the window (counted, not
timed), the queue read back lazily in order and complete, the counts, crash
leftovers deep in the queue found from the listing alone, a damaged record
found when the window gets to it, and the index itself against a model. The
crash-point sweeps (test_spool_crash.py) and the model (test_spool_model.py)
also run with a tiny window and checkpoint interval.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from array import array

import pytest
from spoolkit import FaultyFS

from linkd.spool import Outbound, SpoolLayout
from linkd.spool.outbound import CLAIM_BATCH
from linkd.spool.queue_index import QueueIndex, SeqRuns

CH = "data"


@pytest.fixture
def layout(tmp_path):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "europol")
    layout.create([CH], archive_sent=False)
    return layout


@pytest.fixture
def small(monkeypatch):
    """A window of 8 items and a checkpoint every 50 claims."""
    monkeypatch.setattr(Outbound, "WINDOW", 8)
    monkeypatch.setattr(Outbound, "CHECKPOINT_EVERY", 50)


def new_outbound(layout) -> Outbound:
    return Outbound(layout, CH, 1 << 20, False, fs=FaultyFS(sync=False))


def fill_queue(layout, n: int, size=lambda i: 10 + i % 7) -> list:
    """Claim n files (q000000 ... in arrival order) through Outbound, as pick-up does."""
    out = layout.out_dir(CH)
    for i in range(n):
        (out / f"q{i:06d}").write_bytes(b"x" * size(i))
        os.utime(out / f"q{i:06d}", ns=(i, i))
    ob = new_outbound(layout)
    ob.recover()
    claimed, failed = ob.scan()
    assert not failed and len(claimed) == n
    return claimed


class CountOpens:
    """Counts os.open of claim records (.meta) while installed."""

    def __init__(self, monkeypatch) -> None:
        self.metas: list[str] = []
        real = os.open

        def counting(path, flags, *args, **kwargs):
            if os.fspath(path).endswith(".meta"):
                self.metas.append(os.path.basename(os.fspath(path)))
            return real(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", counting)


def test_recovery_reads_a_bounded_number_of_claim_records(layout, small, monkeypatch):
    n = 2000
    claimed = fill_queue(layout, n)
    state = json.loads(layout.state_file_out(CH).read_text())
    assert state["checked"] > n - Outbound.CHECKPOINT_EVERY - CLAIM_BATCH  # recorded as it went

    opens = CountOpens(monkeypatch)
    ob = new_outbound(layout)
    assert ob.recover() == []
    # the tail since the last checkpoint (it may hold a cut claim), then the window
    bound = Outbound.CHECKPOINT_EVERY + CLAIM_BATCH + Outbound.WINDOW
    assert len(opens.metas) <= bound, f"recovery opened {len(opens.metas)} of {n} records"
    assert ob.queue_stats()[0] == n and ob.first_seq() == 1
    assert [i.seq for i in ob.head(3)] == [1, 2, 3]
    # recovery recorded the checkpoint: the next start reads only the window
    opens.metas.clear()
    again = new_outbound(layout)
    again.recover()
    assert len(opens.metas) == Outbound.WINDOW
    assert again.pending() == claimed          # nothing lost, changed or reordered


def test_the_window_moves_through_the_whole_queue_in_order(layout, small):
    claimed = fill_queue(layout, 300)
    ob = new_outbound(layout)
    ob.recover()
    seen, nxt = [], 1
    while (item := ob.next_pending(nxt)) is not None:
        window = ob.head(100)
        assert len(window) <= Outbound.WINDOW and window[0] is item
        batch = [i.seq for i in window[:5]]
        seen += [r.item for r in ob.resolve(batch)]
        nxt = batch[-1] + 1
        assert ob.queue_stats()[0] == 300 - len(seen)
    assert seen == claimed and ob.pending() == [] and ob.queue_stats()[:2] == (0, 0)
    assert os.listdir(layout.queue_dir(CH)) == []


def test_counts_include_the_unread_queue_once_measured(layout, small):
    claimed = fill_queue(layout, 200)
    total = sum(c.size for c in claimed)
    ob = new_outbound(layout)
    ob.recover()
    count, size, oldest, _, _ = ob.queue_stats()
    assert count == 200 and size < total and ob.unmeasured > 0
    assert oldest == claimed[0].claimed_at
    while ob.measure(limit=7):
        pass
    assert ob.queue_stats()[:2] == (200, total)
    ob.resolve([c.seq for c in claimed[:20]])
    ob.fail(claimed[150], "refused")                     # deep in the index
    ob.renumber(claimed[100], 10_000)                    # deep in the index, to the top
    left = [c for c in claimed[20:] if c is not claimed[150]]
    assert ob.queue_stats()[:2] == (len(left), sum(c.size for c in left))
    assert [p.name for p in ob.pending()] == \
        [c.name for c in left if c is not claimed[100]] + [claimed[100].name]


def test_crash_leftovers_deep_in_the_queue_are_found_from_the_listing(layout, small,
                                                                      monkeypatch):
    claimed = fill_queue(layout, 400)
    q = layout.queue_dir(CH)
    os.unlink(q / "100.data")           # a resolve cut after the file went: a lone .meta
    (q / "200.fail").write_text(json.dumps({"seq": 200, "name": claimed[199].name,
                                            "reason": "refused"}))     # a cut failure
    opens = CountOpens(monkeypatch)
    ob = new_outbound(layout)
    problems = ob.recover()
    assert len(opens.metas) <= Outbound.CHECKPOINT_EVERY + CLAIM_BATCH + Outbound.WINDOW + 2
    assert problems == [f"seq 200: finished moving it to {layout.failed_dir(CH)}/q000199"]
    assert not (q / "100.meta").exists() and not (q / "200.data").exists()
    assert ob.queue_stats()[0] == 398
    assert [p.seq for p in ob.pending()] == [s for s in range(1, 401) if s not in (100, 200)]


def test_a_damaged_record_is_dealt_with_when_the_window_reaches_it(layout, small):
    claimed = fill_queue(layout, 120)
    q = layout.queue_dir(CH)
    (q / "60.meta").write_text("{ damaged")
    ob = new_outbound(layout)
    assert ob.recover() == []           # not read at start-up: it is deep in the queue
    assert (q / "60.data").exists() and ob.queue_stats()[0] == 120
    got = []
    while items := ob.head(4):
        got += [r.item.seq for r in ob.resolve([i.seq for i in items])]
    assert got == [s for s in range(1, 121) if s != 60]
    assert len(ob.late_problems) == 1 and "seq 60" in ob.late_problems[0] \
        and "missing or unreadable" in ob.late_problems[0]
    failed = layout.failed_dir(CH)
    assert (failed / claimed[59].name).read_bytes() == b"x" * claimed[59].size  # (xattr name)
    assert os.listdir(q) == []


def test_renumbering_the_whole_tail_reaches_beyond_the_window(layout, small):
    claimed = fill_queue(layout, 60)
    ob = new_outbound(layout)
    ob.recover()
    moved = ob.renumber_tail(1, 1000)
    assert [new.seq for _, new in moved] == list(range(1001, 1061))
    assert [p.name for p in ob.pending()] == [c.name for c in claimed]
    assert ob.head(1)[0].seq == 1001
    again = new_outbound(layout)
    assert again.recover() == [] and again.pending() == ob.pending()


def test_seq_runs_sort_a_listing():
    rng = random.Random(13)
    values = rng.sample(range(1, 1 << 40), 30_000)
    runs = SeqRuns()
    for v in values:
        runs.add(v)
    assert list(runs.drain()) == sorted(values)


def test_queue_index_against_a_model():
    rng = random.Random(7)
    index, model = QueueIndex(), {}               # seq -> size (None: not measured yet)
    index.extend_unmeasured(array("q", range(1, 6001)))
    model.update({s: None for s in range(1, 6001)})
    top = 6000
    for step in range(30_000):
        op = rng.random()
        if op < 0.45 and model:
            seq, size = index.pop_first()
            assert seq == min(model) and (size if size >= 0 else None) == model.pop(seq)
        elif op < 0.7:
            top += rng.randint(1, 3)
            size = rng.randint(0, 1000)
            index.add(top, size)
            model[top] = size
        elif op < 0.8:
            seq = rng.choice(list(model)) if model and step % 2 else rng.randint(1, top)
            assert index.remove(seq) == (seq in model)
            model.pop(seq, None)
        elif op < 0.85:
            seq = rng.randint(1, top)
            if seq not in model:
                size = rng.randint(0, 1000)
                index.add(seq, size)
                model[seq] = size
        else:
            limit = rng.randint(0, 50)
            index.measure(lambda seq: seq % 97, limit)      # the lowest unknown sizes
            for seq in sorted(s for s, v in model.items() if v is None)[:limit]:
                model[seq] = seq % 97
        assert len(index) == len(model) and bool(index) == bool(model)
        if step % 50 == 0:
            assert index.first() == (min(model) if model else None)
            assert index.unmeasured == sum(1 for v in model.values() if v is None)
            assert index.bytes == sum(v for v in model.values() if v is not None)
        if step % 500 == 0:
            assert list(index.seqs()) == sorted(model)
            assert all((seq in index) == (seq in model) for seq in range(1, top + 2, 7))


def test_the_whole_queue_is_never_loaded_while_claiming(layout, small):
    """A channel that claims a long backlog with no peer keeps only the window."""
    fill_queue(layout, 300)
    out = layout.out_dir(CH)
    for i in range(100):
        (out / f"late{i:03d}").write_bytes(hashlib.sha256(bytes([i])).digest())
    ob = new_outbound(layout)
    ob.recover()
    ob.scan()
    assert len(ob._pending) == Outbound.WINDOW and ob.queue_stats()[0] == 400
    assert [p.seq for p in ob.pending()] == list(range(1, 401))


def test_a_renumbering_cut_between_link_and_unlink_is_finished_durably(layout, small):
    """The new record names the seq it came from: recovery drops the old name (the
    file would otherwise be sent twice) and fsyncs the queue folder after that."""
    claimed = fill_queue(layout, 3)
    q = layout.queue_dir(CH)
    record = json.loads((q / "2.meta").read_text())
    (q / "10.meta").write_text(json.dumps({**record, "seq": 10, "renumbered_from": 2}))
    os.link(q / "2.data", q / "10.data")        # cut after the link, before the unlink
    ob = Outbound(layout, CH, 1 << 20, False, fs=FaultyFS(sync=False))
    assert ob.recover() == []
    assert [(p.seq, p.name) for p in ob.pending()] == [(1, claimed[0].name),
                                                       (3, claimed[2].name),
                                                       (10, claimed[1].name)]
    trace = ob.fs.trace
    dropped = trace.index(("unlink", str(q / "2.data")))
    assert ("unlink", str(q / "2.meta")) in trace[dropped:]
    assert ("fsync_dir", str(q)) in trace[dropped:]
