"""`linkd`: run the daemon, check or print a configuration, or print the version."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

from .. import __version__
from ..config import DEFAULT_CONFIG, LOG_LEVELS
from ..errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linkd", description="secure exactly-once file link daemon: runs in the "
        "foreground (systemd Type=notify), logs one event per line on stderr")
    p.add_argument("-c", "--config", default=os.environ.get("LINKD_CONFIG", DEFAULT_CONFIG),
                   help="configuration file (default $LINKD_CONFIG, else %(default)s)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true",
                        help="validate the configuration, certificates and folders, then exit "
                             "(0 all well, 1 problems; warns within 30 days of an expiry)")
    action.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (defaults filled in) as TOML")
    p.add_argument("--log-format", choices=["json", "console"], default=None,
                   help="log format (default: console on a terminal, else json)")
    p.add_argument("--log-level", choices=list(LOG_LEVELS), default=None,
                   help="lowest level logged (default: [node] log_level, else info)")
    p.add_argument("--version", action="version", version=f"linkd {__version__}")
    return p


M_TRIM_THRESHOLD = -1     # mallopt(3)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MALLOC_ARENAS = 2
MMAP_THRESHOLD = 4 << 20  # blocks below this come from the heap, not a fresh mmap
TRIM_THRESHOLD = 16 << 20  # free memory kept at the heap's top before it is returned


def tune_malloc() -> bool:
    """Before any thread starts, tell glibc's malloc how this daemon allocates.

    * At most MALLOC_ARENAS arenas (the main one and one for every worker thread).
      By default each thread that allocates gets an arena of its own (up to 8 per
      core), and memory freed there stays there: the daemon's spool hops run in
      short-lived worker threads, and a receiver's peak RSS during a big transfer
      next to small files measured 61 MiB with them, 59 MiB without.
    * A receiver allocates a 256 KiB buffer per data frame and frees it once the
      frame is on disk, up to a credit window (4 MiB) at a time. glibc's default
      thresholds (mmap from 128 KiB, trimming the heap once 2 x that is free at its
      top, both adjusting as they go) gave most of those buffers fresh pages from
      the kernel: ~120,000 page faults per GiB received, 0.2-0.4 CPU-s of 4.7-5.2.
      Fixed thresholds (MMAP_THRESHOLD, TRIM_THRESHOLD) keep them in the heap and
      reuse them: ~2,400 faults per GiB, the peak RSS unchanged (it is the same
      window of frames; what is kept is at most what the peak held).

    False where there is no mallopt (not glibc). PERFORMANCE.md §3.1."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_ARENA_MAX, MALLOC_ARENAS))
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and ok
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.check:
        from ..check import run_check
        return run_check(args.config)
    if args.print_config:
        from ..config import print_config
        try:
            sys.stdout.write(print_config(args.config))
        except ConfigError as exc:
            print(f"linkd: {exc}", file=sys.stderr)
            return 1
        return 0
    # The daemon never uses rich (linkctl's progress bars do), but structlog imports it,
    # and pygments with it, whenever it is installed, only to draw tracebacks on a
    # terminal: 3.4 MB of RSS in every daemon (PERFORMANCE.md). Without it structlog
    # draws plain ones.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    tune_malloc()
    from ..daemon import run
    return run(args.config, args.log_format, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
