"""`linkctl`: status, metrics, send, pki and demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import DEFAULT_CONFIG, Config, load_config
from ..errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linkctl", description="operate a linkd daemon")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", default=None,
                       help="linkd configuration (default $LINKD_CONFIG, else "
                            f"{DEFAULT_CONFIG})")
    where.add_argument("-s", "--socket", default=None, help="status socket path")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    st = sub.add_parser("status", help="live state of the running daemon")
    st.add_argument("--json", action="store_true", help="print the JSON of GET /status")
    sub.add_parser("metrics", help="Prometheus metrics of the running daemon")

    send = sub.add_parser("send", help="queue files for a peer")
    send.add_argument("--peer", required=True)
    send.add_argument("--channel", required=True)
    send.add_argument("--wait", action="store_true",
                      help="return only once the peer has acknowledged every file")
    send.add_argument("--timeout", type=float, default=None,
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
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
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
