"""Local attackers against two real daemons (issue 8, items 5 and 6).

Symlinked spool folders: a folder linkd writes into that is replaced by a link
to a folder outside the spool is refused (logged), nothing is written through
it, the other channels keep working, and the channel resumes once the folder
is real again. File names with control characters never cross.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from procs import Daemon, make_pki, wait_for

CHANNELS = [{"name": "data"}, {"name": "other"}]


def swap_for_link(folder: Path, target: Path) -> Path:
    """Move `folder` aside and put a link to `target` in its place; returns where it went."""
    aside = folder.with_name(folder.name + ".real")
    folder.rename(aside)
    folder.symlink_to(target, target_is_directory=True)
    return aside


def restore(folder: Path, aside: Path) -> None:
    folder.unlink()
    aside.rename(folder)


def mentions(d: Daemon, event: str, text: str) -> list[dict]:
    return [e for e in d.events(event) if text in str(e.get("reason", ""))
            or text in str(e.get("problem", ""))]


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("which", ["in", "tmp"])
def test_receiver_refuses_a_symlinked_in_or_tmp_folder(pair, outside, which):
    a, b = pair(channels=CHANNELS)
    folder = b.spool / "alpha" / ("in/data" if which == "in" else "tmp")
    aside = swap_for_link(folder, outside)
    a.drop("bravo", "data", "secret.txt", b"must not land outside")
    # logged once per attempt, with the folder and the fix
    wait_for(lambda: mentions(b, "inbound_storage_failed", f"{folder} is a symbolic link"), 30,
             message=b.tail)
    # the other direction keeps working; with in/data refused, so does channel 'other'
    b.drop("alpha", "data", "back.txt", b"reply")
    wait_for(lambda: a.inbound("bravo", "data") == {"back.txt": b"reply"}, 30, message=a.tail)
    if which == "in":
        a.drop("bravo", "other", "fine.txt", b"fine")
        wait_for(lambda: b.inbound("alpha", "other") == {"fine.txt": b"fine"}, 30,
                 message=b.tail)
    assert os.listdir(outside) == []
    assert a.events("message_failed") == []
    assert [e for e in b.events("message_delivered") if e["channel"] == "data"] == []
    assert a.running and b.running
    # the sender still holds the file (busy, not failed); fixed, it is delivered
    restore(folder, aside)
    wait_for(lambda: b.inbound("alpha", "data") == {"secret.txt": b"must not land outside"},
             60, message=b.tail)
    assert os.listdir(outside) == [] and a.events("message_failed") == []


@pytest.mark.parametrize("which", ["queue", "failed"])
def test_sender_refuses_a_symlinked_queue_or_failed_folder(pair, outside, which):
    a, b = pair(channels=CHANNELS)
    folder = a.spool / "bravo" / which / "data"
    aside = swap_for_link(folder, outside)
    a.drop("bravo", "data", "waits.txt", b"waits")
    a.drop("bravo", "data", "bad\nname.txt", b"would go to failed/")
    wait_for(lambda: mentions(a, "pickup_delayed", f"{folder} is a symbolic link"), 30,
             message=a.tail)
    a.drop("bravo", "other", "fine.txt", b"fine")
    wait_for(lambda: b.inbound("alpha", "other") == {"fine.txt": b"fine"}, 30, message=b.tail)
    assert os.listdir(outside) == []
    assert sorted(os.listdir(a.out_dir("bravo", "data"))) == ["bad\nname.txt", "waits.txt"]
    assert b.inbound("alpha", "data") == {}
    restore(folder, aside)
    a.drop("bravo", "data", "later.txt", b"later")    # wakes the pick-up
    wait_for(lambda: b.inbound("alpha", "data") == {"waits.txt": b"waits",
                                                    "later.txt": b"later"}, 60, message=a.tail)
    assert os.listdir(outside) == []


def test_daemon_refuses_to_start_on_a_symlinked_spool_folder(tmp_path, outside):
    pki_dir = make_pki(tmp_path / "pki", ["alpha", "bravo"])
    d = Daemon(tmp_path, "bravo", pki_dir)
    d.add_peer("alpha", [{"name": "data"}])
    d.write_config()
    folder = d.spool / "alpha" / "in" / "data"
    folder.parent.mkdir(parents=True)
    folder.symlink_to(outside, target_is_directory=True)
    run = subprocess.run([sys.executable, "-m", "linkd.cli.linkd_main", "-c",
                          str(d.config_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{folder} is a symbolic link" in lines[0], run.stderr
    assert os.listdir(outside) == []
    shutil.rmtree(d.dir)


def test_a_file_name_with_a_newline_goes_to_failed_and_never_crosses(pair):
    a, b = pair()
    a.drop("bravo", "data", "evil\nname.txt", b"x")
    a.drop("bravo", "data", "good.txt", b"good")
    wait_for(lambda: b.inbound("alpha", "data") == {"good.txt": b"good"}, 30, message=b.tail)
    failed = a.spool / "bravo" / "failed" / "data"
    wait_for(lambda: (failed / "evil\nname.txt.reason").exists(), 30, message=a.tail)
    reason = (failed / "evil\nname.txt.reason").read_text()
    assert "control character" in reason and reason.count("\n") == 1
    assert (failed / "evil\nname.txt").read_bytes() == b"x"
    assert [e["name"] for e in a.events("message_failed")] == ["evil\nname.txt"]
    assert b.events("message_quarantined") == []
