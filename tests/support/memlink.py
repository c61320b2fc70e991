"""In-memory helpers for resilience tests under trio's MockClock.

* `node_config` / `make_link`: a real `Config` and `PeerLink` (real spool on a
  tmp folder, real TLS material from trustme) without a daemon process.
* `FakePeer`: the far end of a session, driven by our own sans-IO `Session`,
  that the test can make silent, slow, or flood with pings; it records every
  frame it receives with the (virtual) time it arrived.
* `Throttled`: a stream wrapper that moves bytes at a fixed rate in virtual
  time, i.e. a bandwidth-limited link with no buffering ahead of the sender.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import trio
import trustme

from linkd.config import (
    ChannelConfig,
    Config,
    LinkConfig,
    ListenConfig,
    NodeConfig,
    PeerConfig,
    TLSConfig,
)
from linkd.proto import frames as F
from linkd.proto import session as S
from linkd.proto.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

FAR = 1e9     # a deadline that never comes


def inline_thread_hops(monkeypatch: Any) -> None:
    """Run the daemon's (short, local-disk) thread hops inline (call it from an
    autouse fixture of a module that runs under autojump_clock).

    With autojump_threshold=0 the MockClock leaps to the next deadline whenever
    every task is blocked, and a task waiting for a worker thread counts as
    blocked: virtual time would race ahead while a real fsync runs. Inline, the
    loop is busy for that moment and virtual time stays exact.
    """
    async def inline(fn: Any, *args: Any, **kwargs: Any) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        return fn(*args)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)

_FAKE_CA: trustme.CA | None = None
_FAKE: dict[str, Any] = {}


def fake_identity(name: str) -> Any:
    """A signing identity (linkd.evidence.keys.Signer) for a FakePeer named `name`."""
    global _FAKE_CA
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from linkd.evidence.keys import Signer
    if name not in _FAKE:
        _FAKE_CA = _FAKE_CA or trustme.CA()
        cert = _FAKE_CA.issue_cert(name, common_name=name)
        _FAKE[name] = Signer(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()),
                             load_pem_private_key(cert.private_key_pem.bytes(), None))
    return _FAKE[name]


def _peer_cert_source(cfg: Config, peer_name: str) -> Any:
    """The peer's certificate for a session over a plain memory stream (no TLS): the
    real node's when the test made one beside ours, else the FakePeer identity."""
    def source() -> bytes:
        from linkd.evidence.keys import der, load_certs
        real = cfg.path.parent.parent / peer_name / "cert.pem"
        if real.exists():
            return der(load_certs(real)[0])
        der_bytes: bytes = fake_identity(peer_name).cert_der
        return der_bytes
    return source


def node_config(tmp_path: Path, ca: trustme.CA, name: str, peers: list[PeerConfig],
                link: LinkConfig | None = None) -> Config:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(name, common_name=name)
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return Config(
        path=folder / "linkd.toml",
        node=NodeConfig(name=name, spool_dir=folder / "spool", state_dir=folder / "state",
                        status_socket=folder / "status.sock"),
        tls=TLSConfig(cert=folder / "cert.pem", key=folder / "key.pem", ca=folder / "ca.pem"),
        listen=ListenConfig("127.0.0.1", 7443), link=link or LinkConfig(), peers=tuple(peers))


def make_link(cfg: Config, peer_name: str) -> Any:
    """A prepared PeerLink (folders made, recovery run) for `peer_name` of `cfg`."""
    from linkd.net.peer import PeerLink
    from linkd.status import PeerStatus, _utcnow
    peer = next(p for p in cfg.peers if p.name == peer_name)
    status = PeerStatus(peer.name, "connecting" if peer.connect else "waiting", _utcnow())
    for ch in peer.channels:
        status.channel(ch.name)
    link = PeerLink(cfg, peer, status)
    link.peer_cert_source = _peer_cert_source(cfg, peer_name)
    link.prepare()
    return link


