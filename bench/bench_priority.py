#!/usr/bin/env python3
"""Benchmark: pick-up-to-delivery latency of small high-priority files while a big
low-priority file streams over the same link (CONTRACT §4.4; target p99 < 50 ms).

Two real daemons on 127.0.0.1 (the tests' harness, tests/support/procs.py). A file of
--bulk-mib MiB goes on channel "bulk" (priority 0); while it streams, a small file
is renamed into out/alerts/ (priority 10) every --interval seconds. Latency is
measured from just after that rename() to the IN_MOVED_TO inotify event for the
file in the receiver's in/alerts/. A baseline run without the bulk file comes first.

    .venv/bin/python bench/bench_priority.py                # 500 MiB
    .venv/bin/python bench/bench_priority.py --bulk-mib 200 --interval 0.01
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import inotify_simple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
from procs import make_pair, proc_rss_bytes, stop_all, wait_for  # noqa: E402

CHANNELS = [{"name": "bulk", "priority": 0}, {"name": "alerts", "priority": 10}]


class Arrivals(threading.Thread):
    """Timestamps IN_MOVED_TO events in a folder (the receiver's final rename)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        folder.mkdir(parents=True, exist_ok=True)
        self.ino = inotify_simple.INotify()
        self.ino.add_watch(str(folder), inotify_simple.flags.MOVED_TO)
        self.seen: dict[str, float] = {}
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            for ev in self.ino.read(timeout=100):
                self.seen.setdefault(ev.name, time.monotonic())


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(label: str, lat: list[float]) -> str:
    ms = [x * 1000 for x in lat]
    return (f"{label:<28} n={len(ms):4d}  p50 {pct(ms, 50):6.1f} ms  p90 {pct(ms, 90):6.1f} ms"
            f"  p99 {pct(ms, 99):6.1f} ms  max {max(ms):6.1f} ms")


def send_alerts(a, arrivals: Arrivals, prefix: str, interval: float, until) -> dict[str, float]:
    out = a.out_dir("bravo", "alerts")
    dropped: dict[str, float] = {}
    i = 0
    while not until(i):
        name = f"{prefix}{i:05d}.txt"
        tmp = out / f".{name}"
        tmp.write_bytes(os.urandom(1000))
        os.rename(tmp, out / name)
        dropped[name] = time.monotonic()
        i += 1
        time.sleep(interval)
    wait_for(lambda: all(n in arrivals.seen for n in dropped), 60, interval=0.01)
    return {n: arrivals.seen[n] - t for n, t in dropped.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bulk-mib", type=int, default=500)
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between alerts")
    ap.add_argument("--baseline", type=int, default=100, help="alerts sent with no bulk load")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--priority-hold", type=float, default=None,
                    help="the sender's [link] priority_hold (default: linkd's, 0.25; 0: off)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-priority-"))
    link = {} if args.priority_hold is None else {"priority_hold": args.priority_hold}
    a, b = make_pair(root, channels=CHANNELS, link=link)
    try:
        arrivals = Arrivals(b.in_dir("alpha", "alerts"))
        arrivals.start()
        base = send_alerts(a, arrivals, "base", args.interval,
                           lambda i: i >= args.baseline)
        print(summary("idle link", list(base.values())))

        big = a.out_dir("bravo", "bulk") / ".big.bin"
        with open(big, "wb") as f:
            for _ in range(args.bulk_mib):
                f.write(os.urandom(1 << 20))
        peak = {a.name: 0, b.name: 0}
        t0 = time.monotonic()
        os.rename(big, a.out_dir("bravo", "bulk") / "big.bin")
        landed = b.in_dir("alpha", "bulk") / "big.bin"
        tmp = b.spool / "alpha" / "tmp"
        wait_for(lambda: any(p.stat().st_size for p in tmp.iterdir()), 120, interval=0.002)

        def done(_i: int) -> bool:
            for d in (a, b):
                peak[d.name] = max(peak[d.name], proc_rss_bytes(d.proc.pid))
            return landed.exists()
        loaded = send_alerts(a, arrivals, "load", args.interval, done)
        wait_for(landed.exists, 600, interval=0.05)
        took = time.monotonic() - t0
        print(summary(f"during {args.bulk_mib} MiB bulk", list(loaded.values())))
        print(f"bulk: {args.bulk_mib} MiB in {took:.1f}s ({args.bulk_mib / took:.0f} MiB/s, "
              f"hashing at pick-up included); peak RSS alpha {peak['alpha'] >> 20} MiB, "
              f"bravo {peak['bravo'] >> 20} MiB")
        p99 = pct(list(loaded.values()), 99) * 1000
        print(f"p99 under load: {p99:.1f} ms (target < 50 ms): {'OK' if p99 < 50 else 'MISSED'}")
        arrivals.stopping = True
        return 0
    finally:
        stop_all(a, b)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
