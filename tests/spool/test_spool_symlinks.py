"""Symlinked spool and state folders are refused, never followed (CONTRACT §5, issue 8.6).

Each test plants a link where a folder linkd writes into belongs, pointing at a
folder outside the spool, and checks that nothing is written there, that the
refusal names the folder, and that the channel works again once the folder is
real again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from spoolkit import drop

from linkd.errors import SpoolError
from linkd.spool import Inbound, Outbound, SpoolLayout
from linkd.spool.outbound import FolderRefused, ResourceBusy
from linkd.spool.safedir import SymlinkedFolder, check_folders, open_folder

CH, OTHER = "data", "other"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def layout(tmp_path):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "europol")
    layout.create([CH, OTHER], archive_sent=False)
    return layout


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def swap_for_link(folder: Path, target: Path) -> None:
    """Replace a (spool) folder by a symbolic link to `target`."""
    shutil.rmtree(folder)
    folder.symlink_to(target, target_is_directory=True)


def unswap(folder: Path) -> None:
    folder.unlink()
    folder.mkdir(mode=0o750)


# -- the helper ------------------------------------------------------------------

def test_open_folder_walks_without_following_links(tmp_path, outside):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    os.close(open_folder(root, root / "a" / "b"))
    (root / "a" / "link").symlink_to(outside)
    with pytest.raises(SymlinkedFolder, match=r"a/link is a symbolic link"):
        open_folder(root, root / "a" / "link")
    with pytest.raises(SymlinkedFolder, match=r"a/link is a symbolic link"):
        open_folder(root, root / "a" / "link" / "deeper")     # a link on the way
    (root / "a" / "file").write_text("x")
    with pytest.raises(SpoolError, match="exists but is not a folder") as info:
        open_folder(root, root / "a" / "file")
    assert not isinstance(info.value, SymlinkedFolder)
    check_folders(root, [root / "missing" / "x"])              # missing: not its business
    with pytest.raises(SpoolError, match="not below"):
        open_folder(root, tmp_path)


def test_the_configured_roots_may_be_links(tmp_path):
    """/var/spool/linkd may be a link to another disk: only what is below is checked."""
    real = tmp_path / "disk"
    real.mkdir()
    (tmp_path / "spool").symlink_to(real)
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "europol")
    layout.create([CH], archive_sent=False)
    assert (real / "europol" / "in" / CH).is_dir()


# -- start-up ----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["in_ch", "in", "tmp", "queue_ch", "failed_ch", "quarantine",
                                   "out_ch", "peer", "state_ch", "state_default"])
def test_create_refuses_every_symlinked_folder_and_writes_nothing_through_it(tmp_path, outside,
                                                                             which):
    state = tmp_path / "spool" / ".linkd" if which == "state_default" else tmp_path / "state"
    layout = SpoolLayout(tmp_path / "spool", state, "europol")
    layout.create([CH], archive_sent=True)
    folder = {"in_ch": layout.in_dir(CH), "in": layout.peer_dir / "in",
              "tmp": layout.tmp_dir(), "queue_ch": layout.queue_dir(CH),
              "failed_ch": layout.failed_dir(CH), "quarantine": layout.quarantine_dir(),
              "out_ch": layout.out_dir(CH), "peer": layout.peer_dir,
              "state_ch": layout.channel_state_dir(CH), "state_default": state}[which]
    swap_for_link(folder, outside)
    with pytest.raises(SymlinkedFolder, match=f"{folder} is a symbolic link") as info:
        layout.create([CH, "new"], archive_sent=True)
    assert "replace it with a real folder" in str(info.value)
    assert os.listdir(outside) == []


def test_create_does_not_make_folders_through_a_link(tmp_path, outside):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "europol")
    layout.create([CH], archive_sent=False)
    swap_for_link(layout.peer_dir / "in", outside)
    with pytest.raises(SymlinkedFolder):
        layout.create([CH, "new"], archive_sent=False)
    assert os.listdir(outside) == []                           # no in/new/ made out there


# -- inbound -------------------------------------------------------------------------

def receive(ib, seq, name, data):
    ib.begin(seq, name, len(data), sha(data))
    ib.write(data)
    return ib.finish()


def test_inbound_refuses_a_symlinked_in_folder_and_keeps_other_channels(layout, outside):
    ib = Inbound(layout, CH, 1 << 20, 0o640)
    other = Inbound(layout, OTHER, 1 << 20, 0o640)
    assert ib.recover() == [] and other.recover() == []
    done = receive(ib, 1, "one.txt", b"one")
    ib.commit([done])
    finished = receive(ib, 2, "two.txt", b"two")
    swap_for_link(layout.in_dir(CH), outside)
    with pytest.raises(SymlinkedFolder, match=r"in/data is a symbolic link"):
        ib.commit([finished])
    assert os.listdir(outside) == [] and ib.committed == 1
    # recover() does not raise (the session goes on) but keeps the channel refused;
    # the refusal was raised (and logged) once already, so it is not repeated
    assert ib.recover() == [] and ib.committed == 1            # state still loaded
    fresh = Inbound(layout, CH, 1 << 20, 0o640)                # e.g. after a restart
    problems = fresh.recover()
    assert len(problems) == 1 and "in/data is a symbolic link" in problems[0]
    assert fresh.recover() == [] and fresh.committed == 1
    with pytest.raises(SpoolError, match="in/data is a symbolic link"):
        ib.begin(2, "two.txt", 3, sha(b"two"))
    # the other channel of the same peer is not affected
    other.commit([receive(other, 1, "x.txt", b"x")])
    assert (layout.in_dir(OTHER) / "x.txt").read_bytes() == b"x"
    # fixed: the channel works again
    unswap(layout.in_dir(CH))
    assert ib.recover() == []
    ib.commit([receive(ib, 2, "two.txt", b"two")])
    assert (layout.in_dir(CH) / "two.txt").read_bytes() == b"two"
    assert os.listdir(outside) == []


def test_inbound_refuses_a_symlinked_tmp_before_writing_a_partial(layout, outside):
    ib = Inbound(layout, CH, 1 << 20, 0o640)
    ib.recover()
    swap_for_link(layout.tmp_dir(), outside)
    with pytest.raises(SymlinkedFolder, match=r"tmp is a symbolic link"):
        ib.begin(1, "a.txt", 1, sha(b"a"))
    assert os.listdir(outside) == []
    assert ib.recover() == []
    with pytest.raises(SpoolError, match="tmp is a symbolic link"):
        ib.begin(1, "a.txt", 1, sha(b"a"))
    assert os.listdir(outside) == []


def test_inbound_refuses_a_symlinked_quarantine(layout, outside):
    ib = Inbound(layout, CH, 1 << 20, 0o640)
    ib.recover()
    swap_for_link(layout.quarantine_dir(), outside)
    ib.begin(1, "bad.txt", 3, sha(b"abc"))
    ib.write(b"xyz")                                           # not what was announced
    with pytest.raises(SymlinkedFolder, match="quarantine is a symbolic link"):
        ib.finish()
    with pytest.raises(SymlinkedFolder):
        ib.quarantine("x", None, "a reason")
    assert os.listdir(outside) == []


def test_inbound_recover_raises_for_a_symlinked_state_folder(layout, outside):
    ib = Inbound(layout, CH, 1 << 20, 0o640)
    ib.recover()
    swap_for_link(layout.channel_state_dir(CH), outside)
    with pytest.raises(SymlinkedFolder, match="channels/data is a symbolic link"):
        ib.recover()
    assert os.listdir(outside) == []


# -- outbound ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["queue", "failed", "out"])
def test_outbound_refuses_symlinked_folders_without_failing_files(layout, outside, which):
    ob = Outbound(layout, CH, 1 << 20, False)
    other = Outbound(layout, OTHER, 1 << 20, False)
    assert ob.recover() == [] and other.recover() == []
    drop(layout.out_dir(CH), "a.txt", b"aaa")
    folder = {"queue": layout.queue_dir(CH), "failed": layout.failed_dir(CH),
              "out": layout.out_dir(CH)}[which]
    if which == "out":
        drop(outside, "secret.txt", b"not for the peer")
    swap_for_link(folder, outside)
    before = sorted(os.listdir(outside))
    with pytest.raises(FolderRefused, match=f"{folder} is a symbolic link") as info:
        ob.scan()
    assert isinstance(info.value, ResourceBusy)                # retried, never a reason to fail
    assert not ob.usable
    assert ob.recover() == [] and not ob.usable                # raised once already
    fresh = Outbound(layout, CH, 1 << 20, False)
    problems = fresh.recover()
    assert len(problems) == 1 and "is a symbolic link" in problems[0]
    assert fresh.recover() == [] and not fresh.usable
    assert ob.scan() == ([], [])                               # refused: finds nothing
    assert ob.next_pending(1) is None
    assert sorted(os.listdir(outside)) == before               # nothing written or taken
    # the other channel goes on
    drop(layout.out_dir(OTHER), "b.txt", b"bbb")
    claimed, _ = other.scan()
    assert [c.name for c in claimed] == ["b.txt"]
    # fixed: the channel works again
    folder.unlink()
    if which == "out":
        folder.mkdir()
        drop(folder, "a.txt", b"aaa")
    else:
        folder.mkdir()
    assert ob.recover() == [] and ob.usable
    claimed, failed = ob.scan()
    assert [c.name for c in claimed] == ["a.txt"] and failed == []


def test_outbound_refuses_to_send_resolve_or_fail_through_a_symlinked_queue(layout, outside):
    ob = Outbound(layout, CH, 1 << 20, False)
    ob.recover()
    drop(layout.out_dir(CH), "a.txt", b"aaa")
    drop(layout.out_dir(CH), "b.txt", b"bbb")
    (a, b), _ = ob.scan()
    real = layout.queue_dir(CH).with_name("moved")
    layout.queue_dir(CH).rename(real)
    layout.queue_dir(CH).symlink_to(outside)
    with pytest.raises(FolderRefused):
        ob.open(a)
    with pytest.raises(FolderRefused):
        ob.resolve([a.seq])
    with pytest.raises(FolderRefused):
        ob.fail(b, "refused by the peer")
    with pytest.raises(FolderRefused):
        ob.renumber(b, 10)
    assert os.listdir(outside) == [] and os.listdir(layout.failed_dir(CH)) == []
    assert sorted(os.listdir(real)) == ["1.data", "1.meta", "2.data", "2.meta"]


def test_outbound_recover_raises_for_a_symlinked_state_folder(layout, outside):
    ob = Outbound(layout, CH, 1 << 20, False)
    ob.recover()
    swap_for_link(layout.channel_state_dir(CH), outside)
    with pytest.raises(SymlinkedFolder):
        ob.recover()
    assert os.listdir(outside) == []


def test_archive_sent_refuses_a_symlinked_sent_folder(tmp_path, outside):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "europol")
    layout.create([CH], archive_sent=True)
    ob = Outbound(layout, CH, 1 << 20, True)
    ob.recover()
    drop(layout.out_dir(CH), "a.txt", b"aaa")
    (a,), _ = ob.scan()
    swap_for_link(layout.sent_dir(CH), outside)
    with pytest.raises(FolderRefused, match="sent/data is a symbolic link"):
        ob.resolve([a.seq])
    assert os.listdir(outside) == [] and a.path.exists()
