#!/usr/bin/env python3
"""How linkd's cost grows: file size, queue length, channels and peers (issue 13 item 3).

    .venv/bin/python -m bench --only scaling [--quick]      # the suite's entry point
    .venv/bin/python bench/bench_scaling.py [--quick] [--dims size queue ...] [--dir DIR]

Real daemons on 127.0.0.1 (tests/support/procs.py, the helpers of bench/run.py),
a fresh set for every point unless said otherwise. One table per dimension:

  size      N files of one size (1 KiB .. 64 MiB) renamed into out/ at once -> all
            acknowledged: CPU-seconds per file and per MiB on each side, files/s, MiB/s
  queue     1,000 / 10,000 / 50,000 x 4 KiB renamed into out/ at once -> all acknowledged:
            CPU-seconds per 1,000 files on each side, files/s, peak RSS
  startup   a queue of N claimed files (bench/run.py's make_queue) -> start-up to READY=1:
            wall time, CPU-seconds spent until READY, RSS once settled
  channels  the same 4 KiB files spread round-robin over 1 / 10 / 100 channels of one
            peer: files/s, CPU-seconds per 1,000 files, and each daemon's idle CPU %
            (connected, nothing to send) before the load
  peers     one hub daemon sending the same 4 KiB files to 1 / 4 / 16 peer daemons (each
            a real daemon; the hub dials them). The peer daemons are started once and
            kept; the hub is restarted with the first N of them in its config (its state
            kept, so the peers' sequence numbers carry on). Hub idle CPU % with N
            connected, then files/s, hub CPU-seconds per 1,000 files, hub peak RSS

Machine-dependent rates are given with a same-run reference: the ratio to the table's
first (or, for MiB/s, last) row. CPU-seconds come from /proc/<pid>/stat (utime + stime,
all threads), robust on a shared machine; peak RSS is VmHWM. The full step takes about
10 to 15 minutes on a loaded 2-core VM (the 50,000-file queue alone is a few minutes),
so a plain `python -m bench` leaves it out; --quick takes about 2 to 3 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

from bench.run import (  # noqa: E402
    LINK,
    KiB,
    MiB,
    Pair,
    count,
    cpu_seconds,
    make_queue,
    peak_rss,
    stage_random,
    wait_until,
)

DIMS = ("size", "queue", "startup", "channels", "peers")
SMALL = 4 * KiB                      # the "small file" of every dimension but size

# (file size, files) per point: enough bytes or files for a few seconds each
SIZES_FULL = [(KiB, 1500), (16 * KiB, 1500), (256 * KiB, 600), (4 * MiB, 80), (64 * MiB, 6)]
SIZES_QUICK = [(KiB, 200), (16 * KiB, 200), (256 * KiB, 60), (4 * MiB, 8), (64 * MiB, 1)]


# -- shared bits ------------------------------------------------------------------------

def table(head: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     + " |")
    return "\n".join(lines)


def human(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB} MiB"
    return f"{size // KiB} KiB"


def rate(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2f}"


def mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def stage(folder: Path, files: int, size: int, prefix: str = "f") -> list[Path]:
    """Files to rename into out/ later (not timed): distinct content each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    if size >= MiB:
        for i in range(files):
            paths.append(folder / f"{prefix}{i:06d}.bin")
            stage_random(paths[-1], size)
        return paths
    payload = os.urandom(size)
    for i in range(files):
        path = folder / f"{prefix}{i:06d}.bin"
        with open(path, "wb") as f:
            f.write(i.to_bytes(8, "big") + payload[8:])
        paths.append(path)
    return paths


def files_in(folder: Path) -> int:
    return sum(1 for n in os.listdir(folder) if not n.startswith(".")) if folder.is_dir() else 0


def idle_pct(pids: list[int], settle: float, window: float) -> list[float]:
    """CPU % of a core of each process over `window` seconds, after `settle` seconds."""
    time.sleep(settle)
    c0, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
    time.sleep(window)
    c1, t1 = [cpu_seconds(p) for p in pids], time.monotonic()
    return [100 * (b - a) / (t1 - t0) for a, b in zip(c0, c1, strict=True)]


