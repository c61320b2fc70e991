#!/usr/bin/env python3
"""Profile both daemons while one big file moves (where the time goes, docs/PERFORMANCE.md §3).

    .venv/bin/python bench/profile_big.py [--mib 512] [--out DIR] [--gil] [--perf]

Two real daemons (alpha sends to bravo, as `python -m bench` runs them), one file of
--mib MiB renamed into out/; py-spy samples each daemon at 200 Hz for the whole transfer
(`--gil`: only the thread holding the GIL, i.e. Python code) and, with --perf, `perf
record` adds CPU samples by thread and shared object (C and kernel time py-spy cannot
see). Prints MiB/s, CPU-s per GiB of each daemon (/proc/<pid>/stat), the busiest
functions (self and inclusive, idle waits left out) and, with --perf, the CPU split by
thread and library. Raw profiles stay in --out (py-spy's `raw` format: one stack per
line, flamegraph.pl reads it).

Needs py-spy (`pip install py-spy`) and, for --perf, perf; both need ptrace rights.
Timings on a shared machine are noisy: compare CPU-s per GiB and the shares.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as B  # noqa: E402

# leaves where a sampled thread is waiting, not working (trio's idle worker threads,
# the event loop's epoll wait, a thread blocked on a lock)
IDLE = ("_thread_cache.py:211)", "_io_epoll.py:243)", "threading.py:331)",
        "threading.py:327)")


def function(frame: str) -> str:
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0]})" if where else name


def summarise(raw: Path, top: int) -> str:
    self_: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[-1].endswith(IDLE):
            idle += n
            continue
        total += n
        self_[function(frames[-1])] += n
        for name in {function(f) for f in frames}:
            inclusive[name] += n
    if not total:
        return "  (no samples)"
    lines = [f"  {total} busy samples ({idle} idle left out)", "  self:"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in self_.most_common(top)]
    lines.append("  inclusive (linkd and trio):")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common()
              if "linkd/" in name or "trio/" in name][:top]
    return "\n".join(lines)


def perf_split(data: Path) -> str:
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort",
                          "comm,dso", "-g", "none"], capture_output=True, text=True)
    rows = [line for line in out.stdout.splitlines() if line.strip()
            and not line.startswith("#")]
    return "\n".join(f"  {row.strip()}" for row in rows[:14])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("profile-big"))
    ap.add_argument("--gil", action="store_true", help="py-spy --gil (Python code only)")
    ap.add_argument("--perf", action="store_true", help="also perf record (CPU by thread)")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    size = args.mib * B.MiB
    root = Path(tempfile.mkdtemp(prefix="linkd-profile-", dir=args.dir))
    pair = B.Pair(root, [{"name": "data"}])
    samplers: list[subprocess.Popen[bytes]] = []
    try:
        staging = pair.a.dir / "staging"
        staging.mkdir()
        B.stage_random(staging / "big.bin", size)
        for side, daemon in (("sender", pair.a), ("receiver", pair.b)):
            assert daemon.proc is not None
            pid = str(daemon.proc.pid)
            samplers.append(subprocess.Popen(
                [spy, "record", "--pid", pid, "-r", "200", "-f", "raw", "--threads",
                 *(["--gil"] if args.gil else []), "-o", str(args.out / f"{side}.raw")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if args.perf:
                samplers.append(subprocess.Popen(
                    ["perf", "record", "-F", "499", "-g", "-p", pid, "-o",
                     str(args.out / f"{side}.perf")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)             # the samplers attach (set-up, not synchronisation)
        final = pair.inbox("data") / "big.bin"
        ca, cb = pair.cpu()
        start = time.monotonic()
        os.rename(staging / "big.bin", pair.out("data") / "big.bin")
        B.wait_until(final.exists, 3600, 0.01, "the big file in bravo's in/")
        elapsed = time.monotonic() - start
        B.wait_until(lambda: pair.drained("data"), 600, 0.01, "the big file's ack")
        ca2, cb2 = pair.cpu()
    finally:
        for p in samplers:
            p.send_signal(2)
        for p in samplers:
            p.wait(timeout=120)
        pair.close()
        shutil.rmtree(root, ignore_errors=True)
    gib = size / B.GiB
    print(f"{args.mib} MiB in {elapsed:.1f} s = {args.mib / elapsed:.0f} MiB/s; CPU per GiB: "
          f"sender {(ca2 - ca) / gib:.2f} s, receiver {(cb2 - cb) / gib:.2f} s")
    for side in ("sender", "receiver"):
        print(f"\n{side} (py-spy{' --gil' if args.gil else ''}):")
        print(summarise(args.out / f"{side}.raw", args.top))
        if args.perf:
            print(f"{side} (perf: CPU by thread and library):")
            print(perf_split(args.out / f"{side}.perf"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
