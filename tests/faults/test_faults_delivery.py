"""Exactly-once delivery under real faults, on real processes and real files (issue 3).

Every test here runs two linkd daemons (tests/support/procs.py) and injects a fault
from outside: SIGKILL at random moments, a TCP proxy that holds back or cuts
the bytes, a full file system, strace killing the daemon at its N-th fsync or
rename, dropped capabilities. Tests wait on observable conditions (files,
/status, log events); the only sleeps are the random delays *before* a kill,
which are the fault injection itself.

Tests and how each fault is induced:
  kill test            2,000 files (10,000 with -m slow) on `alerts` (priority 10) and
                       `data`, dropped while SIGKILL hits receiver and sender in turn
                       (20 / 100 kills) at random moments of a live link; checked by
                       tests/support/checker.py (lost, duplicated, unexpected, corrupt; log order)
  consumer took it     (a) the sender's state dir is rolled back to "seq 1 claimed" after
                       delivery and consumption; (b) a hand-driven protocol peer resends
                       seq 1 on the wire to the real receiver
  lost ack             tcpproxy.Proxy swallows receiver->sender bytes until the receiver
                       has logged the commit, then cuts the connection / kills the sender
  resume               a 256 MiB file (LINKD_TEST_RESUME_MB; 1 GiB with -m slow) cut when
                       the receiver's partial passes half: receiver killed, or proxy cut
  ENOSPC               receiver spool + state on a 4 MiB tmpfs (root; else skipped)
  crash-point sweep    strace -e inject=...:signal=SIGKILL:when=N on the receiver's
                       fsync/fdatasync/syncfs and rename/renameat/renameat2, N = 1..K
  refusals             over the peer's max_message_bytes; EACCES via setpriv without
                       CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH
  one daemon per spool a second linkd on the same state dir

Figures (kill test, resume, sweep) are printed with -s and appended to the file named
by LINKD_TEST_REPORT, if set.

Knobs (environment):
  LINKD_TEST_SEED           seed for sizes, channels and kill moments (default: random, printed)
  LINKD_TEST_RESUME_MB      size of the resume test's file in MiB (default 256)
  LINKD_TEST_SWEEP          crash points per syscall in the strace sweep (default 8)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from checker import check_events, check_queue, scan_inbox
from procs import (
    Daemon,
    entries,
    file_sha256,
    make_pair,
    make_pair_via_proxy,
    stop_all,
    wait_for,
    write_file,
)
from socketpeer import FakeSender

CHANNELS = [{"name": "alerts", "priority": 10}, {"name": "data"}]
NAMES = ["alerts", "data"]
MiB = 1 << 20


def _seed() -> int:
    return int(os.environ.get("LINKD_TEST_SEED") or random.randrange(1 << 32))


def _report(title: str, **figures: Any) -> None:
    """Figures for the closing note: printed (-s) and appended to a report file."""
    line = f"[{title}] " + " ".join(f"{k}={v}" for k, v in figures.items())
    print("\n" + line, flush=True)
    path = os.environ.get("LINKD_TEST_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _queued(d: Daemon, peer: str) -> int | None:
    try:
        for p in d.status()["peers"]:
            if p["name"] == peer:
                return sum(int(c["queued"]) for c in p["channels"])
    except (OSError, AssertionError, ValueError, KeyError):
        return None
    return None


def _claimed_files(d: Daemon, peer: str) -> list[str]:
    """Claimed-but-unresolved files left in the sender's queue/."""
    root = d.spool / peer / "queue"
    found = []
    for ch_dir in sorted(p for p in root.glob("*") if p.is_dir()):
        found += [f"{ch_dir.name}/{n}" for n in entries(ch_dir) if n.endswith(".data")]
    return found


def _stopped_cleanly(*daemons: Daemon) -> None:
    for d in daemons:
        if d.running:
            assert d.stop() == 0, d.tail()


# ---------------------------------------------------------------------------------------
# 1. The kill test
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Drop:
    channel: str
    name: str
    size: int


