"""Real linkd processes for fault tests: a small harness over the installed package.

`make_pair(tmp_path, ...)` writes a throwaway PKI (linkd.pki) and two configs,
and returns two `Daemon` objects that start `python -m linkd.cli.linkd_main`
as child processes with JSON logs in files. Everything is reached through the
outside contract (configs, spool folders, the status socket, signals, logs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from linkd import pki
from linkd.status import http_get

FAST = {"reconnect_min": 0.2, "reconnect_max": 1.0, "heartbeat_interval": 0.5,
        "heartbeat_timeout": 2.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02,
             message: str | Callable[[], str] = "") -> Any:
    """Poll a condition of the outside world (files, status) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s: {text}")
        time.sleep(interval)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


class Daemon:
    def __init__(self, root: Path, name: str, pki_dir: Path, *, port: int | None = None,
                 link: dict[str, Any] | None = None, file_mode: str | None = None,
                 wrap: list[str] | None = None) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool = self.dir / "spool"
        self.state = self.dir / "state"
        self.socket = Path(f"/tmp/linkd-test-{os.getpid()}-{name}-{id(self)}.sock")
        self.config_path = self.dir / "linkd.toml"
        self.log_path = self.dir / "linkd.log"
        self.pki_dir = pki_dir
        self.port = port
        self.link = {**FAST, **(link or {})}
        self.file_mode = file_mode
        self.peers: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.wrap: list[str] = list(wrap or [])   # e.g. ["prlimit", "--nofile=128:128"]
        self.listen_address = "127.0.0.1"    # e.g. an address inside a test netns
        self.node_extra: dict[str, Any] = {}  # more [node] keys, e.g. spool_group
        self.status_extra: dict[str, Any] = {}  # [status] keys, e.g. metrics_listen
        self.tls_extra: dict[str, Any] = {}   # more [tls] keys, e.g. crl
        self.env: dict[str, str] = {}         # more environment for the daemon

    def add_peer(self, name: str, channels: list[dict[str, Any]], connect: str | None = None,
                 ) -> None:
        self.peers.append({"name": name, "connect": connect, "channels": channels})

    def write_config(self) -> None:
        lines = ["[node]", f"name = {_toml(self.name)}", f"spool_dir = {_toml(self.spool)}",
                 f"state_dir = {_toml(self.state)}", f"status_socket = {_toml(self.socket)}"]
        if self.file_mode:
            lines.append(f"file_mode = {_toml(self.file_mode)}")
        lines += [f"{k} = {_toml(v)}" for k, v in self.node_extra.items()]
        if self.status_extra:
            lines += ["", "[status]"] + [f"{k} = {_toml(v)}" for k, v in self.status_extra.items()]
        lines += ["", "[tls]", f"cert = {_toml(self.pki_dir / (self.name + '.crt'))}",
                  f"key = {_toml(self.pki_dir / (self.name + '.key'))}",
                  f"ca = {_toml(self.pki_dir / 'ca.crt')}"]
        lines += [f"{k} = {_toml(v)}" for k, v in self.tls_extra.items()] + [""]
        if self.port:
            lines += ["[listen]", f"address = {_toml(self.listen_address)}", f"port = {self.port}",
                      ""]
        lines += ["[link]"] + [f"{k} = {_toml(v)}" for k, v in self.link.items()] + [""]
        for peer in self.peers:
            lines += ["[[peer]]", f"name = {_toml(peer['name'])}"]
            if peer["connect"]:
                lines.append(f"connect = {_toml(peer['connect'])}")
            for ch in peer["channels"]:
                lines += ["", "  [[peer.channel]]"] + [f"  {k} = {_toml(v)}" for k, v in ch.items()]
            lines.append("")
        self.config_path.write_text("\n".join(lines) + "\n")

    # -- process ---------------------------------------------------------------

    def start(self, wait: bool = True) -> Daemon:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrap, sys.executable, "-m", "linkd.cli.linkd_main", "-c",
                 str(self.config_path), "--log-format", "json"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env=env)
        if wait:
            wait_for(self.healthy, 30, message=lambda: f"{self.name} not healthy\n{self.tail()}")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n{self.tail()}")
        try:
            return http_get(self.socket, "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the daemon and everything in its process group (a wrapper such as
        strace and its tracee, or setpriv's exec), then reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        else:
            try:  # the wrapper is gone; a detached tracee may live on in its group
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    # -- observing -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        code, body = http_get(self.socket, "/status", timeout=2)
        assert code == 200
        return dict(json.loads(body))

    def peer_state(self, peer: str) -> str | None:
        try:
            for p in self.status()["peers"]:
                if p["name"] == peer:
                    return str(p["state"])
        except (OSError, AssertionError, ValueError):
            return None
        return None

    def wait_state(self, peer: str, state: str = "connected", timeout: float = 30) -> None:
        wait_for(lambda: self.peer_state(peer) == state, timeout,
                 message=lambda: f"{self.name}: {peer} is {self.peer_state(peer)}\n{self.tail()}")

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            if line[:1] == "<" and line[2:3] == ">":    # a journald priority prefix
                line = line[3:]
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == name:
                    out.append(event)
        return out

    def all_events(self) -> list[dict[str, Any]]:
        """Every JSON event line of the log (all runs: the log is appended to)."""
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def reload(self, timeout: float = 30) -> None:
        """Write the config again and SIGHUP the daemon; return once it has logged the
        reload (`reloaded`); a `reload_failed` raises AssertionError with its reason."""
        before = len(self.events("reloaded")) + len(self.events("reload_failed"))
        self.write_config()
        self.signal(signal.SIGHUP)
        wait_for(lambda: len(self.events("reloaded")) + len(self.events("reload_failed"))
                 > before, timeout, message=lambda: f"{self.name} did not reload\n{self.tail()}")
        if self._last_reload_event() == "reload_failed":
            reason = self.events("reload_failed")[-1].get("reason")
            raise AssertionError(f"{self.name}: reload failed: {reason}")

    def _last_reload_event(self) -> str | None:
        last = None
        for event in self.all_events():
            if event.get("event") in ("reloaded", "reload_failed"):
                last = event["event"]
        return last

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    # -- spool -----------------------------------------------------------------

    def out_dir(self, peer: str, ch: str) -> Path:
        return self.spool / peer / "out" / ch

    def in_dir(self, peer: str, ch: str) -> Path:
        return self.spool / peer / "in" / ch

    def drop(self, peer: str, ch: str, name: str, data: bytes) -> Path:
        out = self.out_dir(peer, ch)
        out.mkdir(parents=True, exist_ok=True)
        temp = out / f".{name}.tmp"
        with open(temp, "wb") as f:
            f.write(data)
        os.rename(temp, out / name)
        return out / name

    def queue_dir(self, peer: str, ch: str) -> Path:
        """The spool's own queue of claimed files (CONTRACT revision 2, §3)."""
        return self.spool / peer / "queue" / ch

    def failed_dir(self, peer: str, ch: str) -> Path:
        return self.spool / peer / "failed" / ch

    def inbound(self, peer: str, ch: str) -> dict[str, bytes]:
        folder = self.in_dir(peer, ch)
        if not folder.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
                if p.is_file() and not p.name.startswith(".")}


