"""`linkd --check` (like `nginx -t`) and the daemon's start-up identity check.

`run_check` prints each problem as one line on stderr and returns 1, or prints
exactly one line on stdout and returns 0. It never lets a traceback out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .certs import check_identity, check_spool
from .config import Config, load_config
from .errors import ConfigError
from .expiry import expiry_lines


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def startup_problems(cfg: Config) -> list[str]:
    """Problems that must stop the daemon from starting (own identity only).

    The daemon prints the first one as its single line and exits 1."""
    return check_identity(cfg)


def run_check(config_path: str | Path) -> int:
    """Validate the config, certificates and spool folders; return the exit code."""
    label = str(config_path)
    label = label if label.isprintable() else repr(label)
    warnings: list[str] = []
    try:
        cfg = load_config(config_path)
        problems = check_identity(cfg) + check_spool(cfg)
        warnings, expired = expiry_lines(cfg)
        problems += [p for p in expired if not any(p.split(" (")[0] in q for q in problems)]
    except ConfigError as exc:
        problems = [str(exc)]
    except Exception as exc:  # a bug must still be one line, never a traceback
        problems = [f"{label}: internal error while checking ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())}): please report this as a linkd bug"]
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        sys.stderr.flush()
        return 1
    for warning in warnings:    # not a failure: the operator has time to act
        print(warning, file=sys.stderr)
    channels = sum(len(peer.channels) for peer in cfg.peers)
    print(f"{label}: configuration OK (node {cfg.node.name}, {_plural(len(cfg.peers), 'peer')}, "
          f"{_plural(channels, 'channel')})", flush=True)
    return 0
