"""`linkctl send --wait` follows each file it queued to its outcome (CONTRACT §1).

Unit tests of linkd/cli/send_cmd.py: the daemon is played by hand (a queued file
taken out of out/ is one it delivered and deleted)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trustme
from memlink import node_config, peer_config

from linkd.cli import send_cmd
from linkd.spool import SpoolLayout


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Any, SpoolLayout, list[Path]]:
    cfg = node_config(tmp_path, trustme.CA(), "alpha", [peer_config("bravo")])
    layout = SpoolLayout(cfg.node.spool_dir, cfg.node.state_dir, "bravo")
    layout.out_dir("data").mkdir(parents=True)
    sources = []
    for name in ("e01.txt", "e02.txt", "e03.txt"):
        (tmp_path / name).write_bytes(name.encode())
        sources.append(tmp_path / name)
    return cfg, layout, sources


def test_a_delivered_files_inode_reused_by_a_later_one_is_not_waited_for(
        setup: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # operator trial: the daemon delivered and deleted e01 while the next files were
    # copied in; e02 got e01's inode number, --wait followed files by inode alone and
    # timed out on e01, long delivered (a script resending on exit 1 duplicates it)
    cfg, layout, sources = setup
    real = send_cmd.queue_file
    first: list[int] = []

    def queue_and_deliver(out_dir: Path, source: Path) -> tuple[str, int]:
        name, ino = real(out_dir, source)
        os.unlink(out_dir / name)           # the daemon took it, delivered, deleted it
        first.append(ino)
        return name, first[0]               # the kernel handed its number on
    monkeypatch.setattr(send_cmd, "queue_file", queue_and_deliver)
    code = send_cmd.run_send(cfg, "bravo", "data", [str(s) for s in sources], wait=True,
                             timeout=5)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(out.splitlines()) == [f"e0{i}.txt: delivered to bravo" for i in (1, 2, 3)]


def test_another_file_with_our_inode_in_out_is_not_ours(setup: Any) -> None:
    _cfg, layout, _sources = setup
    other = layout.out_dir("data") / "someone-else.txt"
    other.write_bytes(b"x")
    ino = other.stat().st_ino
    assert send_cmd.outcome(layout, "data", ino, "e01.txt") == ("done", None)
    assert send_cmd.outcome(layout, "data", ino, "someone-else.txt") == ("waiting", None)
