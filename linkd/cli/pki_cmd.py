"""`linkctl pki init DIR` and `linkctl pki issue DIR NAME [--force]`.

One line on stdout saying what was written, or one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import PKIError
from ..pki import init_ca, issue, revoke, write_crl


def _show(path: object) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


def _os_error(exc: OSError) -> str:
    where = _show(exc.filename) if exc.filename is not None else "linkctl pki"
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}: check the folder's path and permissions"


def run_pki(args: argparse.Namespace) -> int:
    """Run a `linkctl pki` subcommand; return the exit code (0, 1, or 2 for usage)."""
    command = getattr(args, "pki_command", None)
    try:
        directory = Path(args.dir)
        if command == "init":
            init_ca(directory)
            print(f"wrote {_show(directory / 'ca.crt')} and {_show(directory / 'ca.key')} "
                  "(a new link CA; keep ca.key secret)", flush=True)
        elif command == "issue":
            crt, key = issue(directory, str(args.name), force=bool(getattr(args, "force", False)),
                             days=getattr(args, "days", None))
            print(f"wrote {_show(crt)} and {_show(key)} for {args.name}", flush=True)
        elif command == "revoke":
            serial, crl = revoke(directory, str(args.name))
            print(f"revoked {args.name} (serial {serial:x}); wrote {_show(crl)}: copy it to "
                  "every node's [tls].crl and reload them", flush=True)
        elif command == "crl":
            crl = write_crl(directory, getattr(args, "days", None))
            print(f"wrote {_show(crl)}: copy it to every node's [tls].crl and reload them",
                  flush=True)
        else:
            print("linkctl pki: expected `init DIR`, `issue DIR NAME`, `revoke DIR NAME` or "
                  "`crl DIR`", file=sys.stderr)
            return 2
    except PKIError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(_os_error(exc), file=sys.stderr)
        return 1
    except ValueError as exc:   # e.g. a NUL byte in the path
        print(f"linkctl pki: {' '.join(str(exc).split())}: check the arguments", file=sys.stderr)
        return 1
    return 0
