"""`linkctl`: status, metrics, send, pki and demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import __version__
from ..config import DEFAULT_CONFIG, Config, load_config
from ..errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linkctl", description="operate a linkd daemon")
    p.add_argument("--version", action="version", version=f"linkd {__version__}")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", default=None,
                       help="linkd configuration (default $LINKD_CONFIG, else "
                            f"{DEFAULT_CONFIG})")
    where.add_argument("-s", "--socket", default=None, help="status socket path")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    st = sub.add_parser("status", help="live state of the running daemon")
    st.add_argument("--json", action="store_true", help="print the JSON of GET /status")
    sub.add_parser("metrics", help="Prometheus metrics of the running daemon")

    q = sub.add_parser("queue", help="every queued file: waiting, in flight or held (and why)")
    q.add_argument("--peer", default=None)
    q.add_argument("--channel", default=None)
    q.add_argument("--json", action="store_true", help="print the JSON of GET /queue")

    failed = sub.add_parser("failed", help="files in failed/ with the reason of each")
    failed.add_argument("--peer", default=None)
    failed.add_argument("--channel", default=None)
    failed.add_argument("--json", action="store_true", help="print a JSON list")

    retry = sub.add_parser("retry", help="put failed files back in the queue (.reason removed)")
    retry.add_argument("--peer", required=True)
    retry.add_argument("--channel", default=None, help="the channel (required unless --all)")
    retry.add_argument("--all", action="store_true", help="every failed file of the peer "
                       "(or of --channel)")
    retry.add_argument("names", nargs="*", metavar="NAME")

    for verb, text in (("pause", "stop sending to a peer or one of its channels (receiving "
                                 "goes on; kept across restarts)"),
                       ("resume", "send again after pause")):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("--peer", required=True)
        cmd.add_argument("--channel", default=None)
    rc = sub.add_parser("reconnect", help="skip the backoff and dial the peer now")
    rc.add_argument("--peer", required=True)
    rc.add_argument("--force", action="store_true",
                    help="end the live session and start a new one (it asks the peer what "
                         "it holds: for a peer that stopped acknowledging, ack_overdue)")

    chk = sub.add_parser("check", help="one line and a Nagios-plugin exit code (0 OK, "
                         "1 WARNING, 2 CRITICAL, 3 UNKNOWN)")
    chk.add_argument("--max-queue-age", type=_seconds, default=None, metavar="SECONDS",
                     help="CRITICAL when a queued file is older than this")

    send = sub.add_parser("send", help="queue files for a peer")
    send.add_argument("--peer", required=True)
    send.add_argument("--channel", required=True)
    send.add_argument("--wait", action="store_true",
                      help="return only once the peer has acknowledged every file")
    send.add_argument("--timeout", type=_seconds, default=None,
                      help="with --wait: give up after this many seconds (exit 1)")
    send.add_argument("files", nargs="+", metavar="FILE")

    pki = sub.add_parser("pki", help="make a private link CA and node certificates")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = pki_sub.add_parser("init", help="create DIR/ca.crt and DIR/ca.key")
    init.add_argument("dir", type=Path)
    issue = pki_sub.add_parser("issue", help="create DIR/NAME.crt and DIR/NAME.key")
    issue.add_argument("dir", type=Path)
    issue.add_argument("name")
    issue.add_argument("--force", action="store_true", help="overwrite an existing NAME.crt/key")
    issue.add_argument("--days", type=int, default=None,
                       help="validity in days (default 825, never beyond the CA)")
    revoke = pki_sub.add_parser("revoke", help="revoke NAME's certificate and rewrite "
                                "DIR/ca.crl")
    revoke.add_argument("dir", type=Path)
    revoke.add_argument("name")
    crl = pki_sub.add_parser("crl", help="write a fresh signed CRL to DIR/ca.crl")
    crl.add_argument("dir", type=Path)
    crl.add_argument("--days", type=int, default=None,
                     help="days until the CRL's nextUpdate (default 30)")

    from .evidence_cmd import add_parsers as add_evidence_parsers
    add_evidence_parsers(sub)          # receipt show|verify, audit verify|export

    demo = sub.add_parser("demo", help="two nodes on 127.0.0.1 exchanging sample traffic")
    demo.add_argument("--seconds", type=float, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--dir", type=Path, default=None,
                      help="keep the demo's files here instead of a temporary folder")
    return p


def config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("LINKD_CONFIG") or DEFAULT_CONFIG


def load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args))


def socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    return load(args).node.status_socket


OPS = ("queue", "failed", "retry", "pause", "resume", "reconnect", "check")


def _seconds(text: str) -> float:
    """A number of seconds above 0 (argparse prints the error and the usage)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: give a number of seconds above 0")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command in OPS:
            from . import ops_cmd
            return ops_cmd.run(args)
        if args.command in ("status", "metrics"):
            from .status_cmd import run_metrics, run_status
            sock = socket_path(args)
            return run_status(sock, args.json) if args.command == "status" else run_metrics(sock)
        if args.command == "send":
            from .send_cmd import run_send
            if args.socket:
                print("linkctl: send needs the configuration (-c CONFIG), not a socket",
                      file=sys.stderr)
                return 2
            return run_send(load(args), args.peer, args.channel, args.files, args.wait,
                            args.timeout)
        if args.command == "pki":
            from .pki_cmd import run_pki
            return run_pki(args)
        if args.command in ("receipt", "audit"):
            from .evidence_cmd import run as run_evidence
            return run_evidence(args, load)
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(args.seconds, args.dir)
    except ConfigError as exc:
        print(f"linkctl: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        # e.g. `audit verify` or `receipt show` by a user outside the daemon's state
        where = f" {exc.filename}" if exc.filename else ""
        print(f"linkctl: cannot read{where}: permission denied: run it as the daemon's "
              "user or root (the state folder is theirs alone)", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"linkctl: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