def _plan(rng: random.Random, count: int, big: list[int]) -> list[Drop]:
    """`count` files: mostly 0 B - 64 KiB, ~3 % up to 1 MiB, plus the `big` sizes;
    ~1/4 on `alerts`, the rest (and every big one) on `data`."""
    sizes = []
    for _ in range(count - len(big)):
        roll = rng.random()
        if roll < 0.03:
            sizes.append(0)
        elif roll < 0.06:
            sizes.append(rng.randint(64 * 1024, MiB))
        else:
            sizes.append(rng.randint(1, 64 * 1024))
    slots = sorted(rng.sample(range(len(sizes) + len(big)), len(big)))
    for slot, size in zip(slots, big, strict=True):
        sizes.insert(slot, size)
    drops = []
    for i, size in enumerate(sizes):
        channel = "data" if size > MiB or rng.random() >= 0.25 else "alerts"
        drops.append(Drop(channel, f"f{i:06d}-{size}.bin", size))
    return drops


class Dropper(threading.Thread):
    """Drops the planned files into alpha's out/ over `seconds`, the Maildir way."""

    def __init__(self, sender: Daemon, peer: str, drops: list[Drop], seconds: float,
                 staging: Path) -> None:
        super().__init__(name="dropper", daemon=True)
        self.sender, self.peer, self.drops, self.seconds = sender, peer, drops, seconds
        self.staging = staging
        self.expected: dict[str, dict[str, str]] = {n: {} for n in NAMES}
        self.order: dict[str, list[str]] = {n: [] for n in NAMES}
        self.error: BaseException | None = None
        self.done = threading.Event()
        # Held while a staged file is open for writing. A daemon started meanwhile
        # (fork, then exec) holds a copy of that descriptor until its exec: linkd
        # sees a writer on a file already renamed into out/, rightly holds it back,
        # and the files renamed after it overtake it -- allowed (CONTRACT §4: pick-up
        # order), but not the drop order this test checks. Found once in CI (seed
        # 3330749880: f001042 queued after f001072, during a receiver restart).
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            start = time.monotonic()
            self.staging.mkdir(parents=True, exist_ok=True)
            for i, drop in enumerate(self.drops):
                # pace the drops evenly over `seconds` (timing, not synchronisation)
                due = start + self.seconds * i / len(self.drops)
                time.sleep(max(0.0, due - time.monotonic()))
                out = self.sender.out_dir(self.peer, drop.channel)
                temp = self.staging / drop.name
                with self.lock:
                    sha = write_file(temp, drop.size)
                os.rename(temp, out / drop.name)
                self.expected[drop.channel][drop.name] = sha
                self.order[drop.channel].append(drop.name)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.done.set()


