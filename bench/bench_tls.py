#!/usr/bin/env python3
"""The TLS stack: pyOpenSSL TLSStream (hybrid ML-KEM) against the old trio.SSLStream path.

    .venv/bin/python bench/bench_tls.py [--mib 1024] [--rounds 2] [--handshakes 300]
                                        [--sessions 400]

Everything runs in the same invocation, so the two stacks see the same machine state:

1. bulk: MiB over loopback TCP, the receiver in its own process (as two linkd
   daemons would be), the sender writing 256 KiB chunks (linkd's CHUNK_SIZE) and
   the receiver asking for linkd's READ_SIZE (256 KiB) at a time. Timed from the
   first byte sent to the receiver's one-byte acknowledgement of the last. Stacks alternate, each
   `--rounds` times; the best and the median round are reported.
2. handshakes per second: client and server in one process over a memory stream
   (so this is the CPU of both ends of one handshake), including the identity check:
   linkd's stack with its groups (X25519MLKEM768 chosen), the same stack forced to
   X25519, and the old stdlib path (X25519; OpenSSL 3.0 has no ML-KEM).
3. memory per session: `--sessions` connected session pairs held open in a fresh
   process per stack, idle after the handshake and after one 256 KiB write each way
   (the memory BIOs keep the capacity they grew to); RSS growth / (2 * pairs).

Certificates are ECDSA P-256 from a throwaway trustme CA, as `linkctl pki` issues.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

import trio  # noqa: E402
import trio.testing  # noqa: E402
import trustme  # noqa: E402

from linkd.config import (  # noqa: E402
    ChannelConfig,
    Config,
    LinkConfig,
    ListenConfig,
    NodeConfig,
    PeerConfig,
    TLSConfig,
)
from linkd.net import tls as T  # noqa: E402
from linkd.net.connection import READ_SIZE  # noqa: E402

MiB = 1 << 20
CHUNK = 256 * 1024
READ = READ_SIZE          # what linkd's session reader asks for
STACKS = ("stdlib", "pyopenssl")


# -- the two stacks ---------------------------------------------------------------------

def legacy_context(cfg: Config, server: bool) -> ssl.SSLContext:
    """linkd's TLS policy before the switch (net/tls.py on Python's ssl), verbatim."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
    ctx.load_verify_locations(cafile=str(cfg.tls.ca))
    ctx.verify_flags = ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_TRUSTED_FIRST
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def issue(root: Path) -> None:
    """A throwaway CA and the certificates of alpha and bravo under `root` (as memlink)."""
    from memlink import node_config
    ca = trustme.CA()
    node_config(root, ca, "alpha", [])
    node_config(root, ca, "bravo", [])


def configs_from(root: Path) -> tuple[Config, Config]:
    """alpha (the dialler) and bravo, each naming the other as its one peer."""
    out = []
    for name, other in (("alpha", "bravo"), ("bravo", "alpha")):
        folder = root / name
        out.append(Config(
            path=folder / "linkd.toml",
            node=NodeConfig(name=name, spool_dir=folder / "spool", state_dir=folder / "state",
                            status_socket=folder / "status.sock"),
            tls=TLSConfig(cert=folder / "cert.pem", key=folder / "key.pem",
                          ca=folder / "ca.pem"),
            listen=ListenConfig("127.0.0.1", 7443), link=LinkConfig(),
            peers=(PeerConfig(other, channels=(ChannelConfig("d"),)),)))
    return out[0], out[1]


class Stack:
    """Wrap a transport as client or server and finish the handshake, the linkd way."""

    def __init__(self, name: str, alpha: Config, bravo: Config, groups: str | None = None):
        self.name, self.alpha, self.bravo = name, alpha, bravo
        if name == "stdlib":
            self.client_ctx = legacy_context(alpha, False)
            self.server_ctx = legacy_context(bravo, True)
        else:
            self.client_tls = T.make_contexts(alpha)
            self.server_tls = T.make_contexts(bravo)
            if groups is not None:
                for contexts in (self.client_tls, self.server_tls):
                    for ctx in (contexts.client, contexts.server):
                        T._set_groups(ctx, groups)

    async def client(self, transport: trio.abc.Stream) -> trio.abc.Stream:
        if self.name == "stdlib":
            s = trio.SSLStream(transport, self.client_ctx, server_hostname=None)
            await s.do_handshake()
            T.identify(s.getpeercert(True), list(self.alpha.peers))
            return s
        stream = self.client_tls.client_stream(transport, self.alpha.peers[0])
        await self.client_tls.finish_handshake(stream)
        return stream

    async def server(self, transport: trio.abc.Stream) -> trio.abc.Stream:
        if self.name == "stdlib":
            s = trio.SSLStream(transport, self.server_ctx, server_side=True)
            await s.do_handshake()
            T.identify(s.getpeercert(True), list(self.bravo.peers))
            return s
        stream = self.server_tls.server_stream(transport, list(self.bravo.peers))
        await self.server_tls.finish_handshake(stream)
        return stream


# -- 1. bulk ----------------------------------------------------------------------------

async def receiver_main(root: Path, stack_name: str, total: int) -> None:
    stack = Stack(stack_name, *configs_from(root))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    tcp = await listeners[0].accept()
    stream = await stack.server(tcp)
    got = 0
    cpu = time.process_time()
    while got < total:
        data = await stream.receive_some(READ)
        if not data:
            raise SystemExit(f"EOF after {got} bytes")
        got += len(data)
    cpu = time.process_time() - cpu
    await stream.send_all(b"!")
    assert await stream.receive_some(1) == b""      # the sender's close_notify
    await stream.aclose()
    print(cpu, flush=True)


