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


M_ARENA_MAX = -8          # mallopt(3)
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> bool:
    """Before any thread starts: at most MALLOC_ARENAS glibc malloc arenas (the main
    one and one for every worker thread). By default each thread that allocates gets
    an arena of its own (up to 8 per core), and memory freed there stays there: the
    daemon's spool hops run in short-lived worker threads, and a receiver's peak RSS
    during a big transfer next to small files measured 61 MiB with them, 59 MiB
    without (PERFORMANCE.md). False where there is no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, MALLOC_ARENAS))


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
    limit_malloc_arenas()
    from ..daemon import run
    return run(args.config, args.log_format, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