def run_kill_test(tmp_path: Path, *, files: int, kills: int, big: list[int],
                  drop_seconds: float, max_pause: float, title: str) -> None:
    seed = _seed()
    rng = random.Random(seed)
    print(f"\n[{title}] seed={seed} (LINKD_TEST_SEED to replay)", flush=True)
    a, b = make_pair(tmp_path, channels=CHANNELS)
    try:
        drops = _plan(rng, files, big)
        total_bytes = sum(d.size for d in drops)
        # staging on the same file system as the spool, so that the drop is a rename
        dropper = Dropper(a, "bravo", drops, drop_seconds, a.dir / "staging")
        started = time.monotonic()
        dropper.start()
        victims = {"receiver": b, "sender": a}
        for k in range(kills):
            role = "receiver" if k % 2 == 0 else "sender"
            victim = victims[role]
            # Kill at a random moment of a live link: wait until it is up, then a random pause.
            a.wait_state("bravo", timeout=30)
            time.sleep(rng.uniform(0, max_pause))          # the fault injection itself
            victim.kill()
            with dropper.lock:          # no fork while a staged file is open (Dropper)
                victim.start(wait=False)
            wait_for(victim.healthy, 30, message=victim.tail)
        kill_time = time.monotonic() - started
        assert dropper.done.wait(300), "dropper did not finish"
        assert dropper.error is None, f"dropper failed: {dropper.error!r}"
        expected = dropper.expected

        def complete() -> bool:
            if _queued(a, "bravo") != 0 or any(entries(a.out_dir("bravo", ch)) for ch in NAMES):
                return False
            return all(len(entries(b.in_dir("alpha", ch))) >= len(expected[ch]) for ch in NAMES)

        def progress() -> str:
            got = {ch: len(entries(b.in_dir("alpha", ch))) for ch in NAMES}
            want = {ch: len(expected[ch]) for ch in NAMES}
            return (f"in/ {got} of {want}; sender queued {_queued(a, 'bravo')}\n"
                    f"--- alpha\n{a.tail(15)}\n--- bravo\n{b.tail(15)}")

        wait_for(complete, 180, interval=0.1, message=progress)
        elapsed = time.monotonic() - started
        _stopped_cleanly(a, b)

        report = check_queue(expected, scan_inbox(b.spool / "alpha" / "in", NAMES))
        events = check_events(b.events("message_delivered"), expected, dropper.order)
        sent = a.events("message_sent")
        sent_twice = [k for k, n in _count((e["channel"], e["seq"]) for e in sent).items()
                      if n > 1]
        _report(title, files=files, bytes=total_bytes, kills=kills, seed=seed,
                kill_phase_s=round(kill_time, 1), total_s=round(elapsed, 1),
                files_per_s=round(files / elapsed, 1),
                mib_per_s=round(total_bytes / MiB / elapsed, 2),
                delivered_events=events.events, events_missing=len(events.missing),
                restarts_receiver=(kills + 1) // 2, restarts_sender=kills // 2)
        assert report.valid, report.summary()
        assert report.delivered_ok == files
        assert events.valid, events.summary()
        assert not sent_twice, f"message_sent logged twice for {sent_twice[:10]}"
        for ch in NAMES:
            assert entries(a.out_dir("bravo", ch)) == [], f"sender out/{ch} not empty"
        assert _claimed_files(a, "bravo") == []
        assert entries(b.spool / "alpha" / "tmp") == [], "receiver tmp/ not empty"
        assert entries(b.spool / "alpha" / "quarantine") == []
        for ch in NAMES:
            assert entries(a.spool / "bravo" / "failed" / ch) == []
    finally:
        stop_all(a, b)


def _count(items: Any) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def test_kill_sender_and_receiver_at_random(tmp_path: Path) -> None:
    """1,200 files on two channels; 12 SIGKILLs alternating receiver/sender; exactly
    once (the long variant: 10,000 files, 100 kills)."""
    run_kill_test(tmp_path, files=1200, kills=12, big=[3 * MiB, 6 * MiB, 9 * MiB],
                  drop_seconds=9, max_pause=0.8, title="kill-test")


@pytest.mark.slow
def test_kill_sender_and_receiver_at_random_long(tmp_path: Path) -> None:
    """10,000 files, 100 SIGKILLs."""
    run_kill_test(tmp_path, files=10_000, kills=100,
                  big=[3 * MiB, 6 * MiB, 9 * MiB, 12 * MiB, 20 * MiB],
                  drop_seconds=80, max_pause=1.0, title="kill-test-long")


# ---------------------------------------------------------------------------------------
# 2. The consumer took it: a resend of a committed seq must not reappear
# ---------------------------------------------------------------------------------------


def test_consumer_took_it_sender_state_rolled_back(tmp_path: Path) -> None:
    """The sender comes back with seq 1 still claimed (its state dir and queue restored
    from a copy taken before the ack) after the consumer removed the delivered file: the
    peer's durable record of what it committed, not the contents of in/, decides; the
    file must not reappear (the peer's journal names the same content under seq 1)."""
    a, b = make_pair(tmp_path, start=False)
    try:
        a.start()                                   # bravo is down: alpha only claims
        payload = os.urandom(70_000)
        a.drop("bravo", "data", "took.bin", payload)
        claimed = a.spool / "bravo" / "queue" / "data" / "1.data"
        queue = a.spool / "bravo" / "queue"
        wait_for(lambda: claimed.exists() and not entries(a.out_dir("bravo", "data")), 20,
                 message=a.tail)
        a.kill()
        snapshot = tmp_path / "alpha-state-before-ack"
        shutil.copytree(a.state, snapshot, symlinks=True)
        shutil.copytree(queue, tmp_path / "alpha-queue-before-ack", symlinks=True)

        b.start()
        a.start()
        wait_for(lambda: b.inbound("alpha", "data") == {"took.bin": payload}, 30,
                 message=b.tail)
        wait_for(lambda: a.events("message_sent"), 20, message=a.tail)
        os.unlink(b.in_dir("alpha", "data") / "took.bin")           # the consumer took it

        a.kill()                                    # roll the sender back to "seq 1 claimed"
        shutil.rmtree(a.state)
        shutil.copytree(snapshot, a.state, symlinks=True)
        shutil.rmtree(queue)
        shutil.copytree(tmp_path / "alpha-queue-before-ack", queue, symlinks=True)
        assert claimed.exists()
        a.start()
        a.wait_state("bravo")
        # Barrier: a later message on the same channel is delivered in order after seq 1
        # would have been, so once it is there, seq 1 is settled one way or the other.
        a.drop("bravo", "data", "after.bin", b"after")
        wait_for(lambda: "after.bin" in b.inbound("alpha", "data"), 30, message=b.tail)
        wait_for(lambda: _claimed_files(a, "bravo") == [] and _queued(a, "bravo") == 0, 20,
                 message=a.tail)
        assert b.inbound("alpha", "data") == {"after.bin": b"after"}
        delivered = [(e["seq"], e["name"]) for e in b.events("message_delivered")]
        assert delivered == [(1, "took.bin"), (2, "after.bin")], delivered
    finally:
        stop_all(a, b)




def test_consumer_took_it_wire_resend(tmp_path: Path) -> None:
    """The real receiver gets `msg` seq 1 again on the wire after the consumer removed
    the delivered file: it acks without writing anything, and the next seq still works."""
    a, b = make_pair(tmp_path)
    try:
        payload = os.urandom(50_000)
        a.drop("bravo", "data", "took.bin", payload)
        wait_for(lambda: b.inbound("alpha", "data") == {"took.bin": payload}, 30)
        wait_for(lambda: a.events("message_sent"), 20)
        a.stop()                                    # the real sender goes away cleanly
        os.unlink(b.in_dir("alpha", "data") / "took.bin")           # the consumer took it
        b.wait_state("alpha", "waiting")

        fake = FakeSender(a.pki_dir, "alpha", "bravo", b.port, ["data"])
        try:
            S = fake.S
            hello = fake.pump_until(lambda evs: [e for e in evs if isinstance(e, S.PeerHello)])
            peer_ch = {c.name: c for c in hello[0].hello.channels}["data"]
            assert peer_ch.committed == 1
            fake.send_file("data", 1, "took.bin", payload)      # the duplicate, in full
            acks = fake.pump_until(lambda evs: [e for e in evs if isinstance(e, S.AckReceived)])
            assert acks[0].entries[0].seq == 1
            assert not [e for e in fake.events if isinstance(e, S.NackReceived)]
            fake.send_file("data", 2, "next.bin", b"next")       # a barrier: in order after 1
            fake.pump_until(lambda evs: [e for e in evs if isinstance(e, S.AckReceived)
                                         and e.entries[0].seq == 2])
        finally:
            fake.close()
        assert b.inbound("alpha", "data") == {"next.bin": b"next"}
        assert entries(b.spool / "alpha" / "tmp") == []
        delivered = [(e["seq"], e["name"]) for e in b.events("message_delivered")]
        assert delivered == [(1, "took.bin"), (2, "next.bin")], delivered
    finally:
        stop_all(a, b)


# ---------------------------------------------------------------------------------------
# 3. Lost ack: committed on the receiver, never acknowledged to the sender
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["cut", "kill-sender"])
def test_lost_ack(tmp_path: Path, fault: str) -> None:
    """The proxy forwards the sender's bytes but holds back the receiver's (so the ack is
    never seen) until the receiver has logged the commit; then the connection is cut (or
    the sender killed). After reconnecting: one copy, one message_sent."""
    a, b, proxy = make_pair_via_proxy(tmp_path, link={"heartbeat_timeout": 10.0})
    try:
        proxy.hold_down = True                      # receiver -> sender: swallowed from now
        payload = os.urandom(200_000)
        a.drop("bravo", "data", "once.bin", payload)
        wait_for(lambda: b.events("message_delivered"), 20, message=b.tail)
        assert a.events("message_sent") == [], "the ack got through: the fault missed"
        # The receiver logs the delivery before it sends the ack: wait for the ack's bytes.
        wait_for(lambda: proxy.held_bytes > 0, 10, message=b.tail)
        if fault == "cut":
            proxy.hold_down = False
            assert proxy.cut() >= 1
        else:
            a.kill()
            proxy.hold_down = False
            proxy.cut()
            a.start()
        wait_for(lambda: a.events("message_sent"), 30, message=a.tail)
        a.wait_state("bravo")
        # a barrier message: once it is through, nothing of seq 1 can still be in flight
        a.drop("bravo", "data", "after.bin", b"after")
        wait_for(lambda: "after.bin" in b.inbound("alpha", "data"), 30)
        wait_for(lambda: _queued(a, "bravo") == 0, 20)
        assert b.inbound("alpha", "data") == {"once.bin": payload, "after.bin": b"after"}
        sent = [(e["seq"], e["name"]) for e in a.events("message_sent")]
        assert sent == [(1, "once.bin"), (2, "after.bin")], sent
        delivered = [(e["seq"], e["name"]) for e in b.events("message_delivered")]
        assert delivered == [(1, "once.bin"), (2, "after.bin")], delivered
        assert _claimed_files(a, "bravo") == []
    finally:
        stop_all(a, b)
        proxy.close()


