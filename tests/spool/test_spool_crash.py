"""Crash-point sweeps: kill a side at every durable step of a whole exchange
(claim, checkpoint, commit, resolve, fail, archive, renumber after a lost
sender state, recovery), rebuild it from disk, finish the work, and check the
delivery invariants. Then the same with an OSError (EIO, ENOSPC) at every step
instead of a crash."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from spoolkit import Crash, FaultyFS, LinkHarness, drop

from linkd.errors import SpoolError
from linkd.spool import Outbound, direct
from linkd.spool import inbound as inbound_module

CH = "data"
BIG = 40_000                 # with 8 KiB checkpoints and 4 KiB chunks: several checkpoints
OLD_REPORT = b"already in the receiver's in/"


def content(name: str, size: int = 300) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // 32 + 1))[:size]


BATCH1 = [("m0.txt", content("m0.txt")), ("m1.txt", content("m1.txt", 0)),
          ("big.bin", content("big.bin", BIG)), ("refuse.bin", content("refuse.bin")),
          ("m2.txt", content("m2.txt")), ("over.bin", content("over.bin", 70_000)),
          ("report.txt", content("report-1")), ("m3.txt", content("m3.txt"))]
BATCH2 = [("report.txt", content("report-2")), ("m4.txt", content("m4.txt")),
          ("m5.txt", content("m5.txt", 5000)), ("refuse2.bin", content("refuse2.bin"))]
BATCH3 = [("n0.txt", content("n0.txt")), ("n1.txt", content("n1.txt", 9000)),
          ("n2.txt", content("n2.txt"))]
EXPECTED_IN = {"report.txt": OLD_REPORT, "m0.txt": content("m0.txt"), "m1.txt": b"",
               "big.bin": content("big.bin", BIG), "m2.txt": content("m2.txt"),
               "report~1.txt": content("report-1"), "m3.txt": content("m3.txt"),
               "report~2.txt": content("report-2"), "m4.txt": content("m4.txt"),
               "m5.txt": content("m5.txt", 5000), **dict(BATCH3)}
EXPECTED_FAILED = {"over.bin": content("over.bin", 70_000),
                   "refuse.bin": content("refuse.bin"), "refuse2.bin": content("refuse2.bin")}


def files(folder: Path) -> dict[str, bytes]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


class Checked(LinkHarness):
    """The harness plus the invariants checked at every crash and recovery."""

    dropped: list[bytes]

    def audit(self, moment: str) -> None:
        inbox = files(self.receiver.in_dir(CH))
        wanted = set(EXPECTED_IN.values())
        for name, data in inbox.items():       # only complete, expected files in in/
            assert data in wanted, f"{moment}: in/{name} is not a complete message"
        seen = list(inbox.values())
        assert len(seen) == len(set(seen)), f"{moment}: a message is in in/ twice"
        if moment != "recovered":
            return
        # The sender never loses a file: each one dropped is in out/, claimed,
        # delivered, or failed.
        where = (list(files(self.sender.out_dir(CH)).values()) + seen
                 + list(files(self.sender.queue_dir(CH)).values())
                 + list(files(self.sender.failed_dir(CH)).values()))
        for data in self.dropped:
            assert data in where, f"{moment}: a dropped file of {len(data)} bytes was lost"


def scenario(h: Checked, rebuild=lambda side: None) -> None:
    (h.receiver.in_dir(CH) / "report.txt").write_bytes(OLD_REPORT)
    h.dropped = []
    for i, (name, data) in enumerate(BATCH1):
        drop(h.sender.out_dir(CH), name, data, mtime_ns=1_000_000_000 + i)
        h.dropped.append(data)
    h.cut_at = BIG // 2                       # the first session is cut inside big.bin
    h.run(rebuild)
    h.run(rebuild)
    for i, (name, data) in enumerate(BATCH2):
        drop(h.sender.out_dir(CH), name, data, mtime_ns=2_000_000_000 + i)
        h.dropped.append(data)
    h.drain(rebuild)
    # The sender's state dir is wiped (issue 7 item 2) and files are claimed before
    # the first hello: they take seqs 1.. that the receiver already committed with
    # other content, so the session start renumbers them above its committed seq.
    shutil.rmtree(h.sender.state_dir)
    h.sender.create([CH], h.archive_sent)
    for name, data in BATCH3:
        drop(h.sender.out_dir(CH), name, data)
        h.dropped.append(data)
    h.ob = h.new_sender(h.ob.fs)           # a restart (the same fault schedule goes on)
    claim_before_hello(h, rebuild)
    h.drain(rebuild)


def claim_before_hello(h: Checked, rebuild) -> None:
    for _ in range(10):
        try:
            h.problems += h.ob.recover()
            h.ob.scan()
            return
        except Crash as crash:
            h.crashed(crash, rebuild)
        except SpoolError as exc:
            h.errors.append(exc)
    raise AssertionError("the claim before the hello never completed")


def make(tmp: Path, **kw) -> Checked:
    return Checked(tmp, checkpoint_bytes=8192, chunk=4096, batch=2, max_bytes=65536,
                   refuse=lambda item: "the peer refused it" if item.name.startswith("refuse")
                   else None, **kw)


def check_final(h: Checked) -> None:
    assert files(h.receiver.in_dir(CH)) == EXPECTED_IN
    failed = files(h.sender.failed_dir(CH))
    assert {n: d for n, d in failed.items() if not n.endswith(".reason")} == EXPECTED_FAILED
    reasons = [f"{n}.reason" for n in EXPECTED_FAILED]
    assert sorted(failed) == sorted([*EXPECTED_FAILED, *reasons])
    for name in reasons:
        assert len(failed[name].decode().splitlines()) == 1
    assert os.listdir(h.sender.out_dir(CH)) == []
    assert os.listdir(h.sender.queue_dir(CH)) == []
    assert os.listdir(h.receiver.tmp_dir()) == []
    assert os.listdir(h.receiver.quarantine_dir()) == []
    if h.archive_sent:
        sent = files(h.sender.sent_dir(CH))
        assert sorted(sent.values()) == sorted(
            d for n, d in BATCH1 + BATCH2 + BATCH3 if n not in EXPECTED_FAILED)
    seqs = [d.seq for d in h.delivered]
    assert seqs == sorted(set(seqs)), f"delivery events out of order or repeated: {seqs}"
    acked = [c.sha256 for c in h.acked]
    assert len(acked) == len(set(acked)), f"acknowledged twice: {h.acked}"
    # Numbers follow pick-up order: 11 claims, the last one refused (seq 11); after
    # the state loss, the 3 new claims are renumbered from committed + 1 = 11 (a
    # lost state may reuse a number; the receiver never committed 11 before). A crash
    # or an I/O error inside that renumbering moves the tail again at the next session, so numbers
    # may then skip; what must hold is the order, and nothing numbered twice.
    # Delivery events (a crash may lose some) in pick-up order.
    assert h.ob.next_seq == h.ib.committed + 1 and h.ib.committed >= 13
    if not h.crashes and not h.errors:
        assert (h.ob.next_seq, h.ib.committed) == (14, 13)
    pickup = {hashlib.sha256(d).hexdigest(): i for i, d in enumerate(h.dropped)}
    order = [pickup[d.sha256] for d in h.delivered]
    assert order == sorted(order)


def count_steps(tmp: Path, renameat2: bool = True, **kw) -> tuple[int, int]:
    h = make(tmp, **kw)
    h.ob = h.new_sender(FaultyFS(sync=False, tag="sender", renameat2=renameat2))
    h.ib = h.new_receiver(FaultyFS(sync=False, tag="receiver", renameat2=renameat2))
    scenario(h)
    check_final(h)
    assert not h.crashes and not h.errors
    # the sweep visits renumbering: after the state loss, seqs 1..3 were claimed
    # again and then moved above the receiver's committed seq, the last first (a cut
    # between two moves keeps pick-up order)
    claims = [os.path.basename(t) for op, t in h.ob.fs.trace  # type: ignore[attr-defined]
              if op == "rename_noreplace" and "/queue/" in t]
    assert claims.count("1.data") == 2 and claims[-3:] == ["13.data", "12.data", "11.data"]
    return h.ob.fs.calls, h.ib.fs.calls   # type: ignore[attr-defined]


@pytest.fixture
def small_window(request, monkeypatch):
    """With `small_window` true: the sender keeps 2 items loaded and records its
    checkpoint every 2 claims (issue 13), so the sweep crosses the lazy loading of
    the queue, the checkpoints and the bounded recovery at every step."""
    on = bool(getattr(request, "param", False))
    if on:
        monkeypatch.setattr(Outbound, "WINDOW", 2)
        monkeypatch.setattr(Outbound, "CHECKPOINT_EVERY", 2)
    return on


def sweep_dirs(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"run{n}"
    path.mkdir()
    return path


# CI (slow tests deselected) visits every SAMPLE-th step of each variant, at an
# offset that moves with the day (ROTATION, or LINKD_TEST_SHIFT to replay one): the
# sampled variants of a sweep each at their own offset from it, so that one day's run
# covers several offsets and four days' runs visit every step of every variant.
# `pytest -m slow` runs every step of every variant.
SAMPLE = 4
ROTATION = int(os.environ.get("LINKD_TEST_SHIFT") or dt.date.today().toordinal() % SAMPLE)


def every(*values):
    name = "-".join(map(str, values))
    return pytest.param(*values, 1, marks=pytest.mark.slow, id=f"{name}-every")


def sampled(*values):
    return pytest.param(*values, SAMPLE, id="-".join(map(str, values)) + "-sampled")


def main(*values):
    """The main variant of a sweep: every step under `-m slow`, a rotating third in CI."""
    name = "-".join(map(str, values))
    return [every(*values), pytest.param(*values, -SAMPLE, id=f"{name}-rotating")]


def stride_and_shift(stride: int, shift: int) -> tuple[int, int]:
    """A negative stride is a main variant's rotating sample (see `main`); a sampled
    variant's own shift moves with the day too."""
    if stride == 1:
        return stride, shift
    print(f"rotating sample: every {abs(stride)}th step (LINKD_TEST_SHIFT={ROTATION} "
          f"to replay)")
    if stride < 0:
        return -stride, ROTATION
    return stride, shift + ROTATION