def drain(pair: Pair, channels: list[str], moves: list[tuple[Path, Path]],
          poll: float) -> tuple[float, float, float]:
    """Rename every staged file into out/ as fast as possible; wait until every one is
    acknowledged (out/ and queue/ empty). Returns elapsed seconds and the CPU-seconds
    of the sender and of the receiver over that time."""
    ca, cb = pair.cpu()
    start = time.monotonic()
    for src, dst in moves:
        os.rename(src, dst)
    wait_until(lambda: all(pair.drained(ch) for ch in channels), 3600, poll,
               "every file acknowledged")
    elapsed = time.monotonic() - start
    ca2, cb2 = pair.cpu()
    return elapsed, ca2 - ca, cb2 - cb


# -- file size --------------------------------------------------------------------------

def run_size(root: Path, quick: bool, say: Callable[[str], None]) -> str:
    rows: list[dict[str, float]] = []
    for size, files in SIZES_QUICK if quick else SIZES_FULL:
        pair = Pair(root / f"size-{size}", [{"name": "data"}])
        try:
            paths = stage(pair.a.dir / "staging", files, size)
            moves = [(p, pair.out("data") / p.name) for p in paths]
            elapsed, sa, sb = drain(pair, ["data"], moves, 0.05)
            got = files_in(pair.inbox("data"))
            if got != files:
                raise RuntimeError(f"size {size}: {got} of {files} in bravo's in/")
            ra, rb = pair.rss()
        finally:
            pair.close()
        shutil.rmtree(root / f"size-{size}", ignore_errors=True)
        total = files * size / MiB
        r = {"size": size, "files": files, "files_s": files / elapsed, "mib_s": total / elapsed,
             "a_file": sa / files, "b_file": sb / files, "a_mib": sa / total, "b_mib": sb / total,
             "rss_a": ra, "rss_b": rb}
        say(f"scaling size {human(size)}: {files} files in {elapsed:.1f} s, "
            f"CPU sender {sa:.2f} s receiver {sb:.2f} s")
        rows.append(r)
    first, last = rows[0], rows[-1]
    text = table(
        ("file size", "files", "files/s", "x 1st", "MiB/s", "x last", "send ms/file",
         "recv ms/file", "send ms/MiB", "recv ms/MiB", "peak RSS send/recv"),
        [(human(int(r["size"])), f"{int(r['files'])}", rate(r["files_s"]),
          f"{r['files_s'] / first['files_s']:.3f}", f"{r['mib_s']:.1f}",
          f"{r['mib_s'] / last['mib_s']:.3f}", f"{1000 * r['a_file']:.2f}",
          f"{1000 * r['b_file']:.2f}", f"{1000 * r['a_mib']:.1f}", f"{1000 * r['b_mib']:.1f}",
          f"{mib(r['rss_a'])} / {mib(r['rss_b'])}") for r in rows])
    # per file = fixed + per-MiB x size: the fixed part from the smallest files, the
    # per-MiB part from the largest; they are equal at fixed / per-MiB
    notes = []
    for side, key in (("sender", "a"), ("receiver", "b")):
        fixed = first[f"{key}_file"]
        per_mib = last[f"{key}_mib"]
        notes.append(f"{side}: {1000 * fixed:.2f} ms per file + {1000 * per_mib:.1f} ms per MiB; "
                     f"equal at {1024 * fixed / per_mib:.0f} KiB")
    return text + "\n" + "\n".join(notes)


# -- queue length -----------------------------------------------------------------------