# ---------------------------------------------------------------------------------------
# 4. Resume from the receiver's durable offset
# ---------------------------------------------------------------------------------------


def _resume_size() -> int:
    return int(float(os.environ.get("LINKD_TEST_RESUME_MB", "256")) * MiB)


def run_resume_test(tmp_path: Path, fault: str, size: int) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free < 4 * size + 512 * MiB:
        pytest.skip(f"needs ~{4 * size >> 20} MiB free in {tmp_path}, has {free >> 20} MiB")
    a, b, proxy = make_pair_via_proxy(tmp_path)
    try:
        staging = a.dir / "staging"
        staging.mkdir()
        sha = write_file(staging / "big.bin", size)
        started = time.monotonic()
        os.rename(staging / "big.bin", a.out_dir("bravo", "data") / "big.bin")
        partial = b.spool / "alpha" / "tmp" / "data.1.part"
        wait_for(lambda: partial.stat().st_size >= size // 2, 120, interval=0.005,
                 message=lambda: f"partial never reached half\n{b.tail()}")
        if fault == "kill-receiver":
            b.kill()
            at_cut = proxy.up_bytes
            proxy.cut()
            b.start()
        else:
            at_cut = proxy.up_bytes
            proxy.cut()
        final = b.in_dir("alpha", "data") / "big.bin"
        wait_for(final.exists, 180, interval=0.05, message=lambda: b.tail())
        elapsed = time.monotonic() - started
        wait_for(lambda: _queued(a, "bravo") == 0, 30)
        assert file_sha256(final) == sha
        total = proxy.up_bytes
        _report(f"resume-{fault}", size_mib=size >> 20, cut_at_mib=round(at_cut / MiB, 1),
                crossed_mib=round(total / MiB, 1), ratio=round(total / size, 3),
                seconds=round(elapsed, 1), connections=proxy.connections)
        assert proxy.connections >= 2
        assert total < 1.3 * size, f"{total} bytes crossed for a {size}-byte file: no resume"
        assert entries(b.spool / "alpha" / "tmp") == []
        assert [e["seq"] for e in b.events("message_delivered")] == [1]
        assert [e["seq"] for e in a.events("message_sent")] == [1]
    finally:
        stop_all(a, b)
        proxy.close()