def steps(total: int, stride: int, shift: int = 0) -> list[int]:
    """Every `stride`-th crash point of 0..total starting at shift % stride, and the
    last; stride 1 is every point. Give each sampled variant of a sweep its own
    shift (0, 1, 2...) so that together they visit every offset."""
    return sorted(set(range(shift % stride, total + 1, stride)) | {total})


def test_clean_run_delivers_everything(tmp_path):
    sender_steps, receiver_steps = count_steps(tmp_path)
    assert sender_steps > 50 and receiver_steps > 50


SENDER_SHIFT = {(True, True, False): 1, (True, False, False): 2, (False, True, True): 0}


@pytest.mark.parametrize("archive_sent,renameat2,small_window,stride", [
    *main(False, True, False), every(True, True, False), sampled(True, True, False),
    every(True, False, False), sampled(True, False, False), every(False, True, True),
    sampled(False, True, True), every(True, False, True)], indirect=["small_window"])
def test_sender_crash_at_every_step(tmp_path, archive_sent, renameat2, small_window, stride):
    total, _ = count_steps(sweep_dirs(tmp_path, -1), renameat2, archive_sent=archive_sent)
    stride, shift = stride_and_shift(
        stride, SENDER_SHIFT.get((archive_sent, renameat2, small_window), 0))
    for n in steps(total, stride, shift):
        h = make(sweep_dirs(tmp_path, n), archive_sent=archive_sent)
        h.ob = h.new_sender(FaultyFS(crash_at=n, sync=False, tag="sender", renameat2=renameat2))
        scenario(h)
        check_final(h)
        assert len(h.crashes) == (n < total), n


