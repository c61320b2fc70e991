"""Spool layout (CONTRACT §3): folders and modes, the one-daemon lock, name rules."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from spoolkit import FaultyFS

from linkd.errors import SpoolError
from linkd.spool import (
    SpoolLayout,
    lock_spool_dir,
    lock_state_dir,
    plain_name_problem,
    tilde_name,
)
from linkd.spool.fs import FS


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def strict_umask():
    old = os.umask(0o077)          # a strict umask must not leak into the folder modes
    yield
    os.umask(old)


def test_create_makes_every_folder_0750_and_state_0700(tmp_path, strict_umask):
    layout = SpoolLayout(tmp_path / "var" / "spool", tmp_path / "var" / "spool" / ".linkd",
                         "europol")
    layout.create(["alerts", "data"], archive_sent=False)
    peer = layout.peer_dir
    expected = [layout.spool_dir, peer, peer / "out", peer / "in", peer / "failed",
                layout.quarantine_dir(), layout.tmp_dir()]
    for ch in ("alerts", "data"):
        expected += [layout.out_dir(ch), layout.queue_dir(ch), layout.in_dir(ch),
                     layout.failed_dir(ch)]
    assert {str(p): oct(mode(p)) for p in expected} == {str(p): "0o750" for p in expected}
    assert mode(layout.state_dir) == 0o700
    for ch in ("alerts", "data"):
        assert mode(layout.channel_state_dir(ch)) == 0o700
    assert not (peer / "sent").exists()
    # the mount probes leave nothing behind
    for ch in ("alerts", "data"):
        for folder in (layout.tmp_dir(), layout.out_dir(ch), layout.queue_dir(ch),
                       layout.in_dir(ch)):
            assert os.listdir(folder) == []


def test_state_dir_may_live_on_another_mount(tmp_path, monkeypatch):
    # only out->queue and tmp->in are probed: nothing is renamed into state_dir
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "p")
    real_rename = os.rename

    def cross_device(src, dst):
        if str(dst).startswith(str(layout.state_dir)):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", cross_device)
    layout.create(["data"], archive_sent=False)


def test_channel_records_never_share_a_name_with_a_channel(tmp_path):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "p")
    paths = {layout.state_file_out("X"), layout.state_file_in("X"), layout.journal_file("X")}
    for ch in ("X.json", "X", "out.json", "in.json", "channels"):
        assert layout.channel_state_dir(ch) not in paths
        assert layout.queue_dir(ch) not in paths
    assert layout.channel_state_dir("X") != layout.channel_state_dir("X.json")


def test_create_with_archive_sent_makes_sent_folders(tmp_path):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "p")
    layout.create(["data"], archive_sent=True)
    assert mode(layout.sent_dir("data")) == 0o750


def test_existing_folders_keep_their_mode(tmp_path):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "p")
    kept = layout.in_dir("data")
    kept.mkdir(parents=True)
    os.chmod(kept, 0o770)
    os.chmod(layout.spool_dir, 0o755)
    layout.create(["data"], archive_sent=False)
    assert mode(kept) == 0o770
    assert mode(layout.spool_dir) == 0o755
    assert mode(layout.out_dir("data")) == 0o750


def test_create_refuses_a_file_where_a_folder_belongs(tmp_path):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "p")
    layout.peer_dir.parent.mkdir(parents=True)
    layout.peer_dir.write_text("oops")
    with pytest.raises(SpoolError, match="exists but is not a folder"):
        layout.create(["data"], archive_sent=False)


@pytest.mark.parametrize("which", ["queue", "in"])
def test_create_refuses_queue_or_in_on_another_mount(tmp_path, monkeypatch, which):
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "p")
    real_rename = os.rename
    target = layout.queue_dir("data") if which == "queue" else layout.in_dir("data")

    def cross_device(src, dst):
        if ".linkd-probe" in str(src) and os.path.dirname(dst) == str(target):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", cross_device)
    with pytest.raises(SpoolError, match="different file systems or mounts") as info:
        layout.create(["data"], archive_sent=False)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    for folder in (layout.tmp_dir(), layout.out_dir("data"), layout.queue_dir("data"),
                   layout.in_dir("data")):
        assert [n for n in os.listdir(folder) if "probe" in n] == []


def test_create_fsyncs_the_parent_of_every_new_folder(tmp_path):
    fs = FaultyFS(sync=False)
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "p")
    layout.create(["data"], archive_sent=False, fs=fs)
    made = [target for op, target in fs.trace if op == "mkdir"]
    synced = {target for op, target in fs.trace if op == "fsync_dir"}
    assert made and all(os.path.dirname(m) in synced for m in made)


def test_bad_peer_and_channel_names_are_refused(tmp_path):
    with pytest.raises(SpoolError):
        SpoolLayout(tmp_path, tmp_path, "../etc")
    layout = SpoolLayout(tmp_path, tmp_path / "s", "p")
    for bad in ("..", ".", "a/b", "", "x" * 65, "sp ace"):
        with pytest.raises(SpoolError):
            layout.in_dir(bad)


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    state = tmp_path / "state"
    first = lock_state_dir(state)
    assert mode(state) == 0o700
    assert (state / "linkd.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(SpoolError, match=rf"in use by another linkd \(pid {os.getpid()}\): "
                                         r"stop it first"):
        lock_state_dir(state)
    first.release()
    with lock_state_dir(state):
        pass


def test_spool_lock_is_exclusive_and_says_what_to_do(tmp_path, strict_umask):
    # an operator trial: a second daemon with a copied config (its own state_dir, the
    # same spool_dir) started, both claimed from one out/, the peer got duplicates
    spool = tmp_path / "var" / "sp{0}ol"       # braces: the message is no format string
    first = lock_spool_dir(spool)
    assert mode(spool) == 0o750
    assert (spool / ".linkd.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(SpoolError) as refused:
        lock_spool_dir(spool)
    assert str(refused.value) == (
        f"another linkd (pid {os.getpid()}) already uses the spool {spool}: two daemons on "
        "one spool would send files twice; give this one its own [node].spool_dir, or "
        "stop the other")
    first.release()
    with lock_spool_dir(spool):
        pass


def test_spool_lock_sits_beside_the_default_state_dir_and_the_peer_folders(tmp_path):
    # state_dir defaults to <spool>/.linkd: both locks are taken, neither is a folder
    # create() or recovery would take for a peer's
    spool = tmp_path / "spool"
    with lock_state_dir(spool / ".linkd"), lock_spool_dir(spool):
        layout = SpoolLayout(spool, spool / ".linkd", "europol")
        layout.create(["alerts"], archive_sent=False)
        assert sorted(os.listdir(spool)) == [".linkd", ".linkd.lock", "europol"]
        assert mode(spool / ".linkd.lock") == 0o600


@pytest.mark.parametrize("name,problem", [
    ("report.txt", None), ("a" * 255, None), ("é" * 127, None), ("with space", None),
    ("", "empty"), (".", "'.'"), ("..", "'..'"), ("a/b", "'/'"), ("a\0b", "NUL"),
    (".hidden", "starts with '.'"), ("a" * 256, "256 bytes"), ("é" * 128, "256 bytes"),
    ("bad\udcff", "UTF-8"),
])
def test_plain_name_problem(name, problem):
    got = plain_name_problem(name)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


@pytest.mark.parametrize("name,n,expected", [
    ("report.txt", 1, "report~1.txt"), ("a.tar.gz", 1, "a~1.tar.gz"), ("README", 1, "README~1"),
    ("report.txt", 12, "report~12.txt"), ("x.", 2, "x~2."), ("report.txt", 0, "report.txt"),
])
def test_tilde_name(name, n, expected):
    assert tilde_name(name, n) == expected


def test_tilde_name_of_a_long_name_still_fits():
    name = "a" * 250 + ".txt"
    assert len(tilde_name(name, 1).encode()) == 255
    assert tilde_name(name, 1).endswith("~1.txt")
    assert len(tilde_name(name, 0, reserve=7).encode()) == 248


def test_default_fs_rename_noreplace_never_overwrites(tmp_path):
    for fs in (FS(), FaultyFS(renameat2=False)):
        (tmp_path / "a").write_text("a")
        (tmp_path / "b").write_text("b")
        with pytest.raises(FileExistsError):
            fs.rename_noreplace(tmp_path / "a", tmp_path / "b")
        assert (tmp_path / "b").read_text() == "b"
        fs.rename_noreplace(tmp_path / "a", tmp_path / "c")
        assert (tmp_path / "c").read_text() == "a" and not (tmp_path / "a").exists()
        for p in ("b", "c"):
            (tmp_path / p).unlink()