@pytest.mark.parametrize("fault", ["kill-receiver", "cut"])
def test_resume_big_file_from_durable_offset(tmp_path: Path, fault: str) -> None:
    run_resume_test(tmp_path, fault, _resume_size())


@pytest.mark.slow
def test_resume_1gib(tmp_path: Path) -> None:
    run_resume_test(tmp_path, "kill-receiver", 1 << 30)


# ---------------------------------------------------------------------------------------
# 5. ENOSPC on the receiver
# ---------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 4 MiB tmpfs (root only); unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_enospc_on_receiver_then_resumes(tmp_path: Path, small_fs: Path) -> None:
    a, b = make_pair(tmp_path, start=False)
    b.spool, b.state = small_fs / "spool", small_fs / "state"   # same file system, as required
    try:
        b.start()
        a.start()
        a.wait_state("bravo")
        filler = small_fs / "filler"
        st = os.statvfs(small_fs)
        with open(filler, "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - 1 * MiB))
        payload = os.urandom(2 * MiB)                   # does not fit in the ~1 MiB left
        a.drop("bravo", "data", "big.bin", payload)

        failed = wait_for(lambda: b.events("inbound_storage_failed"), 30, message=b.tail)
        assert "No space left" in failed[0]["reason"], failed[0]
        # The receiver nacks "busy": the sender waits and retries without counting an
        # attempt, and the session (so the other direction) stays up.
        retry = wait_for(lambda: a.events("message_retry"), 30, message=a.tail)
        assert retry[0]["seq"] == 1 and "cannot store" in retry[0]["reason"], retry[0]
        assert a.peer_state("bravo") == "connected"
        assert a.events("message_sent") == []              # no ack
        assert entries(b.in_dir("alpha", "data")) == []   # nothing half-visible
        assert _queued(a, "bravo") == 1
        assert not [e for e in b.events("session_crashed")], b.tail()

        filler.unlink()                                     # space comes back
        wait_for(lambda: b.inbound("alpha", "data") == {"big.bin": payload}, 60,
                 message=b.tail)
        wait_for(lambda: _queued(a, "bravo") == 0, 20)
        assert [e["seq"] for e in a.events("message_sent")] == [1]
        assert entries(b.spool / "alpha" / "tmp") == []
    finally:
        stop_all(a, b)


# ---------------------------------------------------------------------------------------
# 6. Crash-point sweep: strace kills the receiver at its N-th fsync / rename
# ---------------------------------------------------------------------------------------


SWEEP_SYSCALLS = {"fsync": "fsync,fdatasync,syncfs", "rename": "rename,renameat,renameat2"}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("call", sorted(SWEEP_SYSCALLS))
def test_crash_point_sweep_with_strace(tmp_path: Path, call: str) -> None:
    """For N = 1..K: start the receiver under strace, which SIGKILLs it at its N-th
    `call` (counted per thread); restart it cleanly; every round's files must arrive
    exactly once. Each round sends a small batch on both channels plus a multi-MiB
    file now and then (checkpoint writes)."""
    rounds = int(os.environ.get("LINKD_TEST_SWEEP", "8"))
    probe = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=none",
                            "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()}")
    a, b = make_pair(tmp_path, channels=CHANNELS)
    expected: dict[str, dict[str, str]] = {n: {} for n in NAMES}
    killed = 0
    points = []                     # (N, files of the round already in in/ when it ended)
    rng = random.Random(_seed())
    started = time.monotonic()
    try:
        b.stop()
        traced = SWEEP_SYSCALLS[call]
        first = traced.split(",")[0]
        for n in range(1, rounds + 1):
            for i in range(6):
                ch = NAMES[i % 2]
                size = 9 * MiB if (i == 0 and n % 3 == 0) else rng.randint(0, 40_000)
                name = f"r{n:02d}-{i}.bin"
                data = os.urandom(size)
                a.drop("bravo", ch, name, data)
                expected[ch][name] = hashlib.sha256(data).hexdigest()
            b.wrap = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={traced}",
                      "-e", f"inject={traced}:signal=SIGKILL:when={n}"]
            b.start(wait=False)

            def settled() -> str | None:
                assert b.proc is not None
                if b.proc.poll() is not None:
                    return "killed"
                if _queued(a, "bravo") == 0 and all(
                        set(expected[ch]) <= set(entries(b.in_dir("alpha", ch)))
                        for ch in NAMES):
                    return "survived"
                return None
            outcome = wait_for(settled, 60, interval=0.05,
                               message=lambda n=n: f"round {n}\n{b.tail()}\n{a.tail(10)}")
            b.kill()
            b.wrap = []
            landed = sum(1 for ch in NAMES for x in entries(b.in_dir("alpha", ch))
                         if x.startswith(f"r{n:02d}-"))
            points.append(f"{n}:{'K' if outcome == 'killed' else 'S'}{landed}")
            if outcome == "killed":
                killed += 1
                assert b.proc is not None and b.proc.returncode in (-9, 137), b.proc.returncode
            b.start()                                    # a clean restart: recovery
            wait_for(lambda: _queued(a, "bravo") == 0 and all(
                set(expected[ch]) <= set(entries(b.in_dir("alpha", ch))) for ch in NAMES),
                60, message=lambda n=n: f"after round {n}\n{b.tail()}")
            b.stop()
        b.start()
        _stopped_cleanly(a, b)
        report = check_queue(expected, scan_inbox(b.spool / "alpha" / "in", NAMES))
        events = check_events(b.events("message_delivered"), expected)
        _report(f"strace-sweep-{first}", rounds=rounds, killed=killed,
                files=sum(len(v) for v in expected.values()),
                seconds=round(time.monotonic() - started, 1),
                points=",".join(points))
        assert report.valid, report.summary()
        assert events.valid, events.summary()
        # strace counts calls per thread, and spool work runs in trio's worker threads
        # (one inbound worker per channel), so a high N may never be reached in one
        # thread: require a third of the rounds to have really crashed.
        assert killed >= rounds // 3, f"strace killed the receiver in only {killed} rounds"
        # No partial survives. (A kill inside the start-up probe of SpoolLayout.create
        # leaves its `.linkd-probe-<pid>` behind in tmp/: harmless, reported separately.)
        leftovers = [n for n in entries(b.spool / "alpha" / "tmp")
                     if not n.startswith(".linkd-probe-")]
        assert leftovers == []
    finally:
        stop_all(a, b)


