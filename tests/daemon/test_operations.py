"""Running linkd day to day (issue 9), as an operator sees it: real daemons, real linkctl.

Outages that speak (status and link_still_down), journald priorities, metrics
scraped over TCP and parsed with prometheus_client's own parser, failed/retry,
pause/resume persisted, reconnect, the Nagios check, SO_PEERCRED refusals, a
producer in spool_group, --check expiry warnings, --print-config, pki revoke,
and a [listen] reload that rebinds.
"""

from __future__ import annotations

import datetime as dt
import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from procs import Daemon, entries, free_port, make_pair, stop_all, wait_for
from prometheus_client.parser import text_string_to_metric_families

from linkd import pki
from linkd.net.supervisor import outage_watch, still_down_schedule
from linkd.status import PeerStatus, http_get


def ctl(d: Any, *args: str, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(user or []), sys.executable, "-m", "linkd.cli.linkctl_main",
                           "-c", str(d.config_path), *args],
                          capture_output=True, text=True, timeout=60)


def linkd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linkd.cli.linkd_main", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def daemons():
    made: list[Any] = []
    yield made
    stop_all(*made)


def peer(d: Any, name: str) -> dict[str, Any]:
    return next(p for p in d.status()["peers"] if p["name"] == name)


def channel(d: Any, name: str, ch: str) -> dict[str, Any]:
    return next(c for c in peer(d, name)["channels"] if c["name"] == ch)


# --------------------------------------------------------------------------- outages


def test_still_down_schedule_doubles_up_to_a_minute() -> None:
    it = still_down_schedule()
    assert [next(it) for _ in range(6)] == [10, 30, 70, 130, 190, 250]


async def test_link_still_down_lines_grow_with_attempts(
        autojump_clock: trio.testing.MockClock) -> None:
    """Three times the first interval of outage: three lines, attempts growing."""
    class Link:
        name = "bravo"
        status = PeerStatus("bravo", "backoff", dt.datetime.now(dt.UTC))

        class log:  # noqa: N801 - stands in for a bound logger
            @staticmethod
            def warning(event: str, **kw: Any) -> None:
                lines.append({"event": event, **kw})

    lines: list[dict[str, Any]] = []
    link = Link()

    async def dialler() -> None:
        while True:
            link.status.attempts += 1
            link.status.note_error(f"cannot connect: refused #{link.status.attempts}")
            await trio.sleep(4)

    with trio.move_on_after(75):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dialler)
            nursery.start_soon(outage_watch, link)
    assert [e["event"] for e in lines] == ["link_still_down"] * 3
    attempts = [e["attempts"] for e in lines]
    assert attempts == sorted(attempts) and attempts[0] < attempts[-1], attempts
    assert all(e["down_since"] and e["last_error"] and e["peer"] == "bravo" for e in lines)
    assert [round(e["down_for_s"]) for e in lines] == [10, 30, 70]
    link.status.set_state("connected")
    assert link.status.last_error is None and link.status.down_since is None


def test_an_outage_is_visible_in_status_and_logged_after_10s(tmp_path: Path,
                                                             daemons: list[Any]) -> None:
    a, b = make_pair(tmp_path, start=False)
    daemons += [a, b]
    a.start()
    first = wait_for(lambda: (p := peer(a, "bravo"))["attempts"] >= 1 and p["last_error"] and p,
                     15)
    assert first["down_since"] and first["last_error_at"]
    # one plain reason, not trio's "Error connecting to ('127.0.0.1', N): ..." echo
    assert first["last_error"].startswith("cannot connect to 127.0.0.1:") and \
        "Error connecting to" not in first["last_error"], first["last_error"]
    later = wait_for(lambda: (p := peer(a, "bravo"))["attempts"] > first["attempts"] and p, 15)
    assert later["down_since"] == first["down_since"], "down_since moved within one outage"
    event = wait_for(lambda: a.events("link_still_down"), 20)[0]
    assert event["node"] == "alpha" and event["attempts"] >= 1 and event["last_error"]
    b.start()
    a.wait_state("bravo")
    up = peer(a, "bravo")
    assert (up["down_since"], up["last_error"], up["attempts"]) == (None, None, 0)


# --------------------------------------------------------------------------- logs


def test_journald_priorities_when_stderr_is_the_journal_stream(tmp_path: Path,
                                                              daemons: list[Any]) -> None:
    a, b = make_pair(tmp_path, start=False)
    daemons += [a, b]
    a.log_path.touch()
    st = os.stat(a.log_path)
    a.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    a.start()                                  # bravo down: warnings follow
    wait_for(lambda: a.events("link_still_down"), 20)
    lines = a.log_path.read_text().splitlines()
    assert lines and all(line[:1] == "<" and line[2] == ">" for line in lines), lines[:3]
    assert any(line.startswith("<6>") and '"started"' in line for line in lines)
    assert any(line.startswith("<4>") and '"link_still_down"' in line for line in lines)
    # a stale JOURNAL_STREAM (stderr not the journal) gets plain lines
    b.env["JOURNAL_STREAM"] = "1:2"
    b.start()
    a.wait_state("bravo")
    assert b.log_path.read_text().startswith("{")


# --------------------------------------------------------------------------- metrics


