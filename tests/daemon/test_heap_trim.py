"""The heap goes back to the kernel once a daemon is quiet (linkd/heap.py): with the
malloc tuning of cli/linkd_main.py a daemon otherwise keeps its peak RSS after a
transfer, which an operator cannot tell from a leak."""

import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from procs import make_pair, proc_rss_bytes, stop_all, wait_for

import linkd.daemon as daemonmod
from linkd import heap
from linkd.heap import IdleTrim


class Fake:
    def __init__(self) -> None:
        self.cpu = 0.0
        self.now = 0.0

    def run(self, seconds: float, share: float) -> None:
        self.now += seconds
        self.cpu += seconds * share


def passes(trim: IdleTrim, fake: Fake, n: int, share: float, step: float = 2.0) -> list[bool]:
    out = []
    for _ in range(n):
        fake.run(step, share)
        out.append(trim.due())
    return out


def test_trims_once_after_a_busy_period_then_quiet():
    fake = Fake()
    trim = IdleTrim(cpu=lambda: fake.cpu, clock=lambda: fake.now, quiet=10.0, busy_share=0.1)
    assert passes(trim, fake, 5, 0.9) == [False] * 5                # busy: never
    # quiet from here: due once 10 s after the last busy pass, then never again
    assert passes(trim, fake, 10, 0.0) == [False] * 4 + [True] + [False] * 5
    assert trim.trims == 1


def test_an_idle_hub_never_trims_and_a_new_busy_period_trims_again():
    fake = Fake()
    trim = IdleTrim(cpu=lambda: fake.cpu, clock=lambda: fake.now, quiet=10.0, busy_share=0.1)
    assert not any(passes(trim, fake, 100, 0.03))      # 3 % of a core: quiet, never busy
    assert not any(passes(trim, fake, 3, 0.5))
    assert passes(trim, fake, 4, 0.05) == [False] * 4  # 8 s of quiet: not yet
    assert passes(trim, fake, 1, 0.8) == [False]       # busy again: the wait starts over
    assert passes(trim, fake, 5, 0.0) == [False] * 4 + [True]
    assert trim.trims == 1


async def test_housekeeping_trims_in_a_worker_thread_when_due(
        autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(
        threading.current_thread() is not threading.main_thread()) or True)
    answers = iter([False, True, False])

    class Fake:
        links: dict[str, object] = {}
        expiry = SimpleNamespace(check=lambda board: None)
        heap_trim = SimpleNamespace(due=lambda: next(answers, False))
        board = None

        async def refresh_folder_counts(self, **kw: object) -> None:
            pass
    with trio.move_on_after(3 * daemonmod.HOUSEKEEPING - 0.1):
        await daemonmod.Daemon._housekeeping(Fake())    # type: ignore[arg-type]
    assert calls == [True]          # once, when due, off the event loop


FRAMES = """
import sys
from linkd.cli.linkd_main import tune_malloc
from linkd.heap import trim

def rss_kib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 10

if not tune_malloc():
    print("untuned"); sys.exit(0)
frames = [bytearray(256 << 10) for _ in range(48)]     # 12 MiB of data frames
for frame in frames:
    frame[::4096] = bytes(len(frame[::4096]))
above = bytearray(1000)                                # something allocated after them
del frames
held = rss_kib()
trimmed = trim()
print(held, rss_kib(), trimmed)
"""


def test_trim_returns_the_frames_the_tuned_heap_keeps():
    out = subprocess.run([sys.executable, "-c", FRAMES], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "untuned":
        pytest.skip("no glibc mallopt here")
    held, after, trimmed = out.stdout.split()
    assert trimmed == "True"
    assert int(held) - int(after) > 8 * 1024, out.stdout   # most of the 12 MiB


def test_a_daemon_gives_its_peak_back_after_a_transfer(tmp_path):
    """A real pair: after 64 MiB the receiver's RSS falls from its peak without any
    traffic (without the trim it stays at the peak: 55 vs 50 MiB measured)."""
    a, b = make_pair(tmp_path, channels=[{"name": "bulk"}])
    try:
        out = a.out_dir("bravo", "bulk")
        staged = out / ".big"
        with open(staged, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
        os.rename(staged, out / "big")
        landed = b.in_dir("alpha", "bulk") / "big"
        peak = 0

        def arrived() -> bool:
            nonlocal peak
            peak = max(peak, proc_rss_bytes(b.proc.pid))
            return landed.exists()
        wait_for(arrived, 120, interval=0.02)
        peak = max(peak, proc_rss_bytes(b.proc.pid))
        # QUIET (10 s) after the busy passes, then the next housekeeping pass (2 s)
        wait_for(lambda: proc_rss_bytes(b.proc.pid) < peak - (2 << 20), 60, interval=0.5)
    finally:
        stop_all(a, b)