@pytest.mark.parametrize("renameat2,syncfs,stride", [
    *main(True, False), every(False, False), sampled(False, False), every(True, True),
    sampled(True, True)])
def test_receiver_crash_at_every_step(tmp_path, monkeypatch, renameat2, syncfs, stride):
    if syncfs:                                    # every commit uses syncfs, not fsyncs
        monkeypatch.setattr(inbound_module, "SYNCFS_MIN", 1)
    _, total = count_steps(sweep_dirs(tmp_path, -1), renameat2)
    stride, shift = stride_and_shift(stride, 2 if syncfs else 1)
    for n in steps(total, stride, shift):
        h = make(sweep_dirs(tmp_path, n))
        h.ib = h.new_receiver(FaultyFS(crash_at=n, sync=False, tag="receiver",
                                       renameat2=renameat2))
        scenario(h)
        check_final(h)


@pytest.fixture
def direct_small(tmp_path, monkeypatch):
    """big.bin (40,000 bytes) is written through O_DIRECT, in 16 KiB stages."""
    if direct.fs_type(tmp_path) not in direct.LOCAL_FS:
        pytest.skip(f"linkd uses no O_DIRECT on the file system of {tmp_path}")
    probe = tmp_path / ".o_direct_probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as exc:
        pytest.skip(f"no O_DIRECT on the file system of {tmp_path}: {exc}")
    finally:
        probe.unlink(missing_ok=True)
    monkeypatch.setattr(direct, "DIRECT_MIN", 10_000)
    monkeypatch.setattr(direct, "STAGE", 4 * direct.BLOCK)


