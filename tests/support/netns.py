"""Two network namespaces joined by a veth pair, with nft faults between them (root only).

    with NetnsPair() as net:             # or net = NetnsPair(); net.setup(); ... net.teardown()
        daemon.wrap = net.wrap(net.a)    # run a daemon inside namespace A
        net.partition()                  # DROP everything between A and B (both ways)
        net.heal()
        net.reset_from_a()               # A's TCP packets reach B as RSTs back to A

The addresses (10.231.N.1/30 in A, 10.231.N.2/30 in B) exist only inside the two
namespaces this helper creates, so no traffic ever leaves this machine. Rules
live in each namespace's own nft ruleset and vanish with it. Namespaces are
named `lkdt-<pid>-<n>-a/b`; `sweep_stale()` removes those left behind by a test
process that no longer exists.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

TABLE = "linkd_fault"
_counter = itertools.count()


def run(*cmd: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, input=input, text=True, capture_output=True, timeout=20)
    if check and done.returncode:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout,
                                            f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why namespace fault tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and nft)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 nftables)"
    probe = f"lkdt-probe-{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
        try:
            run("ip", "netns", "exec", probe, "nft", "list", "ruleset")
        finally:
            run("ip", "netns", "del", probe, check=False)
    except subprocess.CalledProcessError as exc:
        return f"network namespaces or nft unusable here: {exc.stderr.strip() or exc}"
    return None


def sweep_stale() -> None:
    """Delete lkdt-* namespaces whose creating process is gone."""
    try:
        names = run("ip", "netns", "list", check=False).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return
    for name in names:
        m = re.fullmatch(r"lkdt-(\d+)-\d+-[ab]", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            run("ip", "netns", "del", name, check=False)


class NetnsPair:
    def __init__(self) -> None:
        n = next(_counter)
        tag = f"{os.getpid()}-{n}"
        self.a, self.b = f"lkdt-{tag}-a", f"lkdt-{tag}-b"
        subnet = (os.getpid() * 7 + n) % 250 + 1
        self.addr_a, self.addr_b = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
        self._veth_a, self._veth_b = f"lkdta{n}", f"lkdtb{n}"
        self.rules: str | None = None

    # -- lifecycle -----------------------------------------------------------------

    def setup(self) -> NetnsPair:
        sweep_stale()
        try:
            run("ip", "netns", "add", self.a)
            run("ip", "netns", "add", self.b)
            run("ip", "link", "add", self._veth_a, "netns", self.a, "type", "veth",
                "peer", "name", self._veth_b, "netns", self.b)
            for ns, dev, addr in ((self.a, self._veth_a, self.addr_a),
                                  (self.b, self._veth_b, self.addr_b)):
                run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                run("ip", "-n", ns, "link", "set", dev, "up")
                run("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        for ns in (self.a, self.b):
            run("ip", "netns", "del", ns, check=False)

    def __enter__(self) -> NetnsPair:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def wrap(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    # -- faults (rules live in namespace B, on B's side of the veth) -------------------

    def _apply(self, body: str) -> None:
        self.heal()
        text = f"table inet {TABLE} {{\n{body}\n}}\n"
        run("ip", "netns", "exec", self.b, "nft", "-f", "-", input=text)
        self.rules = body

    def heal(self) -> None:
        if self.rules is not None:
            run("ip", "netns", "exec", self.b, "nft", "delete", "table", "inet", TABLE,
                check=False)
            self.rules = None

    def partition(self) -> None:
        """Silently drop every packet between A and B, both ways (a cable pulled)."""
        self._apply(f"""
  chain input {{ type filter hook input priority 0; policy accept;
    ip saddr {self.addr_a} drop; }}
  chain output {{ type filter hook output priority 0; policy accept;
    ip daddr {self.addr_a} drop; }}""")

    def reset_from_a(self) -> None:
        """Every TCP segment from A is refused with a TCP reset (a middlebox killing the
        flow); B's own segments still leave, and A's answering RSTs are dropped, so B
        learns only from its heartbeat or a replacing session."""
        self._apply(f"""
  chain input {{ type filter hook input priority 0; policy accept;
    ip saddr {self.addr_a} meta l4proto tcp reject with tcp reset;
    ip saddr {self.addr_a} drop; }}""")