def test_metrics_over_tcp_parse_with_prometheus_client(tmp_path: Path,
                                                       daemons: list[Any]) -> None:
    a, b = make_pair(tmp_path, start=False)
    daemons += [a, b]
    port = free_port()
    a.status_extra["metrics_listen"] = f"127.0.0.1:{port}"
    b.start()
    a.start()
    a.wait_state("bravo")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    build = families["linkd_build_info"].samples[0]
    assert build.value == 1 and build.labels["version"] and build.labels["node"] == "alpha"
    assert "process_open_fds" in families
    ours = families["linkd_cert_expiry_timestamp_seconds"].samples[0].value
    assert ours > time.time() + 86400 * 30
    peer_cert = families["linkd_peer_cert_expiry_timestamp_seconds"].samples
    assert peer_cert and peer_cert[0].labels == {"peer": "bravo"}
    assert families["linkd_peer_up"].samples[0].value == 1
    for path in ("/status", "/"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
        assert refused.value.code == 404
        refused.value.close()       # an HTTPError holds the response (and its socket)
    b.stop()
    wait_for(lambda: "linkd_connect_failures_total{" in ctl(a, "metrics").stdout, 20)


# --------------------------------------------------------------------------- control


def test_failed_retry_pause_reconnect_and_check(tmp_path: Path, daemons: list[Any]) -> None:
    a, b = make_pair(tmp_path, channels=[{"name": "data", "max_message_bytes": 10}],
                     link={"heartbeat_interval": 0.3, "heartbeat_timeout": 1.0})
    daemons += [a, b]
    assert ctl(a, "check").stdout.startswith("OK")
    a.drop("bravo", "data", "big.txt", b"x" * 50)
    failed_dir = a.spool / "bravo" / "failed" / "data"
    wait_for(lambda: (failed_dir / "big.txt").exists(), 30)
    listed = json.loads(ctl(a, "failed", "--json").stdout)
    assert [(f["name"], f["size"]) for f in listed] == [("big.txt", 50)] and listed[0]["reason"]
    assert "big.txt" in ctl(a, "failed").stdout
    # fourth operator trial: a mistyped channel listed nothing and said "no failed
    # files", exit 0; a negative --max-queue-age was taken
    for what in ("failed", "queue"):
        typo = ctl(a, what, "--channel", "dta")
        assert typo.returncode == 1 and typo.stderr.splitlines() == [
            "linkctl: no peer has a channel 'dta' (configured: data)"], typo
    assert ctl(a, "check", "--max-queue-age", "-5").returncode == 2
    wait_for(lambda: channel(a, "bravo", "data")["failed"] == 1, 10)
    warn = ctl(a, "check")
    assert warn.returncode == 1 and warn.stdout.startswith("WARNING"), warn
    # retry with the old limit: it fails again; a missing name is exit 1, one line
    missing = ctl(a, "retry", "--peer", "bravo", "--channel", "data", "nope.txt")
    assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1, missing
    assert "nope.txt" in missing.stderr
    ok = ctl(a, "retry", "--peer", "bravo", "--channel", "data", "big.txt")
    assert ok.returncode == 0 and ok.stdout.count("\n") == 1, ok
    # it fails again (its reason is written first, then the file moved in: wait for
    # the file), under its own name, and the retry left no orphan reason behind
    wait_for(lambda: (failed_dir / "big.txt").exists(), 30)
    assert sorted(p.name for p in failed_dir.iterdir()) == ["big.txt", "big.txt.reason"]
    # pause persists across a restart, resume works, both show in status
    assert ctl(a, "pause", "--peer", "bravo", "--channel", "data").returncode == 0
    assert channel(a, "bravo", "data")["paused"] is True
    assert ctl(a, "pause", "--peer", "bravo", "--channel", "nope").returncode == 1
    a.stop()
    a.start()
    assert channel(a, "bravo", "data")["paused"] is True, "pause lost in a restart"
    assert ctl(a, "resume", "--peer", "bravo").returncode == 0
    assert channel(a, "bravo", "data")["paused"] is False
    # fourth operator trial: neither was logged, though EVIDENCE.md lists them among
    # the audit events
    assert [e.get("peer") for e in a.events("resumed")] == ["bravo"]
    audit = [json.loads(line) for line in
             (a.state / "audit" / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("channel")) for e in audit
            if e["event"] in ("channel_paused", "resumed")] == [
        ("channel_paused", "data"), ("resumed", None)]
    a.wait_state("bravo")
    # b goes away: check turns CRITICAL (exit 2), and UNKNOWN (3) once a is stopped too
    b.stop()
    wait_for(lambda: ctl(a, "check").returncode == 2, 20)
    assert ctl(a, "check").stdout.startswith("CRITICAL")
    a.stop()
    unknown = ctl(a, "check")
    assert unknown.returncode == 3 and unknown.stdout.startswith("UNKNOWN"), unknown


def test_reconnect_skips_a_long_backoff(tmp_path: Path, daemons: list[Any]) -> None:
    a, b = make_pair(tmp_path, start=False, link={"reconnect_min": 30.0,
                                                  "reconnect_max": 60.0})
    daemons += [a, b]
    a.start()
    wait_for(lambda: peer(a, "bravo")["state"] == "backoff", 15)
    b.start()
    started = time.monotonic()
    result = ctl(a, "reconnect", "--peer", "bravo")
    assert result.returncode == 0, result
    a.wait_state("bravo", timeout=10)
    assert time.monotonic() - started < 10
    assert ctl(b, "reconnect", "--peer", "alpha").returncode == 1   # bravo never dials


def test_reconnect_force_starts_a_new_session_from_either_side(
        tmp_path: Path, daemons: list[Any]) -> None:
    """ack_overdue advises a new session (it asks the peer what it holds), but a
    plain reconnect said "already connected" and did nothing (operator trial)."""
    a, b = make_pair(tmp_path, link={"reconnect_min": 20.0, "reconnect_max": 40.0})
    daemons += [a, b]
    plain = ctl(a, "reconnect", "--peer", "bravo")
    assert plain.returncode == 0 and "already connected (--force" in plain.stdout, plain
    for side, other, message in ((a, "bravo", "dialling it again now"),
                                 (b, "alpha", "it dials us again")):
        before = peer(a, "bravo")["reconnects"]
        started = time.monotonic()
        result = ctl(side, "reconnect", "--peer", other, "--force")
        assert result.returncode == 0 and message in result.stdout, result
        # a new session at once, though the backoff floor is 20 s
        wait_for(lambda before=before: peer(a, "bravo")["reconnects"] == before + 1, 10)
        a.wait_state("bravo", timeout=10)
        b.wait_state("alpha", timeout=10)
        assert time.monotonic() - started < 10
    downs = [e for e in a.events("link_down") + b.events("link_down")]
    assert downs and all(e.get("clean") for e in downs), downs
    assert any("reconnect: an operator asked" in str(e.get("reason")) for e in downs)


def test_changing_endpoints_refuse_other_users(tmp_path: Path, daemons: list[Any]) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    gid = os.stat(a.socket).st_gid
    other = ["setpriv", "--reuid=65534", "--regid=65534", f"--groups={gid}",
             "--inh-caps=-all", "--bounding-set=-all"]
    probe = subprocess.run([*other, sys.executable, "-c", "import linkd"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the test interpreter is not usable by another user")
    readable = subprocess.run([*other, sys.executable, "-m", "linkd.cli.linkctl_main", "-s",
                               str(a.socket), "status", "--json"], capture_output=True,
                              text=True, timeout=60)
    assert readable.returncode == 0, readable       # reading serves the group
    refused = subprocess.run([*other, sys.executable, "-m", "linkd.cli.linkctl_main", "-s",
                              str(a.socket), "pause", "--peer", "bravo"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused
    assert "root" in refused.stderr and peer(a, "bravo")["paused"] is False


def test_status_socket_is_0660(tmp_path: Path, daemons: list[Any]) -> None:
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    assert os.stat(a.socket).st_mode & 0o7777 == 0o660


# --------------------------------------------------------------------------- producers


@pytest.fixture
def cleanup():
    paths: list[Path] = []
    yield paths
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def test_a_producer_in_spool_group_drops_a_file(daemons: list[Any], cleanup: list[Path]) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    try:
        group = grp.getgrnam("users")
    except KeyError:
        pytest.skip("no 'users' group")
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no /usr/bin/python3 for the producer")
    # pytest's temporary folders are private to root: use one other users can enter
    root = Path(tempfile.mkdtemp(prefix="linkd-ops-producer-"))
    os.chmod(root, 0o755)
    if any(not os.stat(parent).st_mode & 0o001 for parent in root.parents):
        shutil.rmtree(root)
        pytest.skip("the temporary folder is not traversable by other users")
    a, b = make_pair(root, start=False)
    daemons += [a, b]
    cleanup.append(root)
    a.node_extra["spool_group"] = "users"
    b.start()
    a.start()
    a.wait_state("bravo")
    out = a.spool / "bravo" / "out" / "data"
    assert out.stat().st_mode & 0o7777 == 0o2770 and out.stat().st_gid == group.gr_gid
    inbox = a.spool / "bravo" / "in" / "data"
    assert inbox.stat().st_mode & 0o7777 == 0o2750
    assert a.spool.stat().st_mode & 0o777 == 0o750
    script = ("import os,sys; d=sys.argv[1]; t=os.path.join(d,'.p.tmp');"
              "open(t,'w').write('hi'); os.rename(t, os.path.join(d,'p.txt'))")
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                          f"--groups={group.gr_gid}", "--inh-caps=-all", "--bounding-set=-all",
                          python, "-c", script, str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    wait_for(lambda: b.inbound("alpha", "data") == {"p.txt": b"hi"}, 30)
    # and without the group, a producer is refused (capabilities dropped: no root bypass)
    denied = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "--inh-caps=-all", "--bounding-set=-all", python, "-c", script,
                             str(out)], capture_output=True, text=True)
    assert denied.returncode != 0
    # `linkctl send --wait` as that producer (operator trial: it queued the file, then
    # failed reading queue/ with a traceback and exit 1; a retry made a duplicate)
    producer = ["setpriv", "--reuid=65534", "--regid=65534", f"--groups={group.gr_gid}",
                "--inh-caps=-all", "--bounding-set=-all", sys.executable]
    if subprocess.run([*producer, "-c", "import linkd"], capture_output=True).returncode:
        return          # the test interpreter is not usable by another user
    source = root / "w.txt"
    source.write_text("wait for me")
    source.chmod(0o644)
    waited = subprocess.run([*producer, "-m", "linkd.cli.linkctl_main", "-c",
                             str(a.config_path), "send", "--peer", "bravo", "--channel",
                             "data", str(source), "--wait", "--timeout", "30"],
                            capture_output=True, text=True, timeout=60)
    assert waited.returncode == 1 and len(waited.stderr.splitlines()) == 1, waited
    assert "nothing was queued" in waited.stderr and "Traceback" not in waited.stderr
    assert not (out / "w.txt").exists()


# --------------------------------------------------------------------------- config, pki


def test_print_config_round_trips_and_check_warns_of_expiry(tmp_path: Path) -> None:
    a, b = make_pair(tmp_path, start=False)
    a.status_extra["metrics_listen"] = "127.0.0.1:9464"
    a.write_config()
    printed = linkd("-c", str(a.config_path), "--print-config")
    assert printed.returncode == 0, printed
    doc = tomllib.loads(printed.stdout)
    assert doc["link"]["heartbeat_timeout"] == a.link["heartbeat_timeout"]
    assert doc["link"]["handshake_timeout"] == 10.0 and doc["node"]["log_level"] == "info"
    again = tmp_path / "again.toml"
    again.write_text(printed.stdout)
    assert linkd("-c", str(again), "--print-config").stdout.splitlines()[1:] == \
        printed.stdout.splitlines()[1:]
    assert linkd("-c", str(again), "--check").returncode == 0
    pki.issue(a.pki_dir, "alpha", force=True, days=10)
    check = linkd("-c", str(a.config_path), "--check")
    assert check.returncode == 0, check
    assert "expires" in check.stderr and "alpha.crt" in check.stderr


def test_pki_revoke_writes_a_crl_with_the_serial(tmp_path: Path) -> None:
    from cryptography import x509
    directory = tmp_path / "pki"
    pki.init_ca(directory)
    crt, _ = pki.issue(directory, "bravo", days=5)
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days in (4, 5)
    result = subprocess.run([sys.executable, "-m", "linkd.cli.linkctl_main", "pki", "revoke",
                             str(directory), "bravo"], capture_output=True, text=True)
    assert result.returncode == 0, result
    crl = x509.load_pem_x509_crl((directory / "ca.crl").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    subprocess.run([sys.executable, "-m", "linkd.cli.linkctl_main", "pki", "crl",
                    str(directory), "--days", "3"], check=True, capture_output=True)
    crl2 = x509.load_pem_x509_crl((directory / "ca.crl").read_bytes())
    assert crl2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    assert crl2.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def test_both_programs_print_one_version() -> None:
    one = linkd("--version").stdout
    two = subprocess.run([sys.executable, "-m", "linkd.cli.linkctl_main", "--version"],
                         capture_output=True, text=True).stdout
    assert one == two and one.startswith("linkd ")


# --------------------------------------------------------------------------- reload


def test_a_listen_change_is_rebound_on_reload(tmp_path: Path, daemons: list[Any]) -> None:
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    old = b.port
    b.port = free_port()
    b.write_config()
    b.signal(__import__("signal").SIGHUP)
    wait_for(lambda: b.events("listen_changed"), 15)
    a.peers[0]["connect"] = f"127.0.0.1:{b.port}"
    a.write_config()
    a.signal(__import__("signal").SIGHUP)
    a.wait_state("bravo", timeout=20)
    # b no longer listens on the old port (asked of b's own sockets: on a shared
    # machine another program may take the freed port, so a refused connect is no test)
    import subprocess
    listeners = subprocess.run(["ss", "-H", "-ltnp", f"sport = :{old}"], check=True,
                               capture_output=True, text=True).stdout
    assert f"pid={b.proc.pid}," not in listeners, listeners


def test_a_listen_change_keeps_the_sessions_accepted_before(
        tmp_path: Path, daemons: list[Any]) -> None:
    # review: the rebind cancelled the old accept loops' whole scope, and with it the
    # sessions they had accepted: cut without a goodbye (an unclean link_down on
    # both sides, for a change that does not concern them)
    import signal
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    b.port = free_port()
    b.write_config()
    b.signal(signal.SIGHUP)
    wait_for(lambda: b.events("reloaded") or b.events("reload_failed"), 15)
    assert b.events("listen_changed") and not b.events("reload_failed")
    a.drop("bravo", "data", "after.txt", b"same session")
    wait_for(lambda: b.inbound("alpha", "data") == {"after.txt": b"same session"}, 30)
    assert b.events("link_down") == [] and a.events("link_down") == []


def test_a_listen_change_to_a_busy_port_is_refused_with_one_line(
        tmp_path: Path, daemons: list[Any]) -> None:
    import signal
    import socket
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        old = b.port
        b.port = busy.getsockname()[1]
        b.write_config()
        b.signal(signal.SIGHUP)
        failed = wait_for(lambda: b.events("reload_failed"), 15)[0]
        assert "cannot be bound" in failed["reason"]
        with socket.create_connection(("127.0.0.1", old), timeout=2):
            pass                        # still listening where it was
    finally:
        busy.close()


def test_a_reload_goodbye_makes_the_dialler_redial_at_once(tmp_path: Path,
                                                          daemons: list[Any]) -> None:
    import signal
    a, b = make_pair(tmp_path, link={"reconnect_min": 20.0, "reconnect_max": 40.0})
    daemons += [a, b]
    b.peers[0]["channels"] = [{"name": "data"}, {"name": "more"}]
    a.peers[0]["channels"] = [{"name": "data"}, {"name": "more"}]
    a.write_config()
    a.signal(signal.SIGHUP)
    wait_for(lambda: a.events("reloaded"), 15)
    # alpha's own reload replaced the session: wait for the new one on both sides, or
    # bravo's reload may find no session to say goodbye on.
    wait_for(lambda: len(a.events("link_up")) >= 2 and len(b.events("link_up")) >= 2, 15)
    b.write_config()
    b.signal(signal.SIGHUP)          # bravo (listening) closes the session with "reload:"
    wait_for(lambda: [e for e in a.events("link_down")
                      if "peer said goodbye: reload:" in e.get("reason", "")], 15)
    a.wait_state("bravo", timeout=8)  # far less than reconnect_min


def test_a_reload_applies_the_link_settings_a_session_took_at_its_start(
        tmp_path: Path, daemons: list[Any]) -> None:
    # heartbeat_interval/timeout are set when a session starts: a reload that changes
    # them must start a new session (it logged "reloaded" and kept the old ones);
    # priority_hold applies to the live session, without a new one.
    import signal
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    a.link["priority_hold"] = 0.0
    a.write_config()
    a.signal(signal.SIGHUP)
    wait_for(lambda: a.events("reloaded"), 15)
    assert len(a.events("link_up")) == 1 and not a.events("link_down")
    a.link["heartbeat_interval"] = float(a.link.get("heartbeat_interval", 5.0)) / 2
    a.write_config()
    a.signal(signal.SIGHUP)
    wait_for(lambda: len(a.events("reloaded")) == 2, 15)
    wait_for(lambda: len(a.events("link_up")) >= 2 and len(b.events("link_up")) >= 2, 15)
    assert any("reload" in e.get("reason", "") for e in a.events("link_down")), \
        a.events("link_down")


# --------------------------------------------------------------------------- send --wait


def test_send_wait_says_plainly_while_the_link_is_down(tmp_path: Path,
                                                       daemons: list[Any]) -> None:
    a, b = make_pair(tmp_path, start=False)
    daemons += [a, b]
    a.start()
    source = tmp_path / "note.txt"
    source.write_bytes(b"hello")
    out = tmp_path / "send.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "linkd.cli.linkctl_main", "-c",
                                 str(a.config_path), "send", "--peer", "bravo", "--channel",
                                 "data", "--wait", "--timeout", "60", str(source)],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        line = wait_for(lambda: next((x for x in out.read_text().splitlines()
                                      if x.startswith("waiting: bravo down since ")), None), 20)
        assert " attempts" in line and len(line) < 200, line
        b.start()
        assert proc.wait(timeout=60) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "note.txt: delivered to bravo" in out.read_text()
    assert b.inbound("alpha", "data") == {"note.txt": b"hello"}


def test_send_wait_names_the_file_as_the_peer_delivered_it(tmp_path: Path,
                                                         daemons: list[Any]) -> None:
    """A name clash in the peer's in/ gives the file `~1`: send --wait says so (from the
    peer's signed receipt)."""
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    b.in_dir("alpha", "data").mkdir(parents=True, exist_ok=True)
    (b.in_dir("alpha", "data") / "report.txt").write_bytes(b"the consumer's copy")
    source = tmp_path / "report.txt"
    source.write_bytes(b"new report")
    result = subprocess.run([sys.executable, "-m", "linkd.cli.linkctl_main", "-c",
                             str(a.config_path), "send", "--peer", "bravo", "--channel",
                             "data", "--wait", "--timeout", "60", str(source)],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result
    assert "report.txt: delivered to bravo as report~1.txt" in result.stdout, result.stdout


# --------------------------------------------------------------------------- demo


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_demo_stops_both_daemons_on_a_signal_and_keeps_its_logs(tmp_path: Path,
                                                               sig: str) -> None:
    import signal
    keep = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with open(out, "wb") as sink:
        demo = subprocess.Popen([sys.executable, "-m", "linkd.cli.linkctl_main", "demo",
                                 "--dir", str(keep)], stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: out.read_text().count(" up ") >= 2, 60,
                 message=lambda: out.read_text())
        pids = [int((keep / n / "state" / "linkd.lock").read_text()) for n in
                ("interpol", "europol")]
        demo.send_signal(getattr(signal, sig))
        assert demo.wait(timeout=30) == 0, out.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    text = out.read_text()
    assert "linkctl -s " in text and " status" in text
    # every line fits 80 columns, except those naming the (long, test-made) --dir
    assert max(len(line) for line in text.splitlines() if str(keep) not in line) <= 80, text
    assert (keep / "interpol" / "linkd.log").stat().st_size > 0


# --------------------------------------------------------------------------- expiry


def test_cert_expiring_is_logged_once_per_threshold() -> None:
    from linkd.expiry import ExpiryWatch
    from linkd.status import StatusBoard

    logged: list[dict[str, Any]] = []

    class Log:
        @staticmethod
        def warning(event: str, **kw: Any) -> None:
            logged.append({"event": event, **kw})

    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    board = StatusBoard("alpha", "0")
    board.cert_not_after = now + dt.timedelta(days=20)
    board.crl_next_update = now + dt.timedelta(days=90)
    board.add_peer("bravo", [], "connecting").cert_not_after = "2026-12-01T12:00:00Z"
    watch = ExpiryWatch(Log)
    watch.check(board, now)
    watch.check(board, now + dt.timedelta(hours=1))
    assert sorted((e["what"], e["threshold_days"]) for e in logged) == [
        ("certificate", 30), ("peer_certificate", 1)]
    watch.check(board, now + dt.timedelta(days=14))     # 6 days left: the 7-day mark
    assert [(e["what"], e["threshold_days"]) for e in logged[2:]] == [("certificate", 7)]


def test_log_level_from_the_config_filters_info(tmp_path: Path, daemons: list[Any]) -> None:
    a, b = make_pair(tmp_path, start=False)
    daemons += [a, b]
    a.node_extra["log_level"] = "warning"
    a.start()                                   # bravo down: warnings only
    wait_for(lambda: a.events("link_still_down"), 20)
    assert not a.events("started") and not a.events("status_listening")
    assert all(e["level"] in ("warning", "error") and e["node"] == "alpha"
               for e in (json.loads(line) for line in a.log_path.read_text().splitlines()))


def test_a_channel_removed_by_a_reload_leaves_status(tmp_path: Path, daemons: list[Any]) -> None:
    # review: the session the reload ended cleaned up every channel it had sent on,
    # and looking one up in /status re-created it there, empty
    a, b = make_pair(tmp_path, channels=[{"name": "data"}, {"name": "extra"}])
    daemons += [a, b]
    a.peers[0]["channels"] = [{"name": "data"}]
    a.reload()
    a.wait_state("bravo")
    wait_for(lambda: [c["name"] for c in a.status()["peers"][0]["channels"]] == ["data"], 15,
             message=lambda: str(a.status()["peers"][0]["channels"]))
    a.drop("bravo", "data", "after.txt", b"data only")
    wait_for(lambda: b.inbound("alpha", "data") == {"after.txt": b"data only"}, 30)
    assert [c["name"] for c in a.status()["peers"][0]["channels"]] == ["data"]


def test_a_file_name_that_is_not_utf8_fails_without_stopping_the_daemon(
        tmp_path: Path, daemons: list[Any]) -> None:
    # operator trial: its message_failed line could not be written to the audit log
    # (a lone surrogate is no UTF-8), and that error stopped the sending daemon; a
    # `linkctl retry` of the file answered "internal error" and stopped it again
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    name = os.fsdecode(b"bad\xff\xfe.txt")
    a.drop("bravo", "data", name, b"bad name")
    failed = wait_for(lambda: a.events("message_failed"), 20, message=a.tail)
    assert failed[0]["name"] == name and "not valid UTF-8" in failed[0]["reason"]
    assert "rename it" in failed[0]["reason"]
    assert (a.failed_dir("bravo", "data") / name).exists()
    listed = ctl(a, "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    retried = ctl(a, "retry", "--peer", "bravo", "--channel", "data", name)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    wait_for(lambda: len(a.events("message_failed")) == 2, 20, message=a.tail)
    a.drop("bravo", "data", "good.txt", b"still running")
    wait_for(lambda: b.inbound("alpha", "data") == {"good.txt": b"still running"}, 30)
    assert a.running and a.stop() == 0
    verified = ctl(a, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_queue_age_grows_while_nothing_moves(tmp_path: Path, daemons: list[Any]) -> None:
    # operator trial: the oldest queued file's age was computed when the queue last
    # changed and then stayed (0.002 s for a paused channel's file after minutes), so
    # `linkctl check --max-queue-age` and the LinkdQueueStuck alert could never fire
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    assert ctl(a, "pause", "--peer", "bravo", "--channel", "data").returncode == 0
    a.drop("bravo", "data", "held.txt", b"waits")
    wait_for(lambda: a.status()["peers"][0]["channels"][0]["queued"] == 1, 15)
    first = a.status()["peers"][0]["channels"][0]["oldest_queued_age_s"]
    wait_for(lambda: a.status()["peers"][0]["channels"][0]["oldest_queued_age_s"]
             > first + 1.0, 15)
    check = wait_for(lambda: (r := ctl(a, "check", "--max-queue-age", "1")).returncode == 2
                     and r, 15)
    assert check.stdout.startswith("CRITICAL"), check.stdout


def test_a_symlink_and_a_fifo_in_failed_are_counted_listed_and_not_retried(
        tmp_path: Path, daemons: list[Any]) -> None:
    # operator trial: both went to failed/ with their reasons, but `linkctl failed`,
    # the FAILED column, check and the metric counted regular files only, and
    # `linkctl retry` said the link was "not in failed/"
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    out = a.out_dir("bravo", "data")
    target = tmp_path / "target.txt"
    target.write_text("not sent through a link")
    os.symlink(target, out / "sym.txt")
    os.mkfifo(out / "pipe")
    folder = a.failed_dir("bravo", "data")
    wait_for(lambda: {"sym.txt", "pipe"} <= set(os.listdir(folder)), 20, message=a.tail)
    wait_for(lambda: peer(a, "bravo")["channels"][0]["failed"] == 2, 15)
    listed = json.loads(ctl(a, "failed", "--json").stdout)
    rows = listed["failed"] if isinstance(listed, dict) else listed
    assert sorted(r["name"] for r in rows) == ["pipe", "sym.txt"], listed
    assert all(r["reason"] for r in rows), rows
    retried = ctl(a, "retry", "--peer", "bravo", "--channel", "data", "sym.txt")
    assert retried.returncode == 1 and "symbolic link" in retried.stderr, retried
    assert os.path.islink(folder / "sym.txt")


def test_a_reload_changing_connect_logs_the_old_sessions_end(
        tmp_path: Path, daemons: list[Any]) -> None:
    # operator trial: the session ended by the reload's goodbye logged its link_down
    # in its dial loop, which the reload cancelled at once: no link_down (audit log
    # neither) on the side whose `connect` changed, 4 times in 5
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    for i, host in enumerate(["localhost", "127.0.0.1", "localhost"], start=1):
        a.peers[0]["connect"] = f"{host}:{b.port}"
        a.reload()
        wait_for(lambda i=i: len(a.events("link_up")) == i + 1, 20, message=a.tail)
        downs = a.events("link_down")
        assert len(downs) == i, downs
        assert downs[-1]["reason"].startswith("reload:") and downs[-1]["clean"], downs[-1]


def test_files_delivered_with_spool_group_belong_to_it(tmp_path: Path,
                                                      daemons: list[Any]) -> None:
    # second operator trial: in/<ch>/ is 2750 for the group, but each delivered file
    # kept the daemon's own group (made in tmp/, ours alone), so the group's consumers
    # could not read what was delivered to them
    try:
        group = grp.getgrnam("users")
    except KeyError:
        pytest.skip("no 'users' group")
    a, b = make_pair(tmp_path, start=False)
    daemons += [a, b]
    b.node_extra["spool_group"] = "users"
    b.start()
    a.start()
    a.wait_state("bravo")
    a.drop("bravo", "data", "for-consumers.txt", os.urandom(1000))
    delivered = b.in_dir("alpha", "data") / "for-consumers.txt"
    wait_for(delivered.exists, 30)
    st = delivered.stat()
    assert st.st_gid == group.gr_gid and st.st_mode & 0o777 == 0o640, (st.st_gid,
                                                                       oct(st.st_mode))


def test_a_channel_removed_mid_transfer_leaves_status_and_says_what_stays_queued(
        tmp_path: Path, daemons: list[Any]) -> None:
    # second operator trial: removed by a reload while a 1 GiB file was on its way,
    # the channel came back in /status and the metrics (0 queued), the file was in
    # no listing, and the reload said nothing about it
    from procs import write_file
    a, b = make_pair(tmp_path, channels=[{"name": "data"}, {"name": "bulk"}],
                     link={"heartbeat_interval": 5.0, "heartbeat_timeout": 15.0})
    daemons += [a, b]
    staged = tmp_path / "big.bin"
    write_file(staged, 256 << 20)
    os.rename(staged, a.out_dir("bravo", "bulk") / "big.bin")
    wait_for(lambda: a.events("message_queued"), 20, message=a.tail)
    a.peers[0]["channels"] = [{"name": "data"}]
    a.reload()                          # (returns once it has logged `reloaded`)
    if [e for e in a.events("message_sent") if e["name"] == "big.bin"]:
        pytest.skip("the file was delivered before the reload")
    a.wait_state("bravo")
    assert [c["name"] for c in peer(a, "bravo")["channels"]] == ["data"]
    removed = a.events("channel_removed")
    assert [(e["channel"], e["queued"]) for e in removed] == [("bulk", 1)], removed
    assert "go out once the channel is configured again" in removed[0]["reason"]


def test_linkctl_queue_says_why_a_file_in_out_waits(tmp_path: Path, daemons: list[Any]) -> None:
    # closing note of the last stop: a file in out/ that pick-up held back showed as
    # "waiting" with no reason, so an operator could not tell a cp still running
    # from a stuck daemon
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    path = a.out_dir("bravo", "data") / "copying.bin"
    with open(path, "wb") as writer:                # a cp still writing, in place
        writer.write(b"first half")
        writer.flush()
        shown = wait_for(lambda: "open for writing" in (r := ctl(a, "queue")).stdout and r, 20)
        assert "copying.bin" in shown.stdout, shown.stdout
        assert "waiting (a process has it open for writing)" in shown.stdout, shown.stdout
        listed = json.loads(ctl(a, "queue", "--json").stdout)
        assert [(e["name"], e["seq"], e["reason"]) for e in listed] == [
            ("copying.bin", None, "a process has it open for writing")]
        writer.write(b" and the rest")
    wait_for(lambda: (b.in_dir("alpha", "data") / "copying.bin").exists(), 20)
    assert (b.in_dir("alpha", "data") / "copying.bin").read_bytes() == \
        b"first half and the rest"


def test_a_crl_fresh_from_the_defaults_is_not_a_warning(tmp_path: Path) -> None:
    # fourth operator trial: `linkctl pki crl` signs for 30 days, and the CRL was
    # warned about within 30 days: a site following the defaults never saw OK
    import dataclasses

    import trustme
    from memlink import node_config

    from linkd.cli.ops_cmd import evaluate
    from linkd.expiry import ExpiryWatch, expiry_lines

    directory = tmp_path / "pki"
    pki.init_ca(directory)
    crl = pki.write_crl(directory)                  # the default validity
    cfg = node_config(tmp_path, trustme.CA(), "alpha", [])
    cfg = dataclasses.replace(cfg, tls=dataclasses.replace(cfg.tls, crl=crl))
    now = dt.datetime.now(dt.UTC)
    assert expiry_lines(cfg, now) == ([], [])
    [warned] = expiry_lines(cfg, now + dt.timedelta(days=24))[0]
    assert "(tls.crl): expires on" in warned, warned
    doc = {"node": "n", "peers": [], "tls": {"crl_next_update": (
        now + dt.timedelta(days=30)).isoformat().replace("+00:00", "Z")}}
    assert evaluate(doc, 15.0, None, now)[0] == 0
    assert evaluate(doc, 15.0, None, now + dt.timedelta(days=24))[0] == 1
    logged: list[str] = []

    class Log:
        @staticmethod
        def warning(event: str, **kw: Any) -> None:
            logged.append(f"{kw['what']} {kw['threshold_days']}")

    class Board:
        node, cert_not_after, peers = "n", None, {}
        crl_next_update = now + dt.timedelta(days=30)
    watch = ExpiryWatch(Log)
    watch.check(Board, now)
    assert logged == []
    watch.check(Board, now + dt.timedelta(days=24))
    assert logged == ["crl 7"]


def test_a_node_change_refused_on_reload_names_the_key(tmp_path: Path,
                                                       daemons: list[Any]) -> None:
    # fourth operator trial: "[node] settings cannot change on reload" did not say which
    # of them had changed (it was spool_group)
    import signal
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    a.node_extra["log_level"] = "debug"
    a.node_extra["audit_checkpoint_lines"] = 10
    a.write_config()
    a.signal(signal.SIGHUP)
    failed = wait_for(lambda: a.events("reload_failed"), 15)[0]
    assert failed["reason"] == ("[node] log_level, audit_checkpoint_lines cannot change on "
                                "reload: restart linkd (or put the old value back)"), failed


def test_files_of_a_removed_channel_are_recalled_at_every_start_and_by_check(
        tmp_path: Path, daemons: list[Any]) -> None:
    # fourth operator trial: channel_removed was logged once, at the reload; after a
    # restart `queue` said "queue empty" and `check` OK while files sat in queue/newch/
    a, b = make_pair(tmp_path, channels=[{"name": "data"}, {"name": "newch"}])
    daemons += [a, b]
    assert ctl(a, "pause", "--peer", "bravo", "--channel", "newch").returncode == 0
    for i in range(3):
        a.drop("bravo", "newch", f"n{i}.txt", b"waits")
    wait_for(lambda: channel(a, "bravo", "newch")["queued"] == 3, 15)
    a.peers[0]["channels"] = [{"name": "data"}]
    a.reload()
    assert peer(a, "bravo")["left_behind"] == {"newch": 3}
    warned = ctl(a, "check")
    assert warned.returncode == 1 and \
        "bravo/newch: 3 file(s) of a channel no longer configured" in warned.stdout, warned
    a.stop()
    a.start()
    again = [e for e in a.events("channel_removed") if e.get("queued") == 3]
    assert again and "configure it again to send them" in again[-1]["reason"], again
    assert peer(a, "bravo")["left_behind"] == {"newch": 3}
    assert ctl(a, "check").returncode == 1
    a.peers[0]["channels"] = [{"name": "data"}, {"name": "newch"}]
    a.reload()
    assert peer(a, "bravo")["left_behind"] == {}


def test_a_second_daemon_on_the_same_spool_refuses_with_one_line(
        tmp_path: Path, daemons: list[Any]) -> None:
    # an operator trial: a copy of the config with its own port, state_dir and status
    # socket but the same spool_dir started; both daemons claimed from one out/ into
    # one queue/ (duplicates, claims failed as "missing", 27 files left waiting)
    a, b = make_pair(tmp_path)
    daemons += [a, b]
    names = [f"f{i}.txt" for i in range(20)]
    twin = Daemon(tmp_path / "twin", "bravo", b.pki_dir, port=free_port())
    twin.spool = b.spool                        # the one thing the copy kept
    twin.peers = b.peers
    daemons.append(twin)
    for name in names:                          # what both would have claimed
        b.drop("alpha", "data", name, name.encode())
    twin.start(wait=False)

    def exited_or_serving() -> bool:
        assert twin.proc is not None
        if twin.proc.poll() is not None:
            return True
        try:
            return http_get(twin.socket, "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    wait_for(exited_or_serving, 30, message=twin.tail)
    assert twin.proc is not None and twin.proc.returncode == 1, twin.tail()
    assert twin.log_path.read_text().splitlines() == [
        f"linkd: another linkd (pid {b.proc.pid}) already uses the spool {b.spool}: two "
        "daemons on one spool would send files twice; give this one its own "
        "[node].spool_dir, or stop the other"]
    assert (b.spool / ".linkd.lock").read_text() == f"{b.proc.pid}\n"
    # the first daemon goes on: every file arrives once, under its own name
    wait_for(lambda: set(a.inbound("bravo", "data")) == set(names), 30, message=b.tail)
    assert a.inbound("bravo", "data") == {name: name.encode() for name in names}
    assert entries(b.out_dir("alpha", "data")) == []
    assert b.healthy()
    a.drop("bravo", "data", "back.txt", b"back")
    wait_for(lambda: "back.txt" in b.inbound("alpha", "data"), 20, message=b.tail)
