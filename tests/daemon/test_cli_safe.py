"""linkctl never writes a peer's text raw to a terminal (CONTRACT §5, issue 8.5)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from procs import Daemon, free_port, make_pki, stop_all, wait_for

from linkd.cli.ops_cmd import evaluate
from linkd.cli.safe import printable, printable_lines, safe_doc
from linkd.proto import frames as F
from linkd.proto.framing import FrameDecoder, encode_frame
from linkd.status import format_status

EVIL = "bye\x1b[2J\x1b[H\nALL LINKS OK\r\x07\x7f\x9b31m\u202etxt.exe"


def raw_controls(text: str) -> list[str]:
    """Characters a terminal could obey, other than the line breaks linkctl lays out."""
    return [c for c in text if c != "\n" and not c.isprintable()]


def test_printable_escapes_c0_del_c1_and_other_non_printables():
    assert printable("report.txt") == "report.txt"
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("a\nb\tc\r") == "a\\x0ab\\x09c\\x0d"
    assert printable("\x7f\x80\x9b\xa0") == "\\x7f\\u0080\\u009b\\u00a0"
    assert printable("\u202e\u200b") == "\\u202e\\u200b"
    assert printable("\U000e0001") == "\\U000e0001"
    assert printable("été ✓ 日本") == "été ✓ 日本"              # printable text is kept
    assert printable(Path("x\x1by")) == "x\\x1by"
    assert raw_controls(printable(EVIL)) == [] and "\n" not in printable(EVIL)
    assert printable_lines("a\x1b\nb") == "a\\x1b\nb"
    # a file name that is not UTF-8 shows its bytes, as bash's $'...' writes them
    # (an operator trial read bad\udcff\udcfe.txt, which no shell gives back)
    name = os.fsdecode(b"bad\xff\xfe.txt")
    assert printable(name) == "bad\\xff\\xfe.txt"
    # and a name of those very characters, or with a C1 control, prints otherwise
    assert printable("bad\\xff\x1b") == "bad\\\\xff\\x1b"
    assert printable("\x85") == "\\u0085"
    assert printable("x\\xff") == "x\\\\xff" != printable(os.fsdecode(b"x\xff"))


def test_safe_doc_escapes_every_string_keys_included():
    doc = {"peers": [{"name": "p", "last_error": EVIL, "channels": [{"\x1bk": 1}]}], "n": 3}
    safe = safe_doc(doc)
    assert raw_controls(json.dumps(safe, ensure_ascii=False)) == []
    assert safe["n"] == 3 and safe["peers"][0]["channels"][0] == {"\\x1bk": 1}


def test_status_table_and_check_line_of_a_hostile_status_stay_printable():
    doc = {"node": "n", "peers": [{"name": "p", "state": "waiting", "last_error": EVIL,
                                   "down_since": "2020-01-01T00:00:00Z",
                                   "channels": [{"name": "c", "queued": 1}]}]}
    table = format_status(safe_doc(doc))
    assert raw_controls(table) == [] and "ALL LINKS OK" not in table.splitlines()
    code, line = evaluate(safe_doc(doc), 15.0, None)
    assert code == 2 and raw_controls(line) == [] and "\n" not in line


def hostile_goodbye(pki_dir: Path, port: int, reason: str) -> None:
    """A real peer (alpha's certificate) that answers bravo's hello with a goodbye
    carrying `reason` (a refusal: bravo records it as the link's last error)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_cert_chain(str(pki_dir / "alpha.crt"), str(pki_dir / "alpha.key"))
    ctx.load_verify_locations(cafile=str(pki_dir / "ca.crt"))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
        decoder = FrameDecoder(1 << 20)
        deadline = time.monotonic() + 20
        frame = None
        while not isinstance(frame, F.Hello):
            assert time.monotonic() < deadline, "no hello from bravo"
            frame = decoder.next_frame()
            if frame is None:
                decoder.feed(sock.recv(65536))
        sock.sendall(encode_frame(F.Bye(reason)))
        sock.recv(65536)                                # bravo closes


def test_a_peers_goodbye_with_escape_codes_is_printed_escaped(tmp_path):
    pki_dir = make_pki(tmp_path / "pki", ["alpha", "bravo"])
    b = Daemon(tmp_path, "bravo", pki_dir, port=free_port())
    b.add_peer("alpha", [{"name": "data"}])
    try:
        b.start()
        assert b.port is not None
        hostile_goodbye(pki_dir, b.port, EVIL)
        wait_for(lambda: "ALL LINKS OK" in str(b.status()["peers"][0]["last_error"]), 30,
                 message=b.tail)
        linkctl = [sys.executable, "-m", "linkd.cli.linkctl_main", "-s", str(b.socket)]
        for command in (["status"], ["check"]):
            run = subprocess.run(linkctl + command, capture_output=True, text=True, timeout=60)
            assert raw_controls(run.stdout + run.stderr) == [], (command, run.stdout)
            assert command == ["check"] or "\\x1b[2J" in run.stdout, run.stdout
            assert not any(line.startswith("ALL LINKS OK") for line in run.stdout.splitlines())
        run = subprocess.run(linkctl + ["status", "--json"], capture_output=True, text=True,
                             timeout=60)
        assert raw_controls(run.stdout) == []           # json escapes on its own
        assert "ALL LINKS OK" in json.loads(run.stdout)["peers"][0]["last_error"]
    finally:
        stop_all(b)


def test_check_is_critical_while_the_audit_log_cannot_be_written():
    doc = {"node": "n", "peers": [], "audit": {"failed": "the audit log /s/audit.jsonl "
                                                         "cannot be written (No space)"}}
    code, line = evaluate(safe_doc(doc), 15.0, None)
    assert code == 2 and line.startswith("CRITICAL: deliveries refused: the audit log ")
    assert evaluate({"node": "n", "peers": [], "audit": {"failed": None}}, 15.0, None)[0] == 0


def test_check_warns_of_a_held_channel_and_of_a_receiver_that_cannot_store():
    """Found in an operator's trial: with the receiver's disk full, `linkctl check`
    said OK on both sides; only the logs told."""
    def doc(**channel):
        return {"node": "n", "peers": [{"name": "p", "state": "connected",
                                        "channels": [{"name": "c", "queued": 1, **channel}]}]}
    assert evaluate(doc(), 15.0, None)[0] == 0
    code, line = evaluate(doc(held="p cannot store it now: No space left on device"),
                          15.0, None)
    assert code == 1 and line.startswith("WARNING: p/c held: p cannot store it now"), line
    code, line = evaluate(doc(inbound_error="[Errno 28] No space left on device"), 15.0, None)
    assert code == 1 and "p/c cannot store what arrives: [Errno 28] No space" in line, line
    # a channel an operator paused is not a problem to warn of
    assert evaluate(doc(paused=True, held="paused"), 15.0, None)[0] == 0


def test_check_shortens_a_long_reason_at_a_word_end():
    # operator trial: "(… self-signed certifi)" read as a typo
    reason = ("TLS with 127.0.0.1:17443 refused: certificate verify failed: self-signed "
              "certificate in certificate chain (at chain depth 1)")
    doc = {"node": "n", "peers": [{"name": "bravo", "state": "backoff",
                                   "down_since": "2026-12-02T10:00:00Z",
                                   "last_error": reason, "channels": []}]}
    code, line = evaluate(safe_doc(doc), 15.0, None)
    assert code == 2
    shown = line.split("(", 1)[1].split("…)", 1)[0]
    assert line.count("…)") == 1 and reason.startswith(shown) and shown.endswith("self-signed"), \
        line


def test_check_does_not_warn_of_a_held_channel_with_nothing_queued():
    # second operator trial: the documented order of removing a channel (sender first)
    # left the receiver warning "held" about a channel with nothing queued
    doc = {"node": "n", "peers": [{"name": "p", "state": "connected", "channels": [
        {"name": "c", "queued": 0, "held": "p does not offer channel 'c'"}]}]}
    assert evaluate(doc, 15.0, None)[0] == 0
    doc["peers"][0]["channels"][0]["queued"] = 2
    assert evaluate(doc, 15.0, None)[0] == 1