async def send_to(root: Path, stack_name: str, port: int, total: int) -> tuple[float, float]:
    stack = Stack(stack_name, *configs_from(root))
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = await stack.client(tcp)
    chunk = os.urandom(CHUNK)
    sent = 0
    start, cpu = time.perf_counter(), time.process_time()
    while sent < total:
        piece = chunk if total - sent >= CHUNK else chunk[:total - sent]
        await stream.send_all(piece)
        sent += len(piece)
    assert await stream.receive_some(1) == b"!"
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await stream.aclose()
    return elapsed, cpu


def send_bulk(root: Path, stack_name: str, total: int) -> tuple[float, float]:
    """(seconds, CPU seconds of both processes) for `total` bytes."""
    child = subprocess.Popen([sys.executable, __file__, "--receiver", stack_name,
                              "--root", str(root), "--bytes", str(total)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        elapsed, cpu = trio.run(send_to, root, stack_name, port, total)
        receiver_cpu = float(child.stdout.readline())
        return elapsed, cpu + receiver_cpu
    finally:
        if child.wait(timeout=60) != 0:
            raise SystemExit(f"receiver ({stack_name}) failed")


# -- 2. handshakes ----------------------------------------------------------------------

async def handshakes_per_second(stack: Stack, count: int) -> tuple[float, str | None]:
    group = None
    start = time.perf_counter()
    for _ in range(count):
        left, right = trio.testing.memory_stream_pair()
        streams: dict[str, Any] = {}

        async def run(side: str, transport: trio.abc.Stream,
                      streams: dict[str, Any] = streams) -> None:
            streams[side] = await getattr(stack, side)(transport)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "client", left)
            nursery.start_soon(run, "server", right)
        server = streams["server"]
        if isinstance(server, T.TLSStream):
            group = T.group_name(server)
        else:
            group = "X25519 (stdlib default)"
    return count / (time.perf_counter() - start), group


# -- 3. memory --------------------------------------------------------------------------

def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def memory_main(root: Path, stack_name: str, pairs: int, exchange: int) -> None:
    stack = Stack(stack_name, *configs_from(root))
    held: list[Any] = []

    async def one() -> None:
        left, right = trio.testing.memory_stream_pair()
        streams: dict[str, Any] = {}

        async def run(side: str, transport: trio.abc.Stream,
                      streams: dict[str, Any] = streams) -> None:
            streams[side] = await getattr(stack, side)(transport)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "client", left)
            nursery.start_soon(run, "server", right)
        c, s = streams["client"], streams["server"]
        for a, b in ((c, s), (s, c)) if exchange else ():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_all, b"x" * exchange)
                got = 0
                while got < exchange:
                    got += len(await b.receive_some(READ))
        held.append((c, s))

    for _ in range(20):                   # warm up: imports, caches, allocator arenas
        await one()
    held.clear()
    before = rss_kib()
    for _ in range(pairs):
        await one()
    after = rss_kib()
    print(json.dumps({"kib_per_session": (after - before) / (2 * pairs)}), flush=True)


def memory_per_session(root: Path, stack_name: str, pairs: int, exchange: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory", stack_name, "--root", str(root),
                          "--sessions", str(pairs), "--bytes", str(exchange)],
                         check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["kib_per_session"])


# -- main -------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--receiver", choices=STACKS)
    parser.add_argument("--memory", choices=STACKS)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--bytes", type=int)
    args = parser.parse_args()
    if args.receiver:
        trio.run(receiver_main, args.root, args.receiver, args.bytes)
        return
    if args.memory:
        trio.run(memory_main, args.root, args.memory, args.sessions, args.bytes)
        return

    import OpenSSL
    print(f"Python ssl: {ssl.OPENSSL_VERSION}; pyOpenSSL {OpenSSL.__version__} on "
          f"{OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode()}")
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        root = Path(tmp)
        issue(root)
        alpha, bravo = configs_from(root)

        total = args.mib * MiB
        times: dict[str, list[tuple[float, float]]] = {s: [] for s in STACKS}
        for _ in range(args.rounds):
            for name in STACKS:
                times[name].append(send_bulk(root, name, total))
        print(f"\n1. bulk: {args.mib} MiB over loopback TCP, {args.rounds} rounds per stack "
              "(CPU: sender + receiver process, per GiB)")
        for name in STACKS:
            rates = [total / MiB / t for t, _ in times[name]]
            cpus = [c * (1 << 30) / total for _, c in times[name]]
            each = ", ".join(f"{r:.1f}" for r in rates)
            print(f"   {name:10s} best {max(rates):7.1f} MiB/s   median "
                  f"{statistics.median(rates):7.1f} MiB/s   ({each})   CPU "
                  f"{statistics.median(cpus):5.2f} s/GiB")

        print(f"\n2. handshakes per second (both ends in one process, {args.handshakes} each)")
        for label, stack in (("pyopenssl (linkd groups)", Stack("pyopenssl", alpha, bravo)),
                             ("pyopenssl X25519 only", Stack("pyopenssl", alpha, bravo,
                                                             groups="X25519")),
                             ("stdlib (old path)", Stack("stdlib", alpha, bravo))):
            rate, group = trio.run(handshakes_per_second, stack, args.handshakes)
            print(f"   {label:26s} {rate:7.1f} /s   group {group}")

        print(f"\n3. memory per session ({args.sessions} session pairs held open)")
        for exchange, label in ((0, "idle after the handshake"),
                                (CHUNK, "after one 256 KiB write each way (linkd's chunk)")):
            print(f"   {label}:")
            for name in STACKS:
                kib = memory_per_session(root, name, args.sessions, exchange)
                print(f"     {name:10s} {kib:7.1f} KiB per session")


if __name__ == "__main__":
    main()
