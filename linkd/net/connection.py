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
            (begin/write/finish, then one group commit), then acks, grants
            credit and logs. Channels never wait for each other's disk work.
* acks    - (after the hello) resolves acknowledged outbound files in batches.
* sender  - (after the hello) picks a channel with the Scheduler, sends the
            next Msg or Data chunk within the credit, flushes, repeats.

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
import math
from typing import Any

import trio

from ..errors import LocalProtocolError, SpoolError
from ..proto import frames as F
from ..proto import session as S
from ..proto.framing import CHUNK_SIZE
from ..proto.scheduler import Scheduler
from ..spool import ChecksumMismatch, Claimed, Completed, InboundRefused
from ..wakeup import Wakeup

INITIAL_CREDIT = 4 << 20
MAX_IN_FLIGHT = 1024          # unacknowledged messages per channel
MAX_ATTEMPTS = 3              # sends of one message that fail its checksum before it is failed
READ_SIZE = 64 * 1024
MAX_INBOUND_BACKLOG = 4096    # queued inbound events before the reader stops reading
MAX_PENDING_OUTPUT = 1 << 20  # queued control bytes (pongs, acks...) before the reader waits


@dataclasses.dataclass
class _OutChannel:
    name: str
    priority: int
    next_seq: int = 0                        # send items with seq >= this next
    in_flight: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    current: Claimed | None = None
    fh: Any = None
    offset: int = 0
    resume: tuple[int, int] | None = None


class SessionEnded(Exception):
    pass