@pytest.mark.parametrize("stride", [pytest.param(1, marks=pytest.mark.slow, id="every"),
                                    pytest.param(SAMPLE, id="sampled")])
def test_receiver_crash_at_every_step_with_o_direct(tmp_path, direct_small, stride):
    _, total = count_steps(sweep_dirs(tmp_path, -1))
    stride, shift = stride_and_shift(stride, 3)
    for n in steps(total, stride, shift):
        h = make(sweep_dirs(tmp_path, n))
        h.ib = h.new_receiver(FaultyFS(crash_at=n, sync=False, tag="receiver"))
        scenario(h)
        check_final(h)


@pytest.mark.parametrize("error,stride", [
    pytest.param(errno.EIO, 1, marks=pytest.mark.slow, id="EIO-every"),
    pytest.param(errno.ENOSPC, SAMPLE, id="ENOSPC-sampled")])
def test_io_error_at_every_step_with_o_direct(tmp_path, direct_small, error, stride):
    _, total = count_steps(sweep_dirs(tmp_path, -1))
    stride, shift = stride_and_shift(stride, 3)
    for n in steps(total - 1, stride, shift):
        h = make(sweep_dirs(tmp_path, n))
        fs = FaultyFS(fail_at=n, error=error, sync=False, tag="receiver")
        h.ib = h.new_receiver(fs)
        scenario(h)
        check_final(h)
        assert len(h.errors) == (fs.fired is not None), (n, h.errors)


@pytest.mark.parametrize("side,small_window,stride", [
    *main("sender", False), every("receiver", False), sampled("receiver", False),
    every("sender", True), sampled("sender", True)], indirect=["small_window"])
def test_crash_again_during_recovery(tmp_path, side, small_window, stride):
    """Crash at step n (every third), then again at each of the first 8 steps of the
    rebuilt side. CI runs a quarter of the n, each with every other m (by the day)."""
    totals = count_steps(sweep_dirs(tmp_path, -1))
    total = totals[side == "receiver"]
    again = range(8) if stride == 1 else range(ROTATION % 2, 8, 2)
    stride, shift = stride_and_shift(stride, 1)
    for n in steps(total - 1, 3 * stride, 3 * shift):
        for m in again:
            rebuilds = iter([FaultyFS(crash_at=m, sync=False, tag=side)])

            def rebuild(which, rebuilds=rebuilds):
                return next(rebuilds, None) if which == side else None

            h = make(sweep_dirs(tmp_path, n * 100 + m))
            fs = FaultyFS(crash_at=n, sync=False, tag=side)
            if side == "sender":
                h.ob = h.new_sender(fs)
            else:
                h.ib = h.new_receiver(fs)
            scenario(h, rebuild)
            check_final(h)


@pytest.mark.parametrize("side,error,small_window,stride", [
    *main("sender", errno.EIO, False), *main("receiver", errno.EIO, False),
    every("sender", errno.ENOSPC, False), sampled("sender", errno.ENOSPC, False),
    every("receiver", errno.ENOSPC, False), sampled("receiver", errno.ENOSPC, False),
    every("sender", errno.EIO, True), sampled("sender", errno.EIO, True)],
    indirect=["small_window"])
