"""Replay the fuzz corpus and every input a fuzz run ever crashed on (issue 8.10).

The targets are plain functions (tests/fuzz/targets.py); atheris is only needed
to *search* for new inputs (tests/fuzz/run.py), not to replay them here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402

CASES = sorted((t, p) for t in targets.TARGETS
               for folder in (FUZZ / "corpus" / t, FUZZ / "regressions" / t)
               if folder.is_dir() for p in folder.iterdir() if p.is_file())


def test_the_seed_corpus_is_there_for_every_target():
    assert {t for t, _ in CASES} == set(targets.TARGETS)


@pytest.mark.parametrize(("target", "path"), CASES,
                         ids=[f"{t}/{p.parent.parent.name}/{p.name}" for t, p in CASES])
def test_replay(target, path):
    targets.TARGETS[target](path.read_bytes())


def test_the_receiver_target_reaches_messages_and_violations():
    """The harness itself: seeds from real sessions get past the hello."""
    from linkd.proto import session as S
    s = S.Session(node="bravo", peer="alpha", channels=targets.channels(), now=0.0)
    s.receive_data(targets.HELLO, 0.0)
    stream = (FUZZ / "corpus" / "receiver" / "seed-000").read_bytes()
    events = s.receive_data(stream, 0.0)
    assert any(isinstance(e, S.MessageComplete) for e in events)
    assert isinstance(events[-1], S.SessionClosed)      # the recorded nack: a violation