def run_queue(root: Path, quick: bool, say: Callable[[str], None]) -> str:
    rows = []
    for files in (300, 1000, 3000) if quick else (1000, 10_000, 50_000):
        pair = Pair(root / f"queue-{files}", [{"name": "data"}])
        try:
            paths = stage(pair.a.dir / "staging", files, SMALL)
            moves = [(p, pair.out("data") / p.name) for p in paths]
            poll = 0.1 if files <= 10_000 else 0.5   # a scandir of out/ per poll
            elapsed, sa, sb = drain(pair, ["data"], moves, poll)
            got = files_in(pair.inbox("data"))
            if got != files:
                raise RuntimeError(f"queue {files}: {got} of {files} in bravo's in/")
            ra, rb = pair.rss()
        finally:
            pair.close()
        shutil.rmtree(root / f"queue-{files}", ignore_errors=True)
        say(f"scaling queue {files}: {elapsed:.1f} s, CPU sender {sa:.2f} s receiver {sb:.2f} s")
        rows.append({"files": files, "files_s": files / elapsed, "a_k": sa / files * 1000,
                     "b_k": sb / files * 1000, "rss_a": ra, "rss_b": rb})
    first = rows[0]
    return table(
        ("queued at once", "files/s (rename->acked)", "x 1st", "send CPU-s/1,000",
         "recv CPU-s/1,000", "send x 1st", "peak RSS send/recv"),
        [(f"{r['files']:,}", f"{r['files_s']:.0f}", f"{r['files_s'] / first['files_s']:.2f}",
          f"{r['a_k']:.2f}", f"{r['b_k']:.2f}", f"{r['a_k'] / first['a_k']:.2f}",
          f"{mib(r['rss_a'])} / {mib(r['rss_b'])}") for r in rows])


def startup(root: Path, files: int) -> dict[str, float]:
    """Start-up of a daemon with `files` claimed files queued for a peer that is down."""
    from procs import Daemon, free_port, make_pki, stop_all
    pki_dir = make_pki(root / "pki", ["alpha", "bravo"])
    a = Daemon(root, "alpha", pki_dir, link=LINK)
    a.add_peer("bravo", [{"name": "data"}], connect=f"127.0.0.1:{free_port()}")  # nobody
    make_queue(a.spool, a.state, files)
    sock_path = f"/tmp/perf-scaling-{os.getpid()}-{files}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    sock.bind(sock_path)
    sock.settimeout(600)
    a.env["NOTIFY_SOCKET"] = sock_path
    try:
        start = time.monotonic()
        a.start(wait=False)
        assert a.proc is not None
        while b"READY=1" not in sock.recv(4096):
            pass
        ready = time.monotonic() - start
        cpu = cpu_seconds(a.proc.pid)
        time.sleep(3)                       # settle: it lists its queue after READY
        return {"ready_s": ready, "cpu_ready": cpu, "rss": peak_rss(a.proc.pid),
                "cpu_settled": cpu_seconds(a.proc.pid)}
    finally:
        stop_all(a)
        sock.close()
        os.unlink(sock_path)


def run_startup(root: Path, quick: bool, say: Callable[[str], None]) -> str:
    rows = []
    for files in (0, 1000, 3000) if quick else (0, 1000, 10_000, 50_000):
        r = startup(root / f"startup-{files}", files)
        shutil.rmtree(root / f"startup-{files}", ignore_errors=True)
        say(f"scaling startup {files}: READY after {r['ready_s']:.2f} s, "
            f"{r['cpu_ready']:.2f} CPU-s, RSS {mib(r['rss'])}")
        rows.append({"files": files, **r})
    empty = rows[0]

    def per_k(r: dict[str, float], key: str) -> str:
        if not r["files"]:
            return ""
        return f"{(r[key] - empty[key]) / r['files'] * 1000:.3f}"

    return table(
        ("claimed files queued", "start -> READY", "x 0 queued", "CPU-s until READY",
         "CPU-s per 1,000 queued (above 0)", "CPU-s until READY + 3 s", "peak RSS",
         "MiB per 1,000 queued (above 0)"),
        [(f"{r['files']:,}", f"{r['ready_s']:.2f} s", f"{r['ready_s'] / empty['ready_s']:.1f}",
          f"{r['cpu_ready']:.2f}",
          per_k(r, "cpu_ready"), f"{r['cpu_settled']:.2f}", mib(r["rss"]),
          f"{(r['rss'] - empty['rss']) / MiB / r['files'] * 1000:.2f}" if r["files"] else "")
         for r in rows])


