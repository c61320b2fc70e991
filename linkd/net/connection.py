"""SessionRunner: drives one protocol Session over one trio stream for a PeerLink.

Theory of operation
-------------------
Tasks, all in one nursery that dies with the session:

* reader  - bytes from the stream into the Session; inbound message events go
            to their channel's inbound queue (bounded in bytes by the credit we
            grant), acks to the ack worker, nacks and credit wake the sender.
* timer   - sleeps until Session.get_timer() and calls handle_timer (pings,
            heartbeat death, handshake timeout).
* writer  - flushes what the reader, timer and inbound workers queued.
* inbound - (after the hello) one per channel: takes every queued event of
            its channel, applies the batch to the spool in one thread hop
            (begin/write/finish, then one group commit), then acks (naming the
            content of each message), grants credit and logs. Channels never
            wait for each other's disk work. A storage error on one channel
            (disk full, EIO) nacks its message as "busy" (the sender waits and
            sends it again, not counted as an attempt); it does not end the
            session, so the other channels and the other direction go on.
* acks    - (after the hello) checks each acknowledgement against the file it
            names (seq, SHA-256, size, name: an ack is evidence, not a number)
            and resolves the matching files in batches; an ack naming other
            content for a message sent in this session is a protocol violation.
* sender  - (after the hello) picks a channel with the Scheduler, sends the
            next Msg or Data chunk within the credit, flushes, repeats.

Numbering that went wrong (our state lost or restored from a backup): a queued
file whose seq is at or below the peer's committed seq is first sent as a
*probe* (its Msg with offset = size, no data); the peer answers with an ack
naming what it holds under that seq (the same content: delivered, resolve it;
other content: renumber the file above the peer's committed seq and send it)
or with a "stale" nack when it cannot say (renumber, send, and log
`duplicate_possible`). A peer whose committed seq went *backwards* (its state
was lost) may hold files we are about to send again: `duplicate_possible` is
logged for those that may have been on the wire.

Channels the peer does not offer are *held*: their files stay queued (status
and `linkctl queue` say why) and flow once a later session offers the channel.

All writes to the stream go through `flush()` under one StrictFIFOLock. The
reader, the timer and the inbound worker never wait for that lock themselves:
they queue frames in the Session and wake the *writer* task, which flushes.
Otherwise a send blocked by a peer that is not reading (frozen, partitioned,
or itself blocked in a send) would stop our reading (both sides sending bulk
at once would deadlock, each waiting for the other to read) and our heartbeat
deadline (a frozen peer would never be declared dead). The reader only waits
for the writer when more than MAX_PENDING_OUTPUT bytes are queued (a peer
flooding pings while not reading), which bounds memory. The
session counts as up (`link_up`) only after the peer's hello has arrived,
because a TLS 1.3 client learns of its refusal only on its first read.

Nothing durable is done on a cancelled path: spool work runs in threads that
are not abandoned, so cancelling the session waits for the batch in hand.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import io
import math
import os
from typing import Any

import trio

from ..errors import LocalProtocolError, SpoolError
from ..evidence import audit as audit_mod
from ..evidence import keys as ekeys
from ..evidence import receipts as R
from ..evidence.canonical import micros
from ..proto import frames as F
from ..proto import session as S
from ..proto.framing import CHUNK_SIZE
from ..proto.scheduler import Scheduler
from ..spool import (
    ChecksumMismatch,
    Claimed,
    Completed,
    Delivered,
    FileChanged,
    InboundRefused,
    ResourceBusy,
)
from ..spool.inbound import quarantine_usage
from ..spool.outbound import is_resource_error
from ..wakeup import Wakeup

INITIAL_CREDIT = 4 << 20
MAX_IN_FLIGHT = 1024          # unacknowledged messages per channel
MAX_ATTEMPTS = 3              # sends of one message that fail its checksum before it is failed
READ_SIZE = 64 * 1024
MAX_INBOUND_BACKLOG = 4096    # queued inbound events before the reader stops reading
MAX_PENDING_OUTPUT = 1 << 20  # queued control bytes (pongs, acks...) before the reader waits
BUSY_WAIT = (1.0, 30.0)       # a channel whose disk work failed nacks "busy" (first, max wait)
QUARANTINE_WAIT = 30.0        # seconds a sender waits after a "quarantine full" busy nack
READ_RETRY = 2.0              # seconds before a queued file that could not be read is retried
ACKS_PER_FRAME = 256          # signed ack entries per frame (an RSA-4096 entry is ~1.5 KiB)


@dataclasses.dataclass
class _InFlight:
    item: Claimed
    probe: bool                              # sent as a probe (seq <= the peer's committed)


@dataclasses.dataclass
class _OutChannel:
    name: str
    priority: int
    next_seq: int = 1                        # send items with seq >= this next
    in_flight: dict[int, _InFlight] = dataclasses.field(default_factory=dict)
    current: Claimed | None = None
    fh: Any = None
    offset: int = 0
    digest: Any = None                       # SHA-256 of what we read, when sent from 0
    resume: tuple[int, int] | None = None
    peer_committed: int = 0                  # from the peer's hello
    probing: bool = False                    # queued seqs <= peer_committed await answers
    verdicts: dict[int, str] = dataclasses.field(default_factory=dict)  # seq -> other|unknown
    held: str | None = None                  # why its files wait (peer lacks the channel)
    wait_until: float = 0.0                  # trio time before which nothing is sent


class SessionRunner:
    def __init__(self, link: Any, stream: trio.abc.Stream, *, remote: str, dialed_by_us: bool,
                 tls_info: dict[str, Any] | None, now: float | None = None,
                 peer_cert: bytes | None = None) -> None:
        self.link = link
        self.stream = stream
        self.remote = remote
        self.dialed_by_us = dialed_by_us
        self.tls_info = tls_info
        # Evidence (docs/EVIDENCE.md): our key signs receipts for what we deliver; the
        # peer's certificate (from the TLS session) verifies the receipts it returns.
        self.peer_cert_der = peer_cert
        self.signer: ekeys.Signer | None = None
        self.verifier: R.Verifier | None = None
        self.log = link.log.bind(remote=remote)
        self.lock = trio.StrictFIFOLock()
        self.sender_wake = Wakeup()
        self.timer_wake = Wakeup()
        self.writer_wake = Wakeup()
        self.inbound_drained = Wakeup()
        # One inbound queue and worker per channel (made in run()): a channel whose disk
        # work is slow (a big file's checkpoint fsyncs, a slow consumer disk) never holds
        # back another channel's deliveries (CONTRACT §4.4).
        self.inbound_qs: dict[str, tuple[Any, Any]] = {}
        self.ack_q_send, self.ack_q = trio.open_memory_channel[S.AckReceived](math.inf)
        self.nacks: list[S.NackReceived] = []
        self.out: dict[str, _OutChannel] = {}
        self.scheduler = Scheduler()
        self.opened = trio.Event()
        self.reason: str | None = None
        self.error = True
        # Kept by the peer, not the session: the retry limit must hold across reconnects.
        self.attempts: dict[tuple[str, int], int] = link.send_attempts
        self.session: S.Session | None = None
        self.nursery: trio.Nursery | None = None
        self.scope = trio.CancelScope()
        self.was_open = False
        self.opened_at: float | None = None     # trio time of the peer's hello
        self.ended_at: float | None = None
        # One handshake_timeout from the TCP connection covers TLS *and* the hello
        # (the supervisor sets it); None: a full handshake_timeout from run().
        self.handshake_deadline: float | None = None
        self.preread = b""          # the peer's bytes read (and its hello checked) before run()

    @property
    def open_seconds(self) -> float:
        """How long the session was (or has been) open; 0 if it never opened."""
        if self.opened_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else trio.current_time()
        return end - self.opened_at

    # -- plumbing -------------------------------------------------------------

    async def flush(self) -> None:
        assert self.session is not None
        async with self.lock:
            data = self.session.data_to_send(trio.current_time())
            if data:
                await self.stream.send_all(data)

    def end(self, reason: str, error: bool) -> None:
        if self.reason is None:
            self.reason, self.error = reason, error
        # The scope wraps all of run(), so an end() that comes before the session's
        # nursery exists (a close() during start-up recovery) still stops it.
        self.scope.cancel()

    def held_reason(self, channel: str) -> str | None:
        state = self.out.get(channel)
        return state.held if state is not None else None

    def progress(self, channel: str, seq: int) -> tuple[int, bool]:
        """(bytes of `seq` sent so far, whether it is on the wire now)."""
        state = self.out.get(channel)
        if state is None:
            return 0, False
        if state.current is not None and state.current.seq == seq:
            return state.offset, True
        if seq in state.in_flight:
            return state.in_flight[seq].item.size, True
        return 0, False

    def hello_channels(self) -> list[F.ChannelHello]:
        result = []
        for name, ch in self.link.channels.items():
            inbound = self.link.inbound[name]
            result.append(F.ChannelHello(name=name, max=ch.max_message_bytes,
                                         priority=ch.priority, committed=inbound.committed,
                                         resume=inbound.resume_point(), credit=INITIAL_CREDIT))
        return result

    # -- the run --------------------------------------------------------------

    async def run(self) -> tuple[str, bool]:
        """Run the session until it ends; return (reason, error). The caller holds the slot."""
        link = self.link
        lcfg = link.cfg.link
        try:
            with self.scope:
                await self._recover()
                await trio.to_thread.run_sync(self._load_signer)
                audit = audit_mod.current()
                channels = self.hello_channels()
                self.inbound_qs = {c.name: trio.open_memory_channel[Any](math.inf)
                                   for c in channels}
                now = trio.current_time()
                handshake = lcfg.handshake_timeout if self.handshake_deadline is None \
                    else max(0.0, self.handshake_deadline - now)
                self.session = S.Session(
                    node=link.cfg.node.name, peer=link.name, channels=channels,
                    now=now, heartbeat_interval=lcfg.heartbeat_interval,
                    heartbeat_timeout=lcfg.heartbeat_timeout,
                    handshake_timeout=handshake,
                    checkpoint=audit.latest_checkpoint if audit is not None else None)
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    if self.preread:
                        self._dispatch(self.session.receive_data(self.preread, now))
                        self.preread = b""
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._timer)
                    nursery.start_soon(self._writer)
                    await self.flush()
                    await self.opened.wait()
                    self._on_open()
                    await trio.to_thread.run_sync(self._load_peer_cert)
                    assert self.session.peer_hello is not None
                    if self.session.peer_hello.checkpoint is not None:
                        self._witness(self.session.peer_hello.checkpoint)
                    await self._prepare_sending()
                    for _send, receive in self.inbound_qs.values():
                        nursery.start_soon(self._inbound_worker, receive)
                    nursery.start_soon(self._ack_worker)
                    nursery.start_soon(self._sender)
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as broken:
            lost = broken.exceptions[0]
            self.end(f"connection lost: {lost.__cause__ or lost or type(lost).__name__}", True)
        except* (OSError, SpoolError) as failed:
            # The spool failed (ENOSPC, EIO, EROFS...): nothing was acknowledged. The next
            # session's _recover() makes the spool usable again.
            fault = failed.exceptions[0]
            self.log.error("inbound_storage_failed", reason=str(fault))
            self.end(f"local storage failure: {fault}", True)
        except* Exception as group:  # one session's bug must not stop the daemon
            exc = group.exceptions[0]
            if self.session is not None and self.session.state is S.State.CLOSED \
                    and isinstance(exc, LocalProtocolError):
                self.end(self.reason or "session closed", self.error)
            else:
                self.log.error("session_crashed", reason=repr(exc), exc_info=group)
                self.end(f"internal error: {exc!r}", True)
        finally:
            self.nursery = None
            if self.opened_at is not None:
                self.ended_at = trio.current_time()
            with trio.CancelScope(shield=True):
                await self._cleanup()
        return self.reason or "session ended", self.error

    async def _recover(self) -> None:
        """Finish whatever a crash or an I/O error interrupted, before any hello: the
        inbound side always (cheap when there is nothing to do), the outbound side of a
        channel whose last spool call failed."""
        link = self.link
        problems: list[str] = []
        for name in list(link.channels):
            inbound = link.inbound.get(name)
            if inbound is not None:
                problems += await trio.to_thread.run_sync(inbound.recover)
            spool = link.spools.get(name)
            if spool is not None and not spool.outbound.usable:
                problems += await spool.recover_outbound()
        for p in problems:
            self.log.warning("recovery", problem=p)
        link.log_recovered()

    async def close(self, reason: str, error: bool = False) -> None:
        """A goodbye from our side (shutdown, reload, losing a tie-break; `error` for a
        revoked certificate). Its reason is the session's, even if the peer hangs up
        while the goodbye is being sent."""
        if self.reason is None:
            self.reason, self.error = reason, error
        if self.session is not None and self.session.state is not S.State.CLOSED:
            self.session.close(reason)
            with trio.move_on_after(2):
                try:
                    await self.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        self.end(reason, error)

    async def _cleanup(self) -> None:
        for ch in self.out.values():
            if ch.fh is not None:
                ch.fh.close()
                ch.fh = None
            ch.current = None
            self._show_in_flight(ch)
            self._set_held(ch.name, None)
        for name, inbound in list(self.link.inbound.items()):
            try:
                await trio.to_thread.run_sync(inbound.abort)
            except (OSError, SpoolError) as exc:
                self.log.error("inbound_abort_failed", channel=name, reason=str(exc))
        if self.session is not None and self.session.state is S.State.CLOSED:
            with trio.move_on_after(1):
                try:
                    await self.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        await trio.aclose_forcefully(self.stream)

    # -- reader and timer -----------------------------------------------------

    async def _reader(self) -> None:
        assert self.session is not None
        while True:
            # Back-pressure: data is bounded by credit, but zero-byte messages, acks and
            # pings are not; stop reading while the inbound worker is far behind.
            while self._inbound_backlog() > MAX_INBOUND_BACKLOG:
                await self.inbound_drained.wait()
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not self.opened.is_set():
                    # TLS 1.3: a refused client learns it here, on its first read.
                    self.end(f"refused during handshake: {exc.__cause__ or exc}", True)
                else:
                    self.end(f"connection lost: {exc.__cause__ or exc}", True)
                return
            events = self.session.receive_data(data, trio.current_time())
            self._dispatch(events)
            if self.session.pending_output > MAX_PENDING_OUTPUT + CHUNK_SIZE:
                await self.flush()      # bounded memory: wait for a peer that does not read
            else:
                self.writer_wake.set()  # never block reading on a send (see the top)

    async def _timer(self) -> None:
        """Sleep until the session's next deadline. Deadlines only move later while the
        session is open (sending delays the ping, receiving delays death), so a stale,
        earlier wake-up is harmless; the one move to an earlier deadline, handshake ->
        open, sets `timer_wake`."""
        assert self.session is not None
        while True:
            deadline = self.session.get_timer()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self.timer_wake.wait()
                continue
            self._dispatch(self.session.handle_timer(trio.current_time()))
            self.writer_wake.set()      # a blocked send must not stop the heartbeat deadline

    async def _writer(self) -> None:
        """Flush whatever the reader, timer and inbound worker queued."""
        while True:
            await self.writer_wake.wait()
            await self.flush()

    def _dispatch(self, events: list[S.Event]) -> None:
        for ev in events:
            if isinstance(ev, (S.MessageStart, S.MessageData, S.MessageComplete)):
                self.inbound_qs[ev.ch][0].send_nowait(ev)   # the session checked ev.ch
            elif isinstance(ev, S.AckReceived):
                self.ack_q_send.send_nowait(ev)
            elif isinstance(ev, S.CreditReceived):
                self.sender_wake.set()
            elif isinstance(ev, S.NackReceived):
                self.nacks.append(ev)
                self.sender_wake.set()
            elif isinstance(ev, S.RttMeasured):
                self.link.status.rtt_ms = round(ev.seconds * 1000, 3)
            elif isinstance(ev, S.PeerHello):
                self.opened.set()
                self.timer_wake.set()
            elif isinstance(ev, S.SessionClosed):
                self.end(ev.reason, ev.error)
            elif isinstance(ev, S.CheckpointReceived):
                self._witness(ev.line)

    # -- evidence ---------------------------------------------------------------

    def _load_signer(self) -> None:
        """Blocking: our signing key (the TLS key, re-read per session like TLS)."""
        cfg = self.link.cfg
        self.signer = ekeys.Signer.from_files(cfg.tls.cert, cfg.tls.key)
        ekeys.CertStore(cfg.node.state_dir / "certs").keep(self.signer.cert_der)

    def _load_peer_cert(self) -> None:
        """Blocking: the peer's certificate from the TLS session (kept in certs/, so
        its receipts stay verifiable after it renews), for checking its receipts."""
        der = self.peer_cert_der
        if der is None and hasattr(self.stream, "peer_certificate_der"):
            der = self.stream.peer_certificate_der()
        source = getattr(self.link, "peer_cert_source", None)
        if der is None and source is not None:
            der = source()      # tests over plain memory streams
        if der is None:
            return
        from cryptography import x509
        ekeys.CertStore(self.link.cfg.node.state_dir / "certs").keep(der)
        self.verifier = R.Verifier(x509.load_der_x509_certificate(der))

    def send_checkpoint(self, line: bytes) -> None:
        """Send our newest signed audit checkpoint for the peer to witness."""
        if self.session is not None and self.opened.is_set():
            self.session.send_checkpoint(line)
            self.writer_wake.set()

    def _witness(self, line: bytes) -> None:
        """Record the peer's signed checkpoint in our audit log (a witness)."""
        import json
        problem = None
        try:
            obj = json.loads(line)
        except ValueError:
            obj, problem = None, "not JSON"
        if problem is None and (not isinstance(obj, dict)
                                or obj.get("event") != "audit_checkpoint"
                                or obj.get("node") != self.link.name):
            problem = "not a checkpoint of this peer"
        if problem is None and self.verifier is None:
            problem = "no peer certificate to check it with"
        if problem is None:
            assert self.verifier is not None and isinstance(obj, dict)
            problem = audit_mod.checkpoint_problem(obj, self.verifier.cert)
        if problem is not None:
            self.log.warning("audit_witness_refused", peer=self.link.name, reason=problem)
            return
        self.log.info("audit_witness", peer=self.link.name, checkpoint=obj)

    def _sign(self, ch: str, entries: list[F.AckEntry]) -> list[F.AckEntry]:
        """Blocking: sign receipts for these ack entries (one signature per batch)."""
        if not entries or self.signer is None:
            return entries
        link = self.link
        receipts = [R.Receipt(frm=link.name, to=link.cfg.node.name, channel=ch, seq=e.seq,
                              sent_name=e.sent_name, delivered_name=e.name, size=e.size,
                              sha256=e.sha256.hex(), delivered_at_us=micros(e.delivered_at))
                    for e in entries]
        proofs = R.sign_batch(receipts, self.signer)
        return [dataclasses.replace(e, sig=p.signature, index=p.index, batch=p.size,
                                    path=p.path, signer=bytes.fromhex(p.signer))
                for e, p in zip(entries, proofs, strict=True)]

    def _receipt(self, ch: str, item: Claimed | None, entry: F.AckEntry,
                 ) -> tuple[R.Receipt, R.Proof, str | None]:
        """The receipt `entry` must carry (for our queued `item`, or as it says), and
        why it does not verify (None if it does)."""
        link = self.link
        if item is not None:
            receipt = R.Receipt(frm=link.cfg.node.name, to=link.name, channel=ch,
                                seq=item.seq, sent_name=item.name, delivered_name=entry.name,
                                size=item.size, sha256=item.sha256,
                                delivered_at_us=micros(entry.delivered_at))
        else:
            receipt = R.Receipt(frm=link.cfg.node.name, to=link.name, channel=ch,
                                seq=entry.seq, sent_name=entry.sent_name,
                                delivered_name=entry.name, size=entry.size,
                                sha256=entry.sha256.hex(),
                                delivered_at_us=micros(entry.delivered_at))
        proof = R.Proof(entry.index, entry.batch, entry.path, entry.sig, entry.signer.hex())
        if not entry.sig:
            return receipt, proof, "it carries no signed receipt"
        if self.verifier is None:
            return receipt, proof, "there is no peer certificate to check its receipt with"
        return receipt, proof, self.verifier.problem(receipt, proof)

    def _store_receipts(self, ch: str, docs: list[dict[str, Any]]) -> None:
        """Blocking: receipts durable in <state_dir>/receipts/ before the files go."""
        R.ReceiptStore(self.link.cfg.node.state_dir / "receipts").append(self.link.name, ch,
                                                                        docs)

    def _archive_receipts(self, ch: str, docs: list[dict[str, Any]]) -> None:
        """Blocking: with archive_sent, `.<name>.receipt` beside each archived file (a
        dot-file, so that sent/<ch>/ still lists only the files themselves)."""
        sent = self.link.layout.sent_dir(ch)
        for doc in docs:
            r = doc["receipt"]
            for name in (f".{r['sent_name']}.receipt", f".{r['sent_name']}.{r['seq']}.receipt"):
                try:
                    fd = os.open(sent / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                 | os.O_NOFOLLOW, 0o640)
                except FileExistsError:
                    continue
                try:
                    os.write(fd, R.dumps(doc))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                break
        if docs:
            dfd = os.open(sent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    # -- opening --------------------------------------------------------------

    def _on_open(self) -> None:
        assert self.session is not None and self.session.peer_hello is not None
        self.was_open = True
        self.opened_at = trio.current_time()
        link = self.link
        # `reconnects` counts the sessions established after the first one.
        if link.sessions_opened:
            link.status.reconnects += 1
        link.sessions_opened += 1
        # Retry counts of messages that left the queue by any path are dropped here, so
        # the per-message bookkeeping never outgrows the queue (CONTRACT §4.6).
        pending = {(name, i.seq) for name, out in link.outbound.items() for i in out.pending()}
        for key in [k for k in self.attempts if k not in pending]:
            del self.attempts[key]
        missing = []
        for name, cfg in link.channels.items():
            peer_ch = self.session.peer_channels.get(name)
            state = _OutChannel(name, cfg.priority)
            if peer_ch is None:
                state.held = (f"peer {link.name} does not offer channel {name!r} (yet): its "
                              f"files wait until it does")
                missing.append(name)
            else:
                state.peer_committed = peer_ch.committed
                pending_now = link.outbound[name].pending() if name in link.outbound else []
                state.probing = bool(pending_now) and pending_now[0].seq <= peer_ch.committed
                state.resume = peer_ch.resume
            pending = link.outbound[name].pending() if name in link.outbound else []
            state.next_seq = pending[0].seq if pending else 1
            self.out[name] = state
            self._set_held(name, state.held)
        tls = self.tls_info or {}
        link.status.set_state("connected", remote=self.remote, tls=self.tls_info)
        self.log.info("link_up", peer=link.name, remote=self.remote,
                      direction="out" if self.dialed_by_us else "in",
                      group=tls.get("group"), post_quantum=tls.get("post_quantum"))
        if missing:
            self.log.warning("channel_mismatch", peer=link.name, missing=missing,
                             reason=f"peer {link.name} does not offer {', '.join(missing)}: "
                                    f"files queued there are held until it does")

    def _set_held(self, name: str, reason: str | None) -> None:
        stats = self.link.status.channel(name)
        if hasattr(stats, "held"):
            stats.held = reason

    async def _prepare_sending(self) -> None:
        """Before the first send: raise each channel's numbering above the peer's
        committed seq, and log `duplicate_possible` where the peer went backwards."""
        link = self.link
        for name, state in self.out.items():
            spool = link.spools.get(name)
            if spool is None or state.held is not None:
                continue
            out = spool.outbound
            if state.peer_committed < out.acked:
                window = out.pending()[:MAX_IN_FLIGHT]
                for item in window:
                    self.log.warning(
                        "duplicate_possible", peer=link.name, channel=name, name=item.name,
                        seq=item.seq, size=item.size, sha256=item.sha256,
                        reason=f"the peer's committed seq went back from {out.acked} to "
                               f"{state.peer_committed} (its state was lost or restored): "
                               f"this file may have been delivered already")
            await spool.raise_floor(state.peer_committed)

    # -- inbound --------------------------------------------------------------

    def _inbound_backlog(self) -> int:
        return sum(r.statistics().current_buffer_used for _s, r in self.inbound_qs.values())

    async def _inbound_worker(self, queue: Any) -> None:
        """Applies one channel's inbound events to its spool, a batch per thread hop."""
        assert self.session is not None
        rx = _Receiver()
        busy_wait = BUSY_WAIT[0]
        while True:
            batch = [await queue.receive()]
            while len(batch) < 512:
                try:
                    batch.append(queue.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                result = await trio.to_thread.run_sync(self._apply_inbound, batch, rx)
            except (OSError, SpoolError) as exc:
                # Disk full, EIO, EMFILE... on this channel: nothing of the batch was
                # acknowledged. Nack the oldest unacknowledged message as "busy" (the
                # sender waits, then sends it again; not counted as an attempt) and
                # repair the spool; the session and the other channels go on.
                ch = batch[0].ch
                self.log.error("inbound_storage_failed", channel=ch, reason=str(exc))
                inbound = self.link.inbound.get(ch)
                if inbound is not None:
                    try:
                        await trio.to_thread.run_sync(inbound.recover)
                    except (OSError, SpoolError) as again:
                        self.end(f"local storage failure: {again}", True)
                        return
                credit = sum(len(ev.data) for ev in batch if isinstance(ev, S.MessageData))
                self.session.grant(ch, credit)
                seq = rx.oldest_unacked(ch)
                if seq is not None and ch not in rx.discarding:
                    self.session.send_nack(ch, seq, f"receiver cannot store it now: {exc}",
                                           True, F.NACK_BUSY, busy_wait)
                    rx.discard(ch)
                busy_wait = min(busy_wait * 2, BUSY_WAIT[1])
                self.inbound_drained.set()
                self.writer_wake.set()
                continue
            busy_wait = BUSY_WAIT[0]
            self.inbound_drained.set()
            acks, nacks, delivered, credit, quarantined = result
            for ch, seq, reason, retry, kind in nacks:
                if kind == F.NACK_BUSY:     # quarantine/ over its quota: ask again later
                    self.log.warning("quarantine_full", peer=self.link.name, channel=ch,
                                     seq=seq, reason=reason)
                self.session.send_nack(ch, seq, reason, retry, kind,
                                       QUARANTINE_WAIT if kind == F.NACK_BUSY else 0.0)
            for d in delivered:
                stats = self.link.status.channel(d.channel)
                stats.note_received(d.size)
                fields: dict[str, Any] = dict(peer=self.link.name, channel=d.channel, name=d.name,
                                              seq=d.seq, size=d.size, sha256=d.sha256)
                if d.sent_name != d.name:
                    fields["sent_name"] = d.sent_name
                self.log.info("message_delivered", **fields)
            for ch, name, seq, reason, where in quarantined:
                self.link.status.channel(ch).quarantined += 1
                self.log.warning("message_quarantined", peer=self.link.name, channel=ch,
                                 name=name, seq=seq, reason=reason, path=str(where))
            audit = audit_mod.current()
            if audit is not None and delivered:
                # A delivery's audit line is durable before its ack leaves (no receipt
                # the peer holds without our audit line for it, even after a crash).
                await trio.to_thread.run_sync(audit.sync)
            for ch, entries in acks.items():
                for i in range(0, len(entries), ACKS_PER_FRAME):
                    self.session.send_ack(ch, entries[i:i + ACKS_PER_FRAME])
            for ch, n in credit.items():
                self.session.grant(ch, n)
            self.writer_wake.set()

    def _apply_inbound(self, batch: list[Any], rx: _Receiver) -> tuple[Any, ...]:
        """Blocking: apply a batch of inbound events to the spool (one thread hop)."""
        link = self.link
        acks: dict[str, list[F.AckEntry]] = collections.defaultdict(list)
        nacks: list[tuple[str, int, str, bool, str]] = []
        credit: dict[str, int] = collections.defaultdict(int)
        quarantined: list[tuple[str, str, int, str, Any]] = []
        done: dict[str, list[Completed]] = collections.defaultdict(list)
        names: dict[tuple[str, int], str] = {}
        full: str | None = None          # quarantine quota problem (looked up once a batch)
        for ev in batch:
            ch = ev.ch
            inbound = link.inbound.get(ch)
            if isinstance(ev, S.MessageData):
                credit[ch] += len(ev.data)
            if inbound is None:
                continue
            if ch in rx.discarding:
                if isinstance(ev, S.MessageStart) and ev.rewind:
                    rx.discarding.discard(ch)
                else:
                    continue
            if isinstance(ev, S.MessageStart):
                rx.skipping.pop(ch, None)
                names[(ch, ev.seq)] = ev.name
                if ev.rewind:
                    inbound.abort()             # a message the sender abandoned mid-way
                if ev.seq <= inbound.committed:
                    # A re-send (its ack was lost) or a probe: say what we hold there.
                    rx.skipping[ch] = ev.seq
                    held = inbound.lookup(ev.seq)
                    if held is not None:
                        acks[ch].append(_ack_entry_from_journal(held))
                    else:
                        nacks.append((ch, ev.seq, f"seq {ev.seq} is at or below the committed "
                                      f"seq {inbound.committed} and no longer in the delivery "
                                      f"journal", True, F.NACK_STALE))
                        rx.discard(ch)
                    continue
                if done[ch] and ev.seq <= done[ch][-1].seq:
                    rx.skipping[ch] = ev.seq
                    continue
                if full is None:
                    full = self._quarantine_full()
                if full:
                    rx.skipping[ch] = ev.seq
                    nacks.append((ch, ev.seq, full, True, F.NACK_BUSY))
                    rx.discard(ch)
                    continue
                # Unacknowledged from here on, even if begin() fails for a storage
                # reason: the worker's error path nacks it as busy (without this a
                # begin() that fails on the resend, e.g. a refused symlinked folder,
                # left the sender waiting for an answer that never came).
                rx.started(ch, ev.seq)
                try:
                    inbound.begin(ev.seq, ev.name, ev.size, ev.sha256.hex(), ev.offset)
                except InboundRefused as exc:
                    # A resume we cannot honour is retried from byte 0; anything else
                    # (size over our limit...) is final.
                    rx.skipping[ch] = ev.seq
                    nacks.append((ch, ev.seq, str(exc), ev.offset > 0, F.NACK_RETRY))
                    rx.discard(ch)
            elif isinstance(ev, S.MessageData):
                if rx.skipping.get(ch) == ev.seq:
                    continue
                inbound.write(ev.data)
            elif isinstance(ev, S.MessageComplete):
                if rx.skipping.get(ch) == ev.seq:
                    continue
                try:
                    done[ch].append(inbound.finish())
                except ChecksumMismatch as exc:
                    nacks.append((ch, ev.seq, str(exc), True, F.NACK_RETRY))
                    rx.discard(ch)
                    quarantined.append((ch, names.get((ch, ev.seq), "?"), ev.seq, str(exc),
                                        getattr(exc, "quarantined", None)))
                except InboundRefused as exc:
                    nacks.append((ch, ev.seq, str(exc), False, F.NACK_RETRY))
                    rx.discard(ch)
        delivered: list[Delivered] = []
        for ch, completed in done.items():
            if completed:
                got = link.inbound[ch].commit(completed)
                delivered += got
                acks[ch].extend(_ack_entry(d) for d in got)
                rx.acked(ch, [d.seq for d in got])
        # One signature per channel and batch: re-sends answered from the journal and
        # new deliveries share one Merkle tree.
        signed = {ch: self._sign(ch, entries) for ch, entries in acks.items()}
        return signed, nacks, delivered, dict(credit), quarantined

    def _quarantine_full(self) -> str:
        """Blocking: why quarantine/ takes nothing more from this peer, or ""."""
        lcfg = self.link.cfg.link
        folder = self.link.layout.quarantine_dir()
        files, size = quarantine_usage(folder)
        if files < lcfg.quarantine_max_files and size < lcfg.quarantine_max_bytes:
            return ""
        return (f"quarantine quota full on {self.link.cfg.node.name} ({files} files, {size} "
                f"bytes; [link] quarantine_max_files {lcfg.quarantine_max_files}, "
                f"quarantine_max_bytes {lcfg.quarantine_max_bytes}): an operator must "
                f"clear {folder}")

    # -- acknowledgements -----------------------------------------------------

    async def _ack_worker(self) -> None:
        while True:
            batch = [await self.ack_q.receive()]
            while True:
                try:
                    batch.append(self.ack_q.receive_nowait())
                except trio.WouldBlock:
                    break
            by_channel: dict[str, list[F.AckEntry]] = collections.defaultdict(list)
            for ev in batch:
                by_channel[ev.ch].extend(ev.entries)
            # Channels resolve their acks side by side: one channel's spool work must not
            # hold back another's acks.
            async with trio.open_nursery() as nursery:
                for ch, entries in by_channel.items():
                    nursery.start_soon(self._resolve_acks, ch, entries)
            self.sender_wake.set()

    async def _resolve_acks(self, ch: str, entries: list[F.AckEntry]) -> None:
        link = self.link
        spool = link.spools.get(ch)
        state = self.out.get(ch)
        if spool is None or state is None:
            return
        matched: dict[int, F.AckEntry] = {}
        other: list[tuple[Claimed, F.AckEntry]] = []
        docs: dict[int, dict[str, Any]] = {}
        alg = ekeys.algorithm(self.verifier.cert.public_key()) if self.verifier else "?"
        for entry in entries:
            flight = state.in_flight.pop(entry.seq, None)
            if flight is None:
                continue        # failed or renumbered meanwhile (e.g. changed while sent)
            item = flight.item
            same = (entry.sha256.hex(), entry.size, entry.sent_name) == \
                (item.sha256, item.size, item.name)
            receipt, proof, problem = self._receipt(ch, item if same else None, entry)
            if problem is not None and (same or flight.probe):
                self.log.error("receipt_invalid", peer=link.name, channel=ch, seq=item.seq,
                               name=item.name, sha256=item.sha256, reason=problem)
                self._violation(f"the receipt for message {item.seq} on {ch!r} does not "
                                f"verify: {problem}")
                return
            if same:
                matched[item.seq] = entry
                docs[item.seq] = R.document(receipt, proof, alg)
            elif flight.probe:
                other.append((item, entry))
            else:
                self.log.error("ack_mismatch", peer=link.name, channel=ch, seq=item.seq,
                               name=item.name, sha256=item.sha256,
                               acked_sha256=entry.sha256.hex(), acked_name=entry.sent_name)
                self._violation(f"acknowledgement for message {item.seq} on {ch!r} names "
                                f"other content (sha256 {entry.sha256.hex()[:16]}…, "
                                f"{entry.size} bytes, {entry.sent_name!r}) than was sent")
                return
        for item, _entry in other:
            # Our numbering went wrong (state lost or restored): the peer holds other
            # content under this seq. Renumbered (with everything after it) once every
            # probe of the channel is answered: see _finish_probing.
            state.verdicts[item.seq] = "other"
        if matched:
            # The receipts are durable before any file leaves the queue.
            await trio.to_thread.run_sync(self._store_receipts, ch,
                                          [docs[s] for s in sorted(docs)])
            resolved = await spool.resolve(list(matched))
            if getattr(spool.outbound, "archive_sent", False) and resolved:
                try:
                    await trio.to_thread.run_sync(
                        self._archive_receipts, ch, [docs[r.item.seq] for r in resolved])
                except OSError as exc:
                    self.log.warning("receipt_archive_failed", peer=link.name, channel=ch,
                                     reason=str(exc))
            link.refresh_queued([ch])
            stats = link.status.channel(ch)
            for r in resolved:
                item, entry = r.item, matched[r.item.seq]
                self.attempts.pop((ch, item.seq), None)
                stats.note_sent(item.size)
                fields: dict[str, Any] = dict(peer=link.name, channel=ch, name=item.name,
                                              seq=item.seq, size=item.size, sha256=item.sha256)
                if entry.name != item.name:
                    fields["delivered_name"] = entry.name
                self.log.info("message_sent", **fields)
                if r.changed:
                    self.log.warning("message_changed", peer=link.name, channel=ch,
                                     name=item.name, seq=item.seq, sha256=item.sha256,
                                     reason="the queued file was changed after pick-up; the "
                                            "peer holds it as it was when it was queued")
        self.sender_wake.set()

    def _violation(self, reason: str) -> None:
        """The peer broke the protocol in a way only the driver can see."""
        assert self.session is not None
        self.session.close(f"protocol violation: {reason}")
        self.log.warning("protocol_violation", peer=self.link.name, reason=reason)
        self.writer_wake.set()
        self.end(f"protocol violation by the peer: {reason}", True)

    # -- sender ---------------------------------------------------------------

    def _next_item(self, state: _OutChannel) -> Claimed | None:
        if len(state.in_flight) >= MAX_IN_FLIGHT or state.held is not None:
            return None
        out = self.link.outbound.get(state.name)
        if out is None or self.link.is_paused(state.name):
            return None
        if state.wait_until and trio.current_time() < state.wait_until:
            return None
        try:
            item: Claimed | None = out.next_pending(state.next_seq)
            if state.probing and item is not None and item.seq > state.peer_committed:
                return None     # nothing but probes until every probe is answered
            return item
        except (RuntimeError, KeyError):
            # The pending set is changing in a worker thread right now; it wakes the
            # sender when it is done.
            return None

    def _ready(self) -> list[tuple[str, int]]:
        assert self.session is not None
        ready = []
        for name, state in self.out.items():
            if state.current is not None:
                if self.session.sendable(name) > 0:
                    ready.append((name, state.priority))
            elif self._next_item(state) is not None:
                ready.append((name, state.priority))
        return ready

    def _next_wait(self) -> float:
        """When a channel held back by `wait_until` may send again."""
        now = trio.current_time()
        waits = [s.wait_until for s in self.out.values() if s.wait_until > now]
        return min(waits) if waits else math.inf

    async def _sender(self) -> None:
        assert self.session is not None
        while self.session.state is S.State.OPEN:
            if self.nacks:
                await self._handle_nacks()
                continue
            for state in list(self.out.values()):
                if state.probing and self._probing_done(state):
                    await self._finish_probing(state)
            ready = self._ready()
            if not ready:
                with trio.move_on_at(self._next_wait()):
                    await self.sender_wake.wait()
                continue
            name = self.scheduler.pick(ready)
            assert name is not None
            await self._step(self.out[name])
            await self.flush()
            await trio.lowlevel.checkpoint()

    def _probing_done(self, state: _OutChannel) -> bool:
        """Every queued seq <= the peer's committed has been probed and answered."""
        if any(f.probe for f in state.in_flight.values()):
            return False
        out = self.link.outbound.get(state.name)
        nxt = out.next_pending(state.next_seq) if out is not None else None
        return nxt is None or nxt.seq > state.peer_committed

    async def _finish_probing(self, state: _OutChannel) -> None:
        """The probes are answered. Where the peer holds other content under one of
        our seqs (or cannot say), that file and every later one are renumbered above
        everything in use, in order (so pick-up order still holds: a file claimed
        later never overtakes it)."""
        state.probing = False
        verdicts, state.verdicts = state.verdicts, {}
        spool = self.link.spools.get(state.name)
        if not verdicts or spool is None:
            return
        first = min(verdicts)
        moved = await spool.renumber_tail(first, state.peer_committed)
        for old, new in moved:
            self.attempts.pop((state.name, old.seq), None)
            fields: dict[str, Any] = dict(peer=self.link.name, channel=state.name,
                                          name=old.name, seq=new.seq, old_seq=old.seq,
                                          size=old.size, sha256=old.sha256)
            verdict = verdicts.get(old.seq)
            if verdict == "unknown":
                self.log.warning("duplicate_possible", **fields,
                                 reason=f"the peer cannot say what it holds under seq "
                                        f"{old.seq}: sent again as seq {new.seq}")
            else:
                why = ("the peer holds other content under the old seq" if verdict
                       else "an earlier file of the channel was renumbered")
                self.log.info("message_renumbered", **fields, reason=why)
        if moved:
            state.next_seq = moved[0][1].seq
        self.sender_wake.set()

    async def _fail(self, item: Claimed, reason: str) -> None:
        self.attempts.pop((item.channel, item.seq), None)   # bookkeeping dies with the message
        spool = self.link.spools.get(item.channel)
        if spool is None:
            return
        failed = await spool.fail(item, reason)
        self.link.refresh_queued([item.channel])
        if failed is not None:
            self.link.log_failed([failed])

    def _nacked(self, ch: str) -> bool:
        """A nack for `ch` arrived and is not handled yet: whatever _step was about to
        send on `ch` is stale (the session dropped the message; sending the next one
        would carry the rewind flag past the nacked message)."""
        return any(n.ch == ch for n in self.nacks)

    async def _unreadable(self, state: _OutChannel, item: Claimed, exc: BaseException) -> None:
        """A queued file could not be opened or read. A resource error (EMFILE...)
        is retried without counting; a changed file is failed; anything else (EIO)
        is retried a few times, then failed, so one bad file never wedges the peer."""
        state.next_seq = item.seq
        if isinstance(exc, FileChanged):
            await self._fail(item, f"not sent: {exc}")
            return
        if isinstance(exc, ResourceBusy) or is_resource_error(exc):
            self.log.warning("send_delayed", peer=self.link.name, channel=state.name,
                             seq=item.seq, name=item.name, reason=str(exc))
            state.wait_until = trio.current_time() + READ_RETRY
            return
        key = (state.name, item.seq)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if self.attempts[key] >= MAX_ATTEMPTS:
            self.attempts.pop(key, None)
            await self._fail(item, f"cannot read the queued file: {why}")
            return
        self.log.warning("message_retry", peer=self.link.name, channel=state.name,
                         seq=item.seq, name=item.name, reason=f"cannot read it: {why}")
        state.wait_until = trio.current_time() + READ_RETRY

    def _show_in_flight(self, state: _OutChannel) -> None:
        """/status `in_flight`: the message being sent on the channel, if any."""
        stats = self.link.status.channel(state.name)
        if not hasattr(stats, "in_flight"):
            return
        item = state.current
        stats.in_flight = None if item is None else {
            "name": item.name, "seq": item.seq, "size": item.size, "sent_bytes": state.offset}

    def _abandon(self, state: _OutChannel) -> None:
        """Stop sending the current message mid-way (its file went bad); the next
        Msg on the channel carries the rewind flag, which tells the peer to drop
        what it has of it."""
        assert self.session is not None
        if state.fh is not None:
            state.fh.close()
        if state.current is not None:
            state.in_flight.pop(state.current.seq, None)
        state.current, state.fh, state.digest = None, None, None
        self._show_in_flight(state)
        self.session.abandon(state.name)

    async def _step(self, state: _OutChannel) -> None:
        assert self.session is not None
        session = self.session
        if state.current is None:
            item = self._next_item(state)
            if item is None:        # the pending set changed since _ready() looked
                return
            state.next_seq = item.seq + 1
            # Only this session's word counts: a limit from an earlier session of the
            # peer means nothing now (it may have been raised since).
            peer_ch = session.peer_channels.get(state.name)
            peer_max = peer_ch.max if peer_ch is not None else None
            if peer_max is not None and item.size > peer_max:
                await self._fail(item, f"{item.size} bytes is over {self.link.name}'s "
                                       f"max_message_bytes of {peer_max} on {state.name!r}")
                return
            if item.seq <= state.peer_committed:
                # A probe: the peer says what it holds under this seq (see the top).
                session.send_msg(state.name, item.seq, item.name, item.size,
                                 bytes.fromhex(item.sha256), item.size)
                state.in_flight[item.seq] = _InFlight(item, probe=True)
                return
            offset = 0
            if state.resume is not None and state.resume[0] == item.seq \
                    and state.resume[1] <= item.size:
                offset = state.resume[1]
            state.resume = None
            spool = self.link.spools[state.name]
            # A small file is read whole in the hop that opens it, and sent at once
            # below (one thread hop per file instead of two).
            small = item.size - offset <= CHUNK_SIZE
            try:
                fh = await spool.open(item, offset, prefetch=True) if small \
                    else await spool.open(item, offset)
            except (OSError, SpoolError) as exc:
                await self._unreadable(state, item, exc)
                return
            if self._nacked(state.name) or session.state is not S.State.OPEN:
                fh.close()
                state.next_seq = item.seq       # _handle_nacks decides where to resume
                return
            session.send_msg(state.name, item.seq, item.name, item.size,
                             bytes.fromhex(item.sha256), offset)
            state.in_flight[item.seq] = _InFlight(item, probe=False)
            if offset == item.size:
                fh.close()
                return
            state.current, state.fh, state.offset = item, fh, offset
            state.digest = hashlib.sha256() if offset == 0 else None
            self._show_in_flight(state)
            if not isinstance(fh, io.BytesIO) or session.sendable(state.name) == 0:
                return
        n = session.sendable(state.name)
        item = state.current
        fh = state.fh
        try:
            if isinstance(fh, io.BytesIO):
                data = fh.read(n)           # prefetched when opened: no thread hop
            else:
                data = await trio.to_thread.run_sync(fh.read, n)
        except (OSError, ValueError) as exc:
            if self._nacked(state.name) or state.fh is not fh:
                return
            self._abandon(state)
            await self._unreadable(state, item, exc if isinstance(exc, OSError)
                                   else OSError(errno.EIO, str(exc)))
            return
        if self._nacked(state.name) or session.state is not S.State.OPEN or state.fh is not fh:
            return                              # _handle_nacks closes the file
        if len(data) < n:
            # The file shrank under us: never send a truncated file.
            self._abandon(state)
            await self._fail(item, "not sent: the queued file changed size while being sent")
            return
        if state.digest is not None:
            state.digest.update(data)
        session.send_data(state.name, data)
        state.offset += len(data)
        shown = getattr(self.link.status.channel(state.name), "in_flight", None)
        if isinstance(shown, dict):
            shown["sent_bytes"] = state.offset
        if session.remaining(state.name) == 0:
            fh.close()
            state.current, state.fh = None, None
            self._show_in_flight(state)
            if state.digest is not None and state.digest.hexdigest() != item.sha256:
                # Changed while we read it: the peer will refuse the checksum; make sure
                # the file is failed, not retried.
                state.in_flight.pop(item.seq, None)
                await self._fail(item, "not sent: the queued file was changed while being "
                                       "sent")
            state.digest = None

    async def _handle_nacks(self) -> None:
        nacks, self.nacks = self.nacks, []
        for nack in nacks:
            state = self.out.get(nack.ch)
            spool = self.link.spools.get(nack.ch)
            if state is None or spool is None:
                continue
            if state.fh is not None:
                state.fh.close()
            state.current, state.fh, state.digest = None, None, None
            flight = state.in_flight.get(nack.seq)
            for seq in [s for s in state.in_flight if s >= nack.seq]:
                del state.in_flight[seq]
            item = flight.item if flight is not None else spool.outbound.get(nack.seq)
            state.next_seq = nack.seq
            if item is None or spool.outbound.get(item.seq) is None:
                continue            # failed or resolved meanwhile
            if nack.kind == F.NACK_BUSY:
                self.log.warning("message_retry", peer=self.link.name, channel=nack.ch,
                                 seq=nack.seq, name=item.name, reason=nack.reason,
                                 wait=nack.wait)
                state.wait_until = trio.current_time() + max(nack.wait, 0.1)
                continue
            if nack.kind == F.NACK_STALE:
                # The peer cannot say what it holds under this seq: renumbered with the
                # rest of the tail once the probing is over (duplicate_possible then).
                state.verdicts[item.seq] = "unknown"
                state.next_seq = nack.seq + 1       # probe the rest (they were discarded)
                continue
            if spool.outbound.changed(item):
                await self._fail(item, f"not sent: the queued file was changed after it was "
                                       f"queued (refused by {self.link.name}: {nack.reason})")
                continue
            key = (nack.ch, nack.seq)
            self.attempts[key] = self.attempts.get(key, 0) + 1
            if not nack.retry or self.attempts[key] >= MAX_ATTEMPTS:
                await self._fail(item, f"refused by {self.link.name}: {nack.reason}")
                self.attempts.pop(key, None)
                state.next_seq = nack.seq + 1
            else:
                self.log.warning("message_retry", peer=self.link.name, channel=nack.ch,
                                 seq=nack.seq, name=item.name, reason=nack.reason)


class _Receiver:
    """What one channel's inbound worker remembers between batches."""

    def __init__(self) -> None:
        self.discarding: set[str] = set()
        self.skipping: dict[str, int] = {}      # channel -> seq whose data we ignore
        self._unacked: dict[str, list[int]] = collections.defaultdict(list)

    def discard(self, ch: str) -> None:
        self.discarding.add(ch)
        self._unacked.pop(ch, None)

    def started(self, ch: str, seq: int) -> None:
        self._unacked[ch].append(seq)

    def acked(self, ch: str, seqs: list[int]) -> None:
        done = set(seqs)
        self._unacked[ch] = [s for s in self._unacked[ch] if s not in done]

    def oldest_unacked(self, ch: str) -> int | None:
        seqs = self._unacked.get(ch)
        return min(seqs) if seqs else None


def _ack_entry(d: Delivered) -> F.AckEntry:
    return F.AckEntry(seq=d.seq, sha256=bytes.fromhex(d.sha256), size=d.size,
                      sent_name=d.sent_name, name=d.name, delivered_at=d.delivered_at)


def _ack_entry_from_journal(held: dict[str, Any]) -> F.AckEntry:
    return F.AckEntry(seq=int(held["seq"]), sha256=bytes.fromhex(str(held["sha256"])),
                      size=int(held["size"]), sent_name=str(held["sent_name"]),
                      name=str(held["name"]), delivered_at=float(held["delivered_at"]))
