"""Issue 13: the compact index of a long queue (linkd/spool/queue_index.py),
against a model: 16 bytes a queued file instead of a Python object."""

from __future__ import annotations

import random
from array import array

from linkd.spool.queue_index import QueueIndex, SeqRuns


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