# ---------------------------------------------------------------------------------------
# 7. Refusals go to failed/ with a reason, and others keep flowing
# ---------------------------------------------------------------------------------------


def _reason(d: Daemon, ch: str, name: str) -> str:
    path = d.spool / "bravo" / "failed" / ch / (name + ".reason")
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text.strip()


def test_over_peer_max_goes_to_failed_and_others_flow(tmp_path: Path) -> None:
    a, b = make_pair(tmp_path, start=False)
    b.peers[0]["channels"] = [{"name": "data", "max_message_bytes": 100_000}]
    try:
        # Dropped before the first hello: alpha does not know bravo's limit yet, so the
        # big one is claimed and then failed at send time (never on the wire).
        a.drop("bravo", "data", "s1.bin", b"one")
        a.drop("bravo", "data", "big1.bin", os.urandom(300_000))
        a.drop("bravo", "data", "s2.bin", b"two")
        b.start()
        a.start()
        wait_for(lambda: set(b.inbound("alpha", "data")) == {"s1.bin", "s2.bin"}, 30,
                 message=a.tail)
        # Dropped while connected: refused at pick-up.
        a.drop("bravo", "data", "big2.bin", os.urandom(200_000))
        a.drop("bravo", "data", "s3.bin", b"three")
        wait_for(lambda: "s3.bin" in b.inbound("alpha", "data"), 30, message=a.tail)
        wait_for(lambda: _queued(a, "bravo") == 0, 20)
        failed_dir = a.spool / "bravo" / "failed" / "data"
        assert entries(failed_dir) == ["big1.bin", "big1.bin.reason", "big2.bin",
                                       "big2.bin.reason"]
        for name in ("big1.bin", "big2.bin"):
            assert "max_message_bytes" in _reason(a, "data", name)
        assert b.inbound("alpha", "data") == {"s1.bin": b"one", "s2.bin": b"two",
                                              "s3.bin": b"three"}
        assert sorted(e["name"] for e in a.events("message_failed")) == ["big1.bin",
                                                                         "big2.bin"]
        assert [e["name"] for e in b.events("message_delivered")] == ["s1.bin", "s2.bin",
                                                                       "s3.bin"]
        assert entries(b.spool / "alpha" / "quarantine") == []
    finally:
        stop_all(a, b)