class SessionRunner:
    def __init__(self, link: Any, stream: trio.abc.Stream, *, remote: str, dialed_by_us: bool,
                 tls_info: dict[str, Any] | None, now: float | None = None) -> None:
        self.link = link
        self.stream = stream
        self.remote = remote
        self.dialed_by_us = dialed_by_us
        self.tls_info = tls_info
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
        self.ack_q_send, self.ack_q = trio.open_memory_channel[tuple[str, int]](math.inf)
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
                channels = self.hello_channels()
                self.inbound_qs = {c.name: trio.open_memory_channel[Any](math.inf)
                                   for c in channels}
                self.session = S.Session(
                    node=link.cfg.node.name, peer=link.name, channels=channels,
                    now=trio.current_time(), heartbeat_interval=lcfg.heartbeat_interval,
                    heartbeat_timeout=lcfg.heartbeat_timeout,
                    handshake_timeout=lcfg.handshake_timeout)
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._timer)
                    nursery.start_soon(self._writer)
                    await self.flush()
                    await self.opened.wait()
                    self._on_open()
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
            out = link.outbound.get(name)
            if out is not None and not out.usable:
                async with link.spool_lock(name):
                    problems += await trio.to_thread.run_sync(out.recover)
        for p in problems:
            self.log.warning("recovery", problem=p)
        link.log_recovered()

    async def close(self, reason: str) -> None:
        """A clean goodbye (shutdown, reload, losing a tie-break)."""
        if self.session is not None and self.session.state is not S.State.CLOSED:
            self.session.close(reason)
            with trio.move_on_after(2):
                try:
                    await self.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        self.end(reason, False)

    async def _cleanup(self) -> None:
        for ch in self.out.values():
            if ch.fh is not None:
                ch.fh.close()
                ch.fh = None
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
                self.ack_q_send.send_nowait((ev.ch, ev.seq))
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
        for ch in self.session.peer_hello.channels:
            link.peer_max[ch.name] = ch.max
        for name, cfg in link.channels.items():
            peer_ch = self.session.peer_channels.get(name)
            state = _OutChannel(name, cfg.priority)
            if peer_ch is not None:
                state.next_seq = peer_ch.committed + 1
                state.resume = peer_ch.resume
                if peer_ch.committed:
                    self.ack_q_send.send_nowait((name, peer_ch.committed))
            self.out[name] = state
        link.status.set_state("connected", remote=self.remote, tls=self.tls_info)
        self.log.info("link_up", peer=link.name, remote=self.remote,
                      direction="out" if self.dialed_by_us else "in")

    # -- inbound --------------------------------------------------------------

    def _inbound_backlog(self) -> int:
        return sum(r.statistics().current_buffer_used for _s, r in self.inbound_qs.values())

    async def _inbound_worker(self, queue: Any) -> None:
        """Applies one channel's inbound events to its spool, a batch per thread hop."""
        assert self.session is not None
        discarding: set[str] = set()
        skipping: dict[str, int] = {}     # channel -> seq whose data we ignore (duplicate/refused)
        while True:
            batch = [await queue.receive()]
            while len(batch) < 512:
                try:
                    batch.append(queue.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                result = await trio.to_thread.run_sync(self._apply_inbound, batch, discarding,
                                                       skipping)
            except (OSError, SpoolError) as exc:
                # The inbound spool failed (ENOSPC, EIO, EROFS...; the spool reports it as
                # SpoolError): nothing of this batch was acknowledged; the next session
                # starts with recover() and the sender sends it again.
                self.log.error("inbound_storage_failed", reason=str(exc))
                self.end(f"local storage failure: {exc}", True)
                return
            self.inbound_drained.set()
            acks, nacks, delivered, credit, quarantined = result
            for ch, seq, reason, retry in nacks:
                self.session.send_nack(ch, seq, reason, retry)
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
            for ch, seq in acks.items():
                self.session.send_ack(ch, seq)
            for ch, n in credit.items():
                self.session.grant(ch, n)
            self.writer_wake.set()

    def _apply_inbound(self, batch: list[Any], discarding: set[str],
                       skipping: dict[str, int]) -> tuple[Any, ...]:
        """Blocking: apply a batch of inbound events to the spool (one thread hop)."""
        link = self.link
        acks: dict[str, int] = {}
        nacks: list[tuple[str, int, str, bool]] = []
        credit: dict[str, int] = collections.defaultdict(int)
        quarantined: list[tuple[str, str, int, str, Any]] = []
        done: dict[str, list[Completed]] = collections.defaultdict(list)
        names: dict[tuple[str, int], str] = {}
        for ev in batch:
            ch = ev.ch
            inbound = link.inbound.get(ch)
            if isinstance(ev, S.MessageData):
                credit[ch] += len(ev.data)
            if inbound is None:
                continue
            if ch in discarding:
                if isinstance(ev, S.MessageStart) and ev.rewind:
                    discarding.discard(ch)
                else:
                    continue
            if isinstance(ev, S.MessageStart):
                skipping.pop(ch, None)
                names[(ch, ev.seq)] = ev.name
                if ev.seq <= inbound.committed:
                    skipping[ch] = ev.seq
                    acks[ch] = inbound.committed
                    continue
                if done[ch] and ev.seq <= done[ch][-1].seq:
                    skipping[ch] = ev.seq
                    continue
                try:
                    inbound.begin(ev.seq, ev.name, ev.size, ev.sha256.hex(), ev.offset)
                except InboundRefused as exc:
                    # A resume we cannot honour is retried from byte 0; anything else
                    # (size over our limit...) is final.
                    skipping[ch] = ev.seq
                    nacks.append((ch, ev.seq, str(exc), ev.offset > 0))
                    discarding.add(ch)
            elif isinstance(ev, S.MessageData):
                if skipping.get(ch) == ev.seq:
                    continue
                inbound.write(ev.data)
            elif isinstance(ev, S.MessageComplete):
                if skipping.get(ch) == ev.seq:
                    continue
                try:
                    done[ch].append(inbound.finish())
                except ChecksumMismatch as exc:
                    nacks.append((ch, ev.seq, str(exc), True))
                    discarding.add(ch)
                    quarantined.append((ch, names.get((ch, ev.seq), "?"), ev.seq, str(exc),
                                        getattr(exc, "quarantined", None)))
                except InboundRefused as exc:
                    nacks.append((ch, ev.seq, str(exc), False))
                    discarding.add(ch)
        delivered = []
        for ch, completed in done.items():
            if completed:
                delivered += link.inbound[ch].commit(completed)
                acks[ch] = link.inbound[ch].committed
        return acks, nacks, delivered, dict(credit), quarantined

    # -- acknowledgements -----------------------------------------------------

    async def _ack_worker(self) -> None:
        while True:
            acks = dict([await self.ack_q.receive()])
            while True:
                try:
                    ch, seq = self.ack_q.receive_nowait()
                except trio.WouldBlock:
                    break
                acks[ch] = max(seq, acks.get(ch, 0))
            # Channels resolve their acks side by side: one channel's spool lock (held
            # while it hashes a big file at pick-up) must not hold back another's acks.
            async with trio.open_nursery() as nursery:
                for ch, seq in acks.items():
                    nursery.start_soon(self._resolve_acks, ch, seq)
            self.sender_wake.set()

    async def _resolve_acks(self, ch: str, seq: int) -> None:
        link = self.link
        out = link.outbound.get(ch)
        if out is None:
            return
        async with link.spool_lock(ch):
            resolved = await trio.to_thread.run_sync(out.ack, seq)
            link.refresh_queued([ch])
        state = self.out.get(ch)
        if state is not None:
            while state.in_flight and state.in_flight[0] <= seq:
                state.in_flight.popleft()
            if state.current is None:
                state.next_seq = max(state.next_seq, seq + 1)
        stats = link.status.channel(ch)
        for item in resolved:
            self.attempts.pop((ch, item.seq), None)
            stats.note_sent(item.size)
            self.log.info("message_sent", peer=link.name, channel=ch, name=item.name,
                          seq=item.seq, size=item.size, sha256=item.sha256)

    # -- sender ---------------------------------------------------------------

    def _next_item(self, state: _OutChannel) -> Claimed | None:
        if len(state.in_flight) >= MAX_IN_FLIGHT:
            return None
        out = self.link.outbound.get(state.name)
        if out is None:
            return None
        try:
            item: Claimed | None = out.next_pending(state.next_seq)
            return item
        except (RuntimeError, KeyError):
            # A pick-up or ack in a worker thread is changing the pending set right now;
            # it wakes the sender when it is done.
            return None

    def _ready(self) -> list[tuple[str, int]]:
        assert self.session is not None
        ready = []
        for name, state in self.out.items():
            if name not in self.session.peer_channels and state.current is None:
                if self._next_item(state) is not None:
                    ready.append((name, state.priority))
                continue
            if state.current is not None:
                if self.session.sendable(name) > 0:
                    ready.append((name, state.priority))
            elif self._next_item(state) is not None:
                ready.append((name, state.priority))
        return ready

    async def _sender(self) -> None:
        assert self.session is not None
        while self.session.state is S.State.OPEN:
            if self.nacks:
                await self._handle_nacks()
                continue
            ready = self._ready()
            if not ready:
                await self.sender_wake.wait()
                continue
            name = self.scheduler.pick(ready)
            assert name is not None
            await self._step(self.out[name])
            await self.flush()
            await trio.lowlevel.checkpoint()

    async def _fail(self, item: Claimed, reason: str) -> None:
        out = self.link.outbound.get(item.channel)
        if out is None:
            return
        async with self.link.spool_lock(item.channel):
            failed = await trio.to_thread.run_sync(out.fail, item, reason)
            self.link.refresh_queued([item.channel])
        self.link.log_failed([failed])

    def _nacked(self, ch: str) -> bool:
        """A nack for `ch` arrived and is not handled yet: whatever _step was about to
        send on `ch` is stale (the session dropped the message; sending the next one
        would carry the rewind flag past the nacked message)."""
        return any(n.ch == ch for n in self.nacks)

    async def _step(self, state: _OutChannel) -> None:
        assert self.session is not None
        session = self.session
        if state.current is None:
            item = self._next_item(state)
            if item is None:        # the pending set changed since _ready() looked
                return
            state.next_seq = item.seq + 1
            peer_ch = session.peer_channels.get(state.name)
            if peer_ch is None:
                await self._fail(item, f"peer {self.link.name} does not accept channel "
                                       f"{state.name!r}")
                return
            if item.size > peer_ch.max:
                await self._fail(item, f"{item.size} bytes is over {self.link.name}'s "
                                       f"max_message_bytes of {peer_ch.max} on {state.name!r}")
                return
            offset = 0
            if state.resume is not None and state.resume[0] == item.seq \
                    and state.resume[1] <= item.size:
                offset = state.resume[1]
            state.resume = None
            out = self.link.outbound[state.name]
            try:
                fh = await trio.to_thread.run_sync(out.open, item)
                if offset:
                    await trio.to_thread.run_sync(fh.seek, offset)
            except OSError as exc:
                await self._fail(item, f"cannot read the file: {exc.strerror or exc}")
                return
            if self._nacked(state.name) or session.state is not S.State.OPEN:
                fh.close()
                state.next_seq = item.seq       # _handle_nacks decides where to resume
                return
            session.send_msg(state.name, item.seq, item.name, item.size,
                             bytes.fromhex(item.sha256), offset)
            state.in_flight.append(item.seq)
            if offset == item.size:
                fh.close()
                return
            state.current, state.fh, state.offset = item, fh, offset
            return
        n = session.sendable(state.name)
        data = await trio.to_thread.run_sync(state.fh.read, n)
        if self._nacked(state.name) or session.state is not S.State.OPEN:
            return                              # _handle_nacks closes the file
        if state.fh is None:
            return
        if not data:
            # The file shrank under us: send zeros is wrong; end the session and fail it.
            item = state.current
            state.fh.close()
            state.current, state.fh = None, None
            await self._fail(item, "file changed size after it was queued")
            self.end(f"file {item.name} changed size while being sent", True)
            return
        session.send_data(state.name, data)
        state.offset += len(data)
        if session.remaining(state.name) == 0:
            state.fh.close()
            state.current, state.fh = None, None

    async def _handle_nacks(self) -> None:
        nacks, self.nacks = self.nacks, []
        for nack in nacks:
            state = self.out.get(nack.ch)
            out = self.link.outbound.get(nack.ch)
            if state is None or out is None:
                continue
            if state.fh is not None:
                state.fh.close()
            state.current, state.fh = None, None
            while state.in_flight and state.in_flight[-1] >= nack.seq:
                state.in_flight.pop()
            async with self.link.spool_lock(nack.ch):
                item = next((i for i in out.pending() if i.seq == nack.seq), None)
            key = (nack.ch, nack.seq)
            self.attempts[key] = self.attempts.get(key, 0) + 1
            if item is not None and (not nack.retry or self.attempts[key] >= MAX_ATTEMPTS):
                await self._fail(item, f"refused by {self.link.name}: {nack.reason}")
                self.attempts.pop(key, None)
                state.next_seq = nack.seq + 1
            else:
                self.log.warning("message_retry", channel=nack.ch, seq=nack.seq,
                                 reason=nack.reason)
                state.next_seq = nack.seq