def make_pki(directory: Path, names: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pki.init_ca(directory)
    for name in names:
        pki.issue(directory, name)
    return directory


def make_pair(tmp_path: Path, channels: list[dict[str, Any]] | None = None,
              link: dict[str, Any] | None = None, start: bool = True,
              connect_via: str | None = None) -> tuple[Daemon, Daemon]:
    """alpha dials bravo (bravo listens); both run and are connected when start=True."""
    channels = channels or [{"name": "data"}]
    pki_dir = make_pki(tmp_path / "pki", ["alpha", "bravo"])
    b = Daemon(tmp_path, "bravo", pki_dir, port=free_port(), link=link)
    a = Daemon(tmp_path, "alpha", pki_dir, link=link)
    a.add_peer("bravo", channels, connect=connect_via or f"127.0.0.1:{b.port}")
    b.add_peer("alpha", channels)
    if start:
        start_connected(a, b)
    return a, b


def start_connected(a: Daemon, b: Daemon, on_failure: Callable[[], Any] | None = None) -> None:
    """Start bravo then alpha and wait until each reports the other connected; on any
    failure stop both (the caller never got them: do not leak processes)."""
    try:
        b.start()
        a.start()
        a.wait_state("bravo")
        b.wait_state("alpha")
    except BaseException:
        stop_all(a, b)
        if on_failure is not None:
            on_failure()
        raise


def stop_all(*daemons: Daemon) -> None:
    for d in daemons:
        try:
            d.kill()
        except Exception:
            pass
        try:
            d.socket.unlink()
        except OSError:
            pass


# -- helpers for fault tests ------------------------------------------------------


def make_pair_via_proxy(tmp_path: Path, channels: list[dict[str, Any]] | None = None,
                        link: dict[str, Any] | None = None, start: bool = True,
                        ) -> tuple[Daemon, Daemon, Any]:
    """Like make_pair, but alpha dials bravo through a tcpproxy.Proxy (returned third;
    the caller closes it)."""
    from tcpproxy import Proxy

    a, b = make_pair(tmp_path, channels=channels, link=link, start=False)
    assert b.port is not None
    proxy = Proxy(b.port)
    a.peers[0]["connect"] = proxy.address
    if start:
        start_connected(a, b, on_failure=proxy.close)
    return a, b, proxy


def entries(folder: Path) -> list[str]:
    """Every name in `folder` (dot-files included); [] if it does not exist."""
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_file(path: Path, size: int, seed: int | None = None) -> str:
    """Write `size` random bytes to `path` in 1 MiB pieces; return their SHA-256."""
    import hashlib
    import random

    digest = hashlib.sha256()
    rng = random.Random(seed) if seed is not None else None
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            chunk = rng.randbytes(n) if rng is not None else os.urandom(n)
            f.write(chunk)
            digest.update(chunk)
            left -= n
    return digest.hexdigest()


# -- helpers for resilience tests (issue 4) ---------------------------------------


def make_mutual_pair(tmp_path: Path, channels: list[dict[str, Any]] | None = None,
                     link: dict[str, Any] | None = None, start: bool = True,
                     ) -> tuple[Daemon, Daemon]:
    """alpha and bravo both listen AND both dial each other (the tie-break case)."""
    channels = channels or [{"name": "data"}]
    pki_dir = make_pki(tmp_path / "pki", ["alpha", "bravo"])
    a = Daemon(tmp_path, "alpha", pki_dir, port=free_port(), link=link)
    b = Daemon(tmp_path, "bravo", pki_dir, port=free_port(), link=link)
    a.add_peer("bravo", channels, connect=f"127.0.0.1:{b.port}")
    b.add_peer("alpha", channels, connect=f"127.0.0.1:{a.port}")
    if start:
        try:
            a.start(wait=False)
            b.start(wait=False)
            for d, p in ((a, "bravo"), (b, "alpha")):
                wait_for(d.healthy, 30, message=lambda d=d: f"{d.name} not healthy\n{d.tail()}")
                d.wait_state(p)
        except BaseException:
            stop_all(a, b)
            raise
    return a, b


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def delivered_seqs(d: Daemon, peer: str, channel: str) -> list[int]:
    """Every seq the daemon logged as delivered from `peer` on `channel` (in log order)."""
    return [int(e["seq"]) for e in d.events("message_delivered")
            if e.get("peer") == peer and e.get("channel") == channel]


def assert_exactly_once(receiver: Daemon, peer: str, channel: str,
                        expected: dict[str, bytes], logs_complete: bool = True) -> None:
    """`in/<channel>/` holds exactly `expected` (no copies, no ~N names), and the log
    shows each seq delivered once (`logs_complete=False` after a SIGKILL of the
    receiver, which may die between a commit and its log line)."""
    got = receiver.inbound(peer, channel)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    bad = [n for n in expected if got[n] != expected[n]]
    assert not bad, f"content differs: {bad[:5]}"
    seqs = delivered_seqs(receiver, peer, channel)
    assert len(seqs) == len(set(seqs)), "a seq was delivered twice"
    if logs_complete:
        assert len(seqs) == len(expected), (len(seqs), len(expected))


# -- helpers for the edge tests and the operator-fault campaign (issue 7) -----------


def channel_state_dirs(d: Daemon, peer: str, ch: str) -> list[Path]:
    """What "this channel's state" is on disk: `<state>/peers/<peer>/channels/<ch>/`
    (the issue 7 layout); for a state dir of the layout before it, the channel's
    `out/<ch>.json` and `in/<ch>.json` records (never the claimed files beside them)."""
    peer_dir = d.state / "peers" / peer
    new = peer_dir / "channels" / ch
    if new.exists():
        return [new]
    return [p for p in (peer_dir / "out" / f"{ch}.json", peer_dir / "in" / f"{ch}.json")
            if p.exists()]


def delete_channel_state(d: Daemon, peer: str, ch: str) -> list[Path]:
    """Delete one channel's state (the daemon must be stopped); returns what was removed."""
    import shutil

    removed = channel_state_dirs(d, peer, ch)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def copy_state(d: Daemon, dest: Path) -> Path:
    """A backup of the daemon's state dir (take it while the daemon is stopped)."""
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(d.state, dest, symlinks=True)
    return dest


def restore_state(d: Daemon, backup: Path) -> None:
    """Put a backup in place of the daemon's state dir (the daemon must be stopped)."""
    import shutil

    if d.state.exists():
        shutil.rmtree(d.state)
    shutil.copytree(backup, d.state, symlinks=True)


def leftovers(d: Daemon, peer: str, channels: list[str]) -> list[str]:
    """Files still waiting on the sending side: out/<ch>/ (not dot-files), the spool's
    queue/<ch>/, and claimed `.data` files under the state dir (the layout before
    issue 7 kept the queue there)."""
    found = []
    for ch in channels:
        found += [f"out/{ch}/{n}" for n in entries(d.out_dir(peer, ch)) if not n.startswith(".")]
        found += [f"queue/{ch}/{n}" for n in entries(d.queue_dir(peer, ch))
                  if not n.startswith(".")]
    if d.state.exists():
        for path in sorted(d.state.rglob("*.data")):
            found.append(f"state/{path.relative_to(d.state)}")
    return found


def open_paths(pid: int) -> set[str]:
    """The paths a process holds open (from /proc/PID/fd); empty if it is gone."""
    found = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return found


WRITER = r"""
import os, random, sys, time
path, size, chunk, pause, first, first_pause, seed, owner = sys.argv[1:9]
size, chunk, first, seed, owner = int(size), int(chunk), int(first), int(seed), int(owner)
pause, first_pause = float(pause), float(first_pause)
data = random.Random(seed).randbytes(size)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
if owner >= 0:
    os.fchown(fd, owner, owner)     # another user's file: the daemon gets no lease on it
done = 0
if first:
    done = os.write(fd, data[:first])
    time.sleep(first_pause)
while done < size:
    done += os.write(fd, data[done:done + chunk])
    time.sleep(pause)
os.close(fd)
"""


def writer_payload(size: int, seed: int) -> bytes:
    """The bytes `start_writer(..., seed=seed)` writes."""
    import random

    return random.Random(seed).randbytes(size)


def start_writer(path: Path, size: int, *, chunk: int = 1 << 20, pause: float = 0.05,
                 first: int = 0, first_pause: float = 0.0, seed: int = 0, owner: int = -1,
                 ) -> subprocess.Popen[bytes]:
    """A separate process that writes `size` bytes straight into `path` (in place, like
    `cp`): open, optionally `first` bytes then `first_pause` seconds, then `chunk`-byte
    writes with `pause` after each, then close. Its content is writer_payload(size, seed).
    `owner` (root only): the file is given to that uid and gid once created."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(size), str(chunk),
                             str(pause), str(first), str(first_pause), str(seed),
                             str(owner)])