SETPRIV = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
           "--inh-caps=-dac_override,-dac_read_search"]


def test_unreadable_file_goes_to_failed(tmp_path: Path) -> None:
    """Root ignores file modes, so the sender runs without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH; a mode-000 file then gives EACCES at pick-up."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing: cannot get EACCES")
        secret = tmp_path / "probe"
        secret.write_bytes(b"x")
        secret.chmod(0)
        probe = subprocess.run([*SETPRIV, sys.executable, "-c",
                                f"open({str(secret)!r}, 'rb')"], capture_output=True)
        if probe.returncode == 0:
            pytest.skip("setpriv did not take CAP_DAC_OVERRIDE away here")
    a, b = make_pair(tmp_path, start=False)
    if os.geteuid() == 0:
        a.wrap = list(SETPRIV)
    try:
        b.start()
        a.start()
        a.wait_state("bravo")
        a.drop("bravo", "data", "ok1.bin", b"ok1")
        staging = a.dir / "staging"
        staging.mkdir()
        (staging / "secret.bin").write_bytes(b"cannot read me")
        (staging / "secret.bin").chmod(0)
        os.rename(staging / "secret.bin", a.out_dir("bravo", "data") / "secret.bin")
        a.drop("bravo", "data", "ok2.bin", b"ok2")
        wait_for(lambda: set(b.inbound("alpha", "data")) == {"ok1.bin", "ok2.bin"}, 30,
                 message=a.tail)
        wait_for(lambda: (a.spool / "bravo" / "failed" / "data" / "secret.bin").exists(), 20,
                 message=a.tail)
        assert "Permission denied" in _reason(a, "data", "secret.bin")
        assert entries(a.out_dir("bravo", "data")) == []
        failed = a.events("message_failed")
        assert [e["name"] for e in failed] == ["secret.bin"], failed
    finally:
        stop_all(a, b)


# ---------------------------------------------------------------------------------------
# 8. One daemon per state dir
# ---------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """path -> (mode, size, mtime_ns, sha256 or '') of everything under root."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = ""
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return found


def test_second_daemon_on_same_state_dir_refuses(tmp_path: Path) -> None:
    a, b = make_pair(tmp_path)
    try:
        b.drop("alpha", "data", "queued.bin", b"x")     # something live in the spool
        wait_for(lambda: "queued.bin" in a.inbound("bravo", "data"), 20)
        wait_for(lambda: _queued(b, "alpha") == 0, 20)
        before_spool, before_state = _tree(b.spool), _tree(b.state)
        sock_inode = b.socket.stat().st_ino
        done = subprocess.run([sys.executable, "-m", "linkd.cli.linkd_main", "-c",
                               str(b.config_path), "--log-format", "json"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert "in use" in lines[0] and str(b.state) in lines[0], lines[0]
        assert _tree(b.spool) == before_spool
        assert _tree(b.state) == before_state
        assert b.socket.stat().st_ino == sock_inode
        assert b.healthy()
        # and the first daemon still works
        a.drop("bravo", "data", "after.bin", b"after")
        wait_for(lambda: "after.bin" in b.inbound("alpha", "data"), 20)
    finally:
        stop_all(a, b)