# -- channels ---------------------------------------------------------------------------

def run_channels(root: Path, quick: bool, say: Callable[[str], None],
                 counts: Sequence[int] = (1, 10, 100), total: int | None = None) -> str:
    total = total or (800 if quick else 3200)
    settle, window = (3.0, 6.0) if quick else (5.0, 20.0)
    rows = []
    for n in counts:
        names = [f"c{i:03d}" for i in range(n)]
        pair = Pair(root / f"channels-{n}", [{"name": c} for c in names])
        try:
            assert pair.a.proc is not None and pair.b.proc is not None
            idle_a, idle_b = idle_pct([pair.a.proc.pid, pair.b.proc.pid], settle, window)
            paths = stage(pair.a.dir / "staging", total, SMALL)
            moves = [(p, pair.out(names[i % n]) / p.name) for i, p in enumerate(paths)]
            elapsed, sa, sb = drain(pair, names, moves, 0.1)
            got = sum(files_in(pair.inbox(c)) for c in names)
            if got != total:
                raise RuntimeError(f"{n} channels: {got} of {total} in bravo's in/")
            ra, rb = pair.rss()
        finally:
            pair.close()
        shutil.rmtree(root / f"channels-{n}", ignore_errors=True)
        say(f"scaling channels {n}: idle {idle_a:.2f} % / {idle_b:.2f} %, {elapsed:.1f} s, "
            f"CPU sender {sa:.2f} s receiver {sb:.2f} s")
        rows.append({"n": n, "files_s": total / elapsed, "a_k": sa / total * 1000,
                     "b_k": sb / total * 1000, "idle_a": idle_a, "idle_b": idle_b,
                     "rss_a": ra, "rss_b": rb})
    first = rows[0]
    return table(
        ("channels", "files", "files/s", "x 1st", "send CPU-s/1,000", "recv CPU-s/1,000",
         f"idle CPU % send/recv ({window:.0f} s)", "peak RSS send/recv"),
        [(f"{r['n']}", f"{total}", f"{r['files_s']:.0f}", f"{r['files_s'] / first['files_s']:.2f}",
          f"{r['a_k']:.2f}", f"{r['b_k']:.2f}", f"{r['idle_a']:.2f} / {r['idle_b']:.2f}",
          f"{mib(r['rss_a'])} / {mib(r['rss_b'])}") for r in rows])


# -- peers ------------------------------------------------------------------------------

