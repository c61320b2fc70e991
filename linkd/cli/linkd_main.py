"""`linkd`: run the daemon, check a configuration, or print the version."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..config import DEFAULT_CONFIG


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linkd", description="secure exactly-once file link daemon")
    p.add_argument("-c", "--config", default=os.environ.get("LINKD_CONFIG", DEFAULT_CONFIG),
                   help="configuration file (default $LINKD_CONFIG, else %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration and certificates, then exit")
    p.add_argument("--log-format", choices=["json", "console"], default=None,
                   help="log format (default: console on a terminal, else json)")
    p.add_argument("--version", action="version", version=f"linkd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.check:
        from ..check import run_check
        return run_check(args.config)
    from ..daemon import run
    return run(args.config, args.log_format)


if __name__ == "__main__":
    sys.exit(main())