def peer_config(name: str, channels: tuple[str | tuple[str, int], ...] = ("data",),
                connect: tuple[str, int] | None = None) -> PeerConfig:
    """`channels`: names, or (name, priority) pairs."""
    return PeerConfig(name=name, connect=connect, channels=tuple(
        ChannelConfig(c) if isinstance(c, str) else ChannelConfig(c[0], priority=c[1])
        for c in channels))


def drop(link: Any, channel: str, name: str, data: bytes) -> Path:
    out = link.layout.out_dir(channel)
    tmp = out / f".{name}.tmp"
    tmp.write_bytes(data)
    final = out / name
    tmp.rename(final)
    return final


class Throttled(trio.abc.Stream):
    """Sends at `rate` bytes per second of (virtual) time, each write `delay` late
    (the writer waits for it: no buffering ahead); receiving is untouched."""

    def __init__(self, inner: trio.abc.Stream, rate: float, delay: float = 0.0) -> None:
        self.inner = inner
        self.rate = rate
        self.delay = delay
        self.broken = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # Like trio.SSLStream, a send cancelled half-way leaves the stream broken.
        if self.broken:
            raise trio.BrokenResourceError("an earlier send was cancelled half-way")
        self.broken = True
        # Delivered in 16 KiB segments, as TCP would: the front of a write arrives first.
        await trio.sleep(self.delay)
        view = memoryview(data)
        for i in range(0, len(view), 16384):
            piece = view[i:i + 16384]
            await trio.sleep(len(piece) / self.rate)
            await self.inner.send_all(piece)
        self.broken = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()   # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.inner.aclose()


