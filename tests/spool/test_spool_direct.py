"""Big messages are written through O_DIRECT (linkd/spool/direct.py): the bytes
that reach the file, at every checkpoint and at the end, are exactly the ones
appended, whatever the chunk sizes, checkpoint offsets and resume points; a file
system that refuses O_DIRECT (at open or at a write) gets plain writes; an I/O
error on an O_DIRECT write is one like any other (resume from the checkpoint)."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spoolkit import FaultyFS

from linkd.errors import SpoolError
from linkd.spool import Inbound, SpoolLayout, direct
from linkd.spool.fs import FS

CH = "data"
MiB = 1 << 20


def supports_o_direct(folder) -> bool:
    """linkd would write through O_DIRECT here: a file system on its list that takes it."""
    if direct.fs_type(folder) not in direct.LOCAL_FS:
        return False
    probe = folder / ".o_direct_probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


@pytest.fixture
def layout(tmp_path):
    if not supports_o_direct(tmp_path):
        pytest.skip(f"no O_DIRECT on the file system of {tmp_path}")
    layout = SpoolLayout(tmp_path / "spool", tmp_path / "state", "europol")
    layout.create([CH], archive_sent=False)
    return layout


class Recording(FaultyFS):
    """Notes which descriptors were opened with O_DIRECT and the bytes written to them."""

    def __init__(self, **kw) -> None:
        super().__init__(sync=False, **kw)
        self.direct_fds: set[int] = set()
        self.direct_bytes = 0
        self.plain_bytes = 0

    def open(self, path, flags, mode=0o600):
        fd = super().open(path, flags, mode)
        (self.direct_fds.add if flags & os.O_DIRECT else self.direct_fds.discard)(fd)
        return fd

    def pwrite(self, fd, data, offset):
        super().pwrite(fd, data, offset)
        if fd in self.direct_fds:
            self.direct_bytes += len(data)
        else:
            self.plain_bytes += len(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def deliver(layout, name: str, data: bytes, checkpoint_bytes: int = 8 << 20,
            chunk: int | None = None):
    """Receive `data` as message 1 through a Recording FS, in writes of `chunk`
    bytes (one write if None), and commit it: (the delivery, the FS)."""
    fs = Recording()
    ib = Inbound(layout, CH, 1 << 30, 0o640, checkpoint_bytes, fs=fs)
    ib.recover()
    ib.begin(1, name, len(data), sha(data))
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        ib.write(data[i:i + step])
    [d] = ib.commit([ib.finish()])
    return d, fs


def test_a_big_message_goes_through_o_direct_and_arrives_intact(layout):
    data = os.urandom(9 * MiB + 12_345)
    # unaligned checkpoints and writes
    d, fs = deliver(layout, "big.bin", data, checkpoint_bytes=3 * MiB + 5, chunk=256 * 1024 + 7)
    assert d.path.read_bytes() == data
    # all but the tails written at the checkpoints and at the end went past the page cache
    assert fs.direct_bytes >= len(data) - 4 * direct.BLOCK
    assert fs.plain_bytes < 4 * direct.BLOCK


def test_small_messages_are_written_the_ordinary_way(layout):
    data = os.urandom(direct.DIRECT_MIN - 1)
    d, fs = deliver(layout, "small.bin", data)
    assert d.path.read_bytes() == data
    assert fs.direct_fds == set() and fs.direct_bytes == 0


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 3 * direct.BLOCK + 17),
       steps=st.lists(st.one_of(st.integers(1, 40_000), st.just(0)), max_size=25))
def test_the_file_holds_exactly_what_was_appended_at_every_settle(tmp_path_factory, start,
                                                                  steps):
    """`steps`: append that many bytes, or (0) settle and check the whole file."""
    folder = tmp_path_factory.mktemp("direct")
    if not supports_o_direct(folder):
        pytest.skip(f"no O_DIRECT on the file system of {folder}")
    stage, direct.STAGE = direct.STAGE, 4 * direct.BLOCK    # full stages often
    try:
        path = folder / "f.part"
        expected = bytearray(os.urandom(start))
        path.write_bytes(expected)
        fd = os.open(path, os.O_RDWR)
        w = direct.DirectWriter(FS(), path, fd, start)
        assert w.direct
        for n in [*steps, 0]:
            if n:
                more = os.urandom(n)
                w.append(more)
                expected += more
            else:
                w.settle()
                assert path.read_bytes() == bytes(expected)
        w.close()
        os.close(fd)
    finally:
        direct.STAGE = stage


class Refusing(Recording):
    """A file system that refuses O_DIRECT at open, or at its `nth` O_DIRECT write."""

    def __init__(self, at_open: bool = False, nth: int = 0) -> None:
        super().__init__()
        self.at_open, self.nth = at_open, nth

    def open(self, path, flags, mode=0o600):
        if self.at_open and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return super().open(path, flags, mode)

    def pwrite(self, fd, data, offset):
        if not self.at_open and fd in self.direct_fds:
            if self.nth == 0:
                raise OSError(errno.EINVAL, "Invalid argument")
            self.nth -= 1
        super().pwrite(fd, data, offset)


@pytest.mark.parametrize("fs", [Refusing(at_open=True), Refusing(nth=0), Refusing(nth=2)],
                         ids=["at-open", "first-write", "third-write"])
def test_a_file_system_that_refuses_o_direct_gets_plain_writes(layout, fs):
    data = os.urandom(6 * MiB + 999)
    ib = Inbound(layout, CH, 1 << 30, 0o640, 2 * MiB + 1, fs=fs)
    ib.recover()
    ib.begin(1, "big.bin", len(data), sha(data))
    chunk = 300_001
    for i in range(0, len(data), chunk):
        ib.write(data[i:i + chunk])
    [d] = ib.commit([ib.finish()])
    assert d.path.read_bytes() == data
    assert fs.plain_bytes >= len(data) - fs.direct_bytes


def test_an_error_on_an_o_direct_write_resumes_from_the_checkpoint(layout):
    data = os.urandom(8 * MiB + 4321)
    failing = FaultyFS(fail_at=("write", 5), error=errno.ENOSPC, sync=False)
    ib = Inbound(layout, CH, 1 << 30, 0o640, 2 * MiB + 3, fs=failing)
    ib.recover()
    ib.begin(1, "big.bin", len(data), sha(data))
    chunk = 256 * 1024 + 1        # checkpoints at unaligned offsets
    with pytest.raises(SpoolError, match="No space left"):
        for i in range(0, len(data), chunk):
            ib.write(data[i:i + chunk])
    assert failing.trace[-1][0] == "write"
    ib = Inbound(layout, CH, 1 << 30, 0o640, 2 * MiB + 3)     # a restart
    assert ib.recover() == []
    seq, offset = ib.resume_point()
    assert seq == 1 and 0 < offset < len(data) and offset % direct.BLOCK != 0
    assert ib.begin(1, "big.bin", len(data), sha(data), offset) == offset
    for i in range(offset, len(data), chunk):
        ib.write(data[i:i + chunk])
    [d] = ib.commit([ib.finish()])
    assert d.path.read_bytes() == data


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_failed_start_leaks_no_descriptor(tmp_path, monkeypatch):
    """Found by review: an error re-reading the tail block at a resume left the
    O_DIRECT descriptor open (one per attempt on a failing disk, until EMFILE)."""
    if not supports_o_direct(tmp_path):
        pytest.skip(f"no O_DIRECT on the file system of {tmp_path}")
    path = tmp_path / "f.part"
    path.write_bytes(os.urandom(10_000))
    fd = os.open(path, os.O_RDWR)

    def failing_pread(*args):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(direct.os, "pread", failing_pread)
    before = open_fds()
    for _ in range(3):
        with pytest.raises(OSError, match="Input/output"):
            direct.DirectWriter(FS(), path, fd, 10_000)
    assert open_fds() == before
    os.close(fd)


def test_a_partial_replaced_between_the_two_opens_is_refused(tmp_path):
    """Found by review: direct writes went to the new file, the tails to the old one,
    and the SHA-256 (of the frames) still matched: corrupt bytes delivered."""
    if not supports_o_direct(tmp_path):
        pytest.skip(f"no O_DIRECT on the file system of {tmp_path}")
    path = tmp_path / "f.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    other = tmp_path / "other"
    other.write_bytes(b"")
    os.replace(other, path)           # someone else's file now has the name
    before = open_fds()
    with pytest.raises(OSError, match="replaced"):
        direct.DirectWriter(FS(), path, fd, 0)
    assert open_fds() == before
    os.close(fd)


def test_no_o_direct_where_a_checkpoint_fsync_might_not_cover_it(layout, monkeypatch):
    """On FUSE or network file systems the fsync of one descriptor need not flush
    another's writes: plain writes there."""
    monkeypatch.setattr(direct, "fs_type", lambda folder: 0x65735546)     # fuse
    data = os.urandom(direct.DIRECT_MIN + 5)
    d, fs = deliver(layout, "big.bin", data)
    assert d.path.read_bytes() == data
    assert fs.direct_fds == set() and fs.direct_bytes == 0


def test_a_write_that_makes_no_progress_is_an_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    with pytest.raises(OSError, match="no progress"):
        FS().pwrite(fd, b"x" * 10, 0)
    os.close(fd)