def run_peers(root: Path, quick: bool, say: Callable[[str], None]) -> str:
    from procs import Daemon, free_port, make_pki, stop_all, wait_for
    total = 800 if quick else 3200
    settle, window = (3.0, 6.0) if quick else (5.0, 20.0)
    counts = (1, 4, 16)
    names = [f"p{i:02d}" for i in range(max(counts))]
    pki_dir = make_pki(root / "pki", ["hub", *names])
    peers = []
    for name in names:
        d = Daemon(root, name, pki_dir, port=free_port(), link=LINK)
        d.add_peer("hub", [{"name": "data"}])           # the hub dials
        peers.append(d)
    hub = Daemon(root, "hub", pki_dir, link=LINK)
    rows = []
    try:
        for d in peers:                                 # start them all, then wait
            d.start(wait=False)
        for d in peers:
            wait_for(d.healthy, 120, message=lambda d=d: f"{d.name} not healthy\n{d.tail()}")
        for n in counts:
            active = peers[:n]
            hub.peers = []
            for d in active:
                hub.add_peer(d.name, [{"name": "data"}], connect=f"127.0.0.1:{d.port}")
            hub.start()
            for d in active:
                hub.wait_state(d.name, timeout=120)
            assert hub.proc is not None
            hub_pid = hub.proc.pid
            (idle,) = idle_pct([hub_pid], settle, window)
            paths = stage(hub.dir / "staging", total, SMALL, prefix=f"n{n:02d}-")
            moves = [(p, hub.out_dir(active[i % n].name, "data") / p.name)
                     for i, p in enumerate(paths)]
            c_hub = cpu_seconds(hub_pid)
            c_peers = sum(cpu_seconds(d.proc.pid) for d in active if d.proc is not None)
            start = time.monotonic()
            for src, dst in moves:
                os.rename(src, dst)
            wait_until(lambda active=active: all(
                count(hub.out_dir(d.name, "data")) == 0
                and count(hub.queue_dir(d.name, "data")) == 0 for d in active),
                3600, 0.1, "every file acknowledged")
            elapsed = time.monotonic() - start
            s_hub = cpu_seconds(hub_pid) - c_hub
            s_peers = sum(cpu_seconds(d.proc.pid) for d in active
                          if d.proc is not None) - c_peers
            rss = peak_rss(hub_pid)
            got = 0
            for d in active:
                inbox = d.in_dir("hub", "data")
                got += files_in(inbox)
                for entry in os.listdir(inbox):         # empty it for the next round
                    os.unlink(inbox / entry)
            if got != total:
                raise RuntimeError(f"{n} peers: {got} of {total} in the peers' in/")
            hub.stop()
            say(f"scaling peers {n}: hub idle {idle:.2f} %, {elapsed:.1f} s, "
                f"CPU hub {s_hub:.2f} s peers {s_peers:.2f} s, hub RSS {mib(rss)}")
            rows.append({"n": n, "files_s": total / elapsed, "hub_k": s_hub / total * 1000,
                         "peers_k": s_peers / total * 1000, "rss": rss, "idle": idle})
    finally:
        stop_all(hub, *peers)
    first = rows[0]
    return table(
        ("peers", "files", "files/s", "x 1st", "hub CPU-s/1,000", "peers' CPU-s/1,000 (sum)",
         "hub peak RSS", f"hub idle CPU % ({window:.0f} s)"),
        [(f"{r['n']}", f"{total}", f"{r['files_s']:.0f}", f"{r['files_s'] / first['files_s']:.2f}",
          f"{r['hub_k']:.2f}", f"{r['peers_k']:.2f}", mib(r["rss"]), f"{r['idle']:.2f}")
         for r in rows])


RUNS: dict[str, Callable[[Path, bool, Callable[[str], None]], str]] = {
    "size": run_size, "queue": run_queue, "startup": run_startup, "channels": run_channels,
    "peers": run_peers}
TITLES = {
    "size": "file size: N files of one size renamed into out/ at once -> acknowledged",
    "queue": "queue length: N x 4 KiB renamed into out/ at once -> acknowledged",
    "startup": "queue length: start-up with N claimed files queued (peer down)",
    "channels": "channels: the same 4 KiB files round-robin over N channels of one peer",
    "peers": "peers: one hub sends the same 4 KiB files round-robin to N peer daemons"}


def run(root: Path, quick: bool, say: Callable[[str], None],
        dims: Sequence[str] = DIMS) -> list[str]:
    """Measure each dimension in `dims`; print its table as soon as it is done."""
    texts = []
    for dim in dims:
        text = f"scaling -- {TITLES[dim]}\n\n" + RUNS[dim](root / dim, quick, say)
        print("\n" + text + "\n", flush=True)
        texts.append(text)
    return texts


def main(argv: list[str] | None = None) -> int:
    from bench.run import commit, machine
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer files, shorter idle windows")
    ap.add_argument("--dims", nargs="*", choices=DIMS, default=list(DIMS))
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="linkd-scaling-", dir=args.dir))
    started = time.time()
    print(f"work folder {root}; {machine()}; commit {commit()}", flush=True)

    def say(text: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {text}", flush=True)

    try:
        run(root, args.quick, say, args.dims)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

