"""Durable delivery throughput: per-file commit vs group commit (not a test).

    .venv/bin/python bench/bench_commit.py [--files 20000] [--size 4096] [--dir DIR]

Receives N files of SIZE bytes through `linkd.spool.Inbound` (begin, write,
finish, commit) on the real file system, with real fsyncs, in four ways:

  per-file            commit([one]) per file: fsync file, intent, rename, fsync dir, record
  group-64 fsync      commit of 64 files, an fsync per file (SYNCFS_MIN forced high)
  group-64 syncfs     commit of 64 files, one syncfs for the batch
  raw fsync+rename    no spool at all: write, fsync, rename, fsync dir (a floor for per-file)

Use >= 20,000 files: shorter runs only see the page-cache burst. DIR must be on
the file system you care about (default: a temporary folder under /var/tmp).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linkd.spool import Inbound, SpoolLayout  # noqa: E402
from linkd.spool import inbound as inbound_module  # noqa: E402


def spool_run(root: Path, files: int, size: int, batch: int, syncfs_min: int) -> float:
    layout = SpoolLayout(root / "spool", root / "state", "peer")
    layout.create(["data"], archive_sent=False)
    inbound_module.SYNCFS_MIN = syncfs_min
    ib = Inbound(layout, "data", 1 << 30, 0o640)
    ib.recover()
    payload = os.urandom(size)
    digest = hashlib.sha256(payload).hexdigest()
    start = time.perf_counter()
    pending = []
    for seq in range(1, files + 1):
        ib.begin(seq, f"f{seq:06d}.bin", size, digest)
        ib.write(payload)
        pending.append(ib.finish())
        if len(pending) == batch:
            ib.commit(pending)
            pending = []
    ib.commit(pending)
    elapsed = time.perf_counter() - start
    assert ib.committed == files and len(os.listdir(layout.in_dir("data"))) == files
    return files / elapsed


def raw_run(root: Path, files: int, size: int) -> float:
    tmp, final = root / "tmp", root / "in"
    tmp.mkdir()
    final.mkdir()
    payload = os.urandom(size)
    dfd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
    start = time.perf_counter()
    for i in range(files):
        part = tmp / f"{i}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        os.rename(part, final / f"f{i:06d}.bin")
        os.fsync(dfd)
    elapsed = time.perf_counter() - start
    os.close(dfd)
    return files / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--only", choices=["per-file", "fsync", "syncfs", "raw"], nargs="*")
    parser.add_argument("--batch", type=int, default=64, help="group commit size (default 64)")
    args = parser.parse_args()
    runs = {
        "per-file": ("per-file commit (batch 1)", lambda d: spool_run(d, args.files, args.size,
                                                                      1, 1 << 30)),
        "fsync": (f"group commit, {args.batch}/batch, fsync each", lambda d: spool_run(
            d, args.files, args.size, args.batch, 1 << 30)),
        "syncfs": (f"group commit, {args.batch}/batch, one syncfs", lambda d: spool_run(
            d, args.files, args.size, args.batch, 1)),
        "raw": ("raw write+fsync+rename+fsync dir", lambda d: raw_run(d, args.files, args.size)),
    }
    print(f"{args.files} files of {args.size} bytes under {args.dir}")
    for key in args.only or list(runs):
        label, run = runs[key]
        root = Path(tempfile.mkdtemp(prefix="linkd-bench-", dir=args.dir))
        try:
            rate = run(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"  {label:40s} {rate:9,.0f} files/s", flush=True)


if __name__ == "__main__":
    main()