def test_io_error_at_every_step(tmp_path, side, error, small_window, stride):
    """An OSError at any step ends the session with SpoolError; the same objects
    then recover() and finish: nothing is lost, duplicated or reported early."""
    totals = count_steps(sweep_dirs(tmp_path, -1))
    total = totals[side == "receiver"]
    stride, shift = stride_and_shift(stride, 1 if side == "sender" else 2)
    for n in steps(total - 1, stride, shift):
        h = make(sweep_dirs(tmp_path, n))
        out = str(h.sender.out_dir(CH))

        def fault(i, op, target, n=n, out=out):
            # (an unreadable *source* file goes to failed/: tested elsewhere)
            if i == n and not (op == "open" and str(target).startswith(out)):
                return OSError(error, os.strerror(error), str(target))
            return None

        fs = FaultyFS(fault=fault, sync=False, tag=side)
        if side == "sender":
            h.ob = h.new_sender(fs)
        else:
            h.ib = h.new_receiver(fs)
        scenario(h)
        check_final(h)
        assert len(h.errors) == (fs.fired is not None), (n, h.errors)


def test_enospc_while_receiving_resumes_from_the_checkpoint(tmp_path):
    h = make(tmp_path)
    fs = FaultyFS(fail_at=("write", 0), error=errno.ENOSPC, sync=False, tag="receiver")
    h.ib = h.new_receiver(fs)
    h.ib.recover()
    ib = h.ib
    data = content("big.bin", BIG)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(SpoolError, match="No space left"):
        ib.begin(1, "big.bin", BIG, sha)
        ib.write(data[:4096])
    with pytest.raises(SpoolError, match="recover"):
        ib.begin(1, "big.bin", BIG, sha)
    ib.recover()
    assert ib.resume_point() is None and os.listdir(h.receiver.tmp_dir()) == []
    ib.begin(1, "big.bin", BIG, sha)
    for i in range(0, 20_000, 4096):
        ib.write(data[i:i + 4096])
    fs.fail_at, fs.fired = ("write", fs.op_calls["write"]), None
    with pytest.raises(SpoolError):
        ib.write(data[20480:24576])
    ib.recover()
    assert ib.resume_point() == (1, 16384)
    assert ib.begin(1, "big.bin", BIG, sha, 16384) == 16384
    ib.write(data[16384:])
    done = ib.finish()
    ib.commit([done])
    assert (h.receiver.in_dir(CH) / "big.bin").read_bytes() == data


def test_eio_at_the_folder_fsync_after_rename_then_recover_completes(tmp_path):
    h = make(tmp_path)
    fs = FaultyFS(sync=False, tag="receiver")
    ib = h.ib = h.new_receiver(fs)
    ib.recover()
    batch = []
    for seq, name in enumerate(["a.txt", "b.txt"], 1):
        data = content(name)
        ib.begin(seq, name, len(data), hashlib.sha256(data).hexdigest())
        ib.write(data)
        batch.append(ib.finish())
    in_dir = str(h.receiver.in_dir(CH))
    fs.fault = lambda i, op, target: OSError(errno.EIO, "I/O error", target) \
        if op == "fsync_dir" and str(target) == in_dir else None
    with pytest.raises(SpoolError, match="I/O error"):
        ib.commit(batch)
    assert ib.committed == 0                                # not reported committed
    assert sorted(os.listdir(in_dir)) == ["a.txt", "b.txt"]  # (renamed, not yet durable)
    with pytest.raises(SpoolError, match="recover"):
        ib.begin(3, "c.txt", 1, "0" * 64)
    with pytest.raises(SpoolError, match="recover"):
        ib.commit(batch)
    fs.fault, mark = None, len(fs.trace)
    ib.recover()
    assert ib.committed == 2
    assert [(d.seq, d.name) for d in ib.recovered] == [(1, "a.txt"), (2, "b.txt")]
    assert ("fsync_dir", in_dir) in fs.trace[mark:]             # durability re-established


def test_crash_is_a_base_exception_nothing_swallows():
    assert not issubclass(Crash, Exception)