class FakePeer:
    """The far side of a session, speaking the real protocol through a sans-IO Session.

    `silent=True`: send the hello, then never write again (but keep reading).
    Otherwise it answers pings (the Session queues pongs), grants back credit as
    data arrives and acknowledges every complete message.
    """

    def __init__(self, stream: trio.abc.Stream, *, node: str = "bravo", peer: str = "alpha",
                 channels: tuple[str, ...] = ("data",), credit: int = 4 << 20,
                 silent: bool = False, ack: bool = True,
                 withhold: frozenset[str] = frozenset(), committed: int = 0,
                 forge: Any = None, max_bytes: int = 1 << 40,
                 holds: dict[tuple[str, int], bytes] | None = None) -> None:
        self.stream = stream
        self.silent = silent
        self.ack = ack
        self.forge = forge                 # AckEntry -> AckEntry: a peer that lies
        self.holds = holds or {}           # (ch, seq) -> what it already committed there
        self.node = node
        self.peer = peer
        self.signer = fake_identity(node)  # signs receipts like a real peer
        self.withhold = set(withhold)      # channels whose credit we do not give back
        self.session = S.Session(
            node=node, peer=peer, now=trio.current_time(),
            channels=[F.ChannelHello(name=c, max=max_bytes, credit=credit, committed=committed)
                      for c in channels],
            heartbeat_interval=FAR, heartbeat_timeout=FAR, handshake_timeout=FAR)
        self.lock = trio.StrictFIFOLock()
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.frames: list[tuple[float, F.Frame]] = []
        self.bodies: dict[tuple[str, int], bytearray] = {}
        self.names: dict[tuple[str, int], str] = {}
        self.complete: dict[tuple[str, int], float] = {}
        self.closed = trio.Event()
        self.eof_at: float | None = None
        self.withheld: dict[str, int] = {}

    async def release(self, ch: str) -> None:
        """Give back all the credit withheld on `ch` and stop withholding it."""
        self.withhold.discard(ch)
        self.session.grant(ch, self.withheld.pop(ch, 0))
        await self.flush()

    def of(self, kind: type) -> list[tuple[float, Any]]:
        return [(t, f) for t, f in self.frames if isinstance(f, kind)]

    async def flush(self, extra: bytes = b"") -> None:
        if self.silent:
            return
        async with self.lock:
            data = self.session.data_to_send(trio.current_time()) + extra
            if data:
                await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)

    async def run(self) -> None:
        """Say hello, then read until EOF."""
        async with self.lock:
            await self.stream.send_all(self.session.data_to_send(trio.current_time()))
        try:
            while True:
                data = await self.stream.receive_some(1 << 20)
                now = trio.current_time()
                if not data:
                    self.eof_at = now
                    return
                self.decoder.feed(data)
                while (frame := self.decoder.next_frame()) is not None:
                    self.frames.append((now, frame))
                for ev in self.session.receive_data(data, now):
                    if isinstance(ev, S.MessageStart):
                        self.bodies[(ev.ch, ev.seq)] = bytearray()
                        self.names[(ev.ch, ev.seq)] = ev.name
                    elif isinstance(ev, S.MessageData):
                        self.bodies[(ev.ch, ev.seq)] += ev.data
                        if ev.ch in self.withhold:
                            self.withheld[ev.ch] = self.withheld.get(ev.ch, 0) + len(ev.data)
                        else:
                            self.session.grant(ev.ch, len(ev.data))
                    elif isinstance(ev, S.MessageComplete):
                        self._done(ev.ch, ev.seq, now)
                await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.eof_at = trio.current_time()
        finally:
            self.closed.set()

    def _done(self, ch: str, seq: int, now: float) -> None:
        self.complete[(ch, seq)] = now
        if self.ack and not self.silent:
            body = self.holds.get((ch, seq), bytes(self.bodies[(ch, seq)]))
            name = self.names[(ch, seq)]
            entry = F.AckEntry(seq, hashlib.sha256(body).digest(), len(body), name, name, now)
            entry = self.sign(ch, entry)
            if self.forge is not None:
                entry = self.forge(entry)
            self.session.send_ack(ch, [entry])

    def sign(self, ch: str, entry: F.AckEntry) -> F.AckEntry:
        """Attach a receipt signed with this peer's key (a batch of one)."""
        import dataclasses

        from linkd.evidence import receipts as R
        from linkd.evidence.canonical import micros
        receipt = R.Receipt(frm=self.peer, to=self.node, channel=ch, seq=entry.seq,
                            sent_name=entry.sent_name, delivered_name=entry.name,
                            size=entry.size, sha256=entry.sha256.hex(),
                            delivered_at_us=micros(entry.delivered_at))
        proof = R.sign_batch([receipt], self.signer)[0]
        return dataclasses.replace(entry, sig=proof.signature, index=0, batch=1, path=(),
                                   signer=bytes.fromhex(proof.signer))

    def sha(self, ch: str, seq: int) -> str:
        return hashlib.sha256(bytes(self.bodies[(ch, seq)])).hexdigest()


def ping_bytes(first_id: int, count: int) -> bytes:
    return b"".join(encode_frame(F.Ping(i)) for i in range(first_id, first_id + count))


INF = math.inf


def scan_sync(link: Any) -> None:
    """Claim what was dropped, on every channel (blocking; outside trio)."""
    for name, out in link.outbound.items():
        out.scan(None)
        link.refresh_queued([name])


async def run_pair(a: Any, b: Any, channel: str = "data",
                   before_close: Any = None) -> None:
    """Run a real session between two PeerLinks over a memory stream (alpha dials)
    until `channel`'s queue on `a` is empty, i.e. every file acknowledged (durable
    in b's in/); then call `before_close()` while the session is still up, and close."""
    import trio.testing

    from linkd.net.connection import SessionRunner
    left, right = trio.testing.memory_stream_pair()
    ra = SessionRunner(a, left, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, right, remote="a", dialed_by_us=False, tls_info=None)
    a.take_slot(ra), b.take_slot(rb)
    outbound = a.outbound[channel]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            while outbound.pending():  # noqa: ASYNC110 (acknowledged = durable in b's in/)
                await trio.sleep(0.01)
            if before_close is not None:
                before_close()
            await ra.close("done")
            nursery.cancel_scope.cancel()
