#!/usr/bin/env python3
"""End-to-end delivery throughput and latency of two real linkd daemons on 127.0.0.1.

    .venv/bin/python bench/bench_delivery.py [--files 20000] [--file-kib 4]
                                             [--big-mib 1024] [--dir DIR] [--keep]

Two runs, each on a fresh pair of daemons (tests/support/procs.py: throwaway PKI, JSON logs):

1. many small files: `--files` files of `--file-kib` KiB are written to a staging folder
   first (not timed), then renamed into the sender's out/data/ as fast as possible
   (the Maildir way). Timed from the first rename until the receiver has them all and
   the sender has every acknowledgement (status `queued` = 0).
2. one big file of `--big-mib` MiB, staged the same way; timed from its rename until it
   is in the receiver's in/ and acknowledged.

Latency is per file: from its rename into out/ (the moment it becomes eligible for
pick-up) to the receiver's `message_delivered` log event (durably committed). With a
backlog of 20,000 files the tail is dominated by queueing, so p50/p99 are reported for
the backlog run and for a paced run (`--paced-rate` files/s for `--paced-seconds`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

from procs import entries, make_pair, stop_all, wait_for, write_file  # noqa: E402

MiB = 1 << 20


def _queued(d, peer: str) -> int | None:
    try:
        for p in d.status()["peers"]:
            if p["name"] == peer:
                return sum(int(c["queued"]) for c in p["channels"])
    except Exception:
        return None
    return None


def _ts(event: dict) -> float:
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _latencies(receiver, dropped_at: dict[str, float]) -> list[float]:
    out = []
    for ev in receiver.events("message_delivered"):
        name = ev.get("sent_name", ev.get("name"))
        if name in dropped_at:
            out.append(_ts(ev) - dropped_at[name])
    return out


def run_small(root: Path, files: int, size: int) -> dict[str, float]:
    a, b = make_pair(root, channels=[{"name": "data"}])
    try:
        staging = a.dir / "staging"
        staging.mkdir()
        names = [f"m{i:06d}.bin" for i in range(files)]
        for name in names:
            with open(staging / name, "wb") as f:
                f.write(os.urandom(size))
        out = a.out_dir("bravo", "data")
        inbox = b.in_dir("alpha", "data")
        dropped_at: dict[str, float] = {}
        start = time.time()
        for name in names:
            os.rename(staging / name, out / name)
            dropped_at[name] = time.time()
        wait_for(lambda: len(entries(inbox)) >= files, 3600, interval=0.1)
        delivered = time.time()
        wait_for(lambda: _queued(a, "bravo") == 0, 600, interval=0.05)
        acked = time.time()
        lat = _latencies(b, dropped_at)
        return {"files": files, "file_bytes": size, "seconds_to_delivered": delivered - start,
                "seconds_to_acked": acked - start, "files_per_s": files / (acked - start),
                "mib_per_s": files * size / MiB / (acked - start),
                "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * _pct(lat, 0.99),
                "events": len(lat)}
    finally:
        stop_all(a, b)


def run_paced(root: Path, rate: float, seconds: float, size: int) -> dict[str, float]:
    a, b = make_pair(root, channels=[{"name": "data"}])
    try:
        staging = a.dir / "staging"
        staging.mkdir()
        count = int(rate * seconds)
        names = [f"p{i:06d}.bin" for i in range(count)]
        for name in names:
            with open(staging / name, "wb") as f:
                f.write(os.urandom(size))
        out = a.out_dir("bravo", "data")
        dropped_at: dict[str, float] = {}
        start = time.monotonic()
        for i, name in enumerate(names):
            due = start + i / rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())      # pacing the load, not synchronising
            os.rename(staging / name, out / name)
            dropped_at[name] = time.time()
        wait_for(lambda: len(entries(b.in_dir("alpha", "data"))) >= count, 600, interval=0.1)
        wait_for(lambda: _queued(a, "bravo") == 0, 600, interval=0.05)
        lat = _latencies(b, dropped_at)
        return {"rate": rate, "files": count, "p50_ms": 1000 * statistics.median(lat),
                "p99_ms": 1000 * _pct(lat, 0.99), "max_ms": 1000 * max(lat)}
    finally:
        stop_all(a, b)


def run_big(root: Path, size: int) -> dict[str, float]:
    a, b = make_pair(root, channels=[{"name": "data"}])
    try:
        staging = a.dir / "staging"
        staging.mkdir()
        write_file(staging / "big.bin", size)
        final = b.in_dir("alpha", "data") / "big.bin"
        start = time.time()
        os.rename(staging / "big.bin", a.out_dir("bravo", "data") / "big.bin")
        wait_for(final.exists, 3600, interval=0.02)
        delivered = time.time()
        wait_for(lambda: _queued(a, "bravo") == 0, 600, interval=0.02)
        acked = time.time()
        return {"mib": size / MiB, "seconds_to_delivered": delivered - start,
                "seconds_to_acked": acked - start, "mib_per_s": size / MiB / (acked - start)}
    finally:
        stop_all(a, b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--file-kib", type=float, default=4)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--paced-rate", type=float, default=500.0)
    ap.add_argument("--paced-seconds", type=float, default=10.0)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="linkd-bench-", dir=args.dir))
    print(f"work folder {root}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    try:
        size = int(args.file_kib * 1024)
        if args.files:
            r = run_small(root / "small", args.files, size)
            print(f"small files: {r['files']} x {size} B: delivered in "
                  f"{r['seconds_to_delivered']:.1f} s, all acked in {r['seconds_to_acked']:.1f}"
                  f" s -> {r['files_per_s']:.0f} files/s, {r['mib_per_s']:.1f} MiB/s; "
                  f"drop-to-delivered latency (backlog) p50 {r['p50_ms']:.0f} ms, "
                  f"p99 {r['p99_ms']:.0f} ms")
        if args.paced_rate and args.paced_seconds:
            r = run_paced(root / "paced", args.paced_rate, args.paced_seconds, size)
            print(f"paced: {r['files']} x {size} B at {r['rate']:.0f} files/s: "
                  f"drop-to-delivered latency p50 {r['p50_ms']:.1f} ms, p99 "
                  f"{r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms")
        if args.big_mib:
            free = shutil.disk_usage(root).free
            if free < 4 * args.big_mib * MiB:
                print(f"big file: skipped, {free >> 20} MiB free < 4 x {args.big_mib} MiB")
            else:
                r = run_big(root / "big", args.big_mib * MiB)
                print(f"big file: {r['mib']:.0f} MiB delivered in "
                      f"{r['seconds_to_delivered']:.1f} s, acked in "
                      f"{r['seconds_to_acked']:.1f} s -> {r['mib_per_s']:.0f} MiB/s")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
