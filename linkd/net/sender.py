"""The sending half of a session (see connection.py for the whole picture).

`_sender` picks a channel with the Scheduler and sends its next Msg or Data chunk
within the credit; `_ack_worker` checks each acknowledgement (and its signed
receipt) against the file it names before resolving it (an ack is evidence, not a
number); `_handle_nacks` retries, waits ("busy") or marks a probe for
renumbering ("stale"); the probe phase and the tail renumbering keep pick-up
order after our numbering went wrong. `SenderMixin` holds these methods of
SessionRunner; `_OutChannel` is its per-channel state.

Size: over 400 lines on purpose: sending a chunk, acks, nacks and probing all
change one per-channel state (`_OutChannel`) and its in-flight set, so they
are read together.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import io
import math
import os
from typing import TYPE_CHECKING, BinaryIO, cast

import trio
from structlog.typing import FilteringBoundLogger

from .. import log as logmod
from ..errors import SpoolError
from ..evidence import keys as ekeys
from ..evidence import receipts as R
from ..evidence.canonical import micros
from ..proto import frames as F
from ..proto import session as S
from ..proto.framing import CHUNK_SIZE
from ..proto.scheduler import PriorityHold, Scheduler
from ..spool import (
    Claimed,
    FileChanged,
    ResourceBusy,
)
from ..spool.outbound import is_resource_error
from ..wakeup import Wakeup

if TYPE_CHECKING:
    from .peer import PeerLink

MAX_IN_FLIGHT = 1024          # unacknowledged messages per channel
MAX_ATTEMPTS = 3              # sends of one message that fail its checksum before it is failed
READ_RETRY = 2.0              # seconds before a queued file that could not be read is retried
COALESCE_STEPS = 32           # sends queued before one flush (one TLS write) ...
COALESCE_BYTES = 64 << 10     # ... or this many bytes of output, whichever comes first
PREFETCH_FILES = 64           # small queued files read in one thread hop ...
PREFETCH_BYTES = CHUNK_SIZE   # ... and at most this many bytes of them (per channel)
READ_AHEAD = 1 << 20          # bytes of a big file read per thread hop (4 chunks)
ACK_OVERDUE = 60.0            # seconds a message sent whole may await its ack unremarked
ACK_WATCH_INTERVAL = 10.0     # how often an overdue channel is looked at again


@dataclasses.dataclass
class _InFlight:
    item: Claimed
    probe: bool                              # sent as a probe (seq <= the peer's committed)
    offset: int = 0                          # where its data started (> 0: a resume)
    sent_at: float | None = None             # trio time its last frame was written
    acked: bool = False                      # the peer's ack for it came (not yet applied)


@dataclasses.dataclass
class _OutChannel:
    name: str
    priority: int
    next_seq: int = 1                        # send items with seq >= this next
    in_flight: dict[int, _InFlight] = dataclasses.field(default_factory=dict)
    current: Claimed | None = None
    fh: BinaryIO | None = None
    offset: int = 0
    resume: tuple[int, int] | None = None
    peer_committed: int = 0                  # from the peer's hello
    probing: bool = False                    # queued seqs <= peer_committed await answers
    verdicts: dict[int, str] = dataclasses.field(default_factory=dict)  # seq -> other|unknown
    held: str | None = None                  # why its files wait (peer lacks the channel)
    busy: str | None = None                  # why they wait: the peer could not store them
    ahead: tuple[BinaryIO, memoryview] | None = None  # (fh, what was read and not sent yet)
    ahead_buffer: bytearray | None = None    # what it is read into (one per big file)
    wait_until: float = 0.0                  # trio time before which nothing is sent
    # small files read ahead in one thread hop: seq -> (the item read, bytes or why not)
    prefetched: dict[int, tuple[Claimed, bytes | Exception]] = dataclasses.field(
        default_factory=dict)
    # a big file's late SHA-256 (spool/outbound.py): seqs being hashed, and results
    # not used yet (the item with its SHA-256, or why it could not be taken)
    hashing: set[int] = dataclasses.field(default_factory=set)
    hashed: dict[int, Claimed | Exception] = dataclasses.field(default_factory=dict)


class RunnerState:
    """What the sender and receiver halves use of SessionRunner (a typed seam: the
    attributes are set by SessionRunner.__init__, the methods are its own)."""

    link: PeerLink
    log: FilteringBoundLogger
    session: S.Session | None
    out: dict[str, _OutChannel]
    nacks: list[S.NackReceived]
    attempts: dict[tuple[str, int], int]
    sender_wake: Wakeup
    ack_watch_wake: Wakeup          # a message awaits an ack: the watch may sleep no more
    ack_watch_idle: bool            # the watch waits for that (it has no deadline)
    writer_wake: Wakeup
    inbound_drained: Wakeup
    inbound_qs: dict[str, tuple[trio.MemorySendChannel[S.MessageEvent],
                                trio.MemoryReceiveChannel[S.MessageEvent]]]
    ack_q: trio.MemoryReceiveChannel[S.AckReceived]
    scheduler: Scheduler
    hold: PriorityHold
    signer: ekeys.Signer | None
    verifier: R.Verifier | None
    peer_cert_der: bytes | None
    nursery: trio.Nursery | None

    def end(self, reason: str, error: bool) -> None:  # pragma: no cover - SessionRunner's
        raise NotImplementedError

    async def flush(self) -> None:  # pragma: no cover - SessionRunner's
        raise NotImplementedError

    def _violation(self, reason: str) -> None:  # pragma: no cover - SessionRunner's
        raise NotImplementedError

    def _set_held(self, name: str, reason: str | None) -> None:  # pragma: no cover
        raise NotImplementedError


class SenderMixin(RunnerState):
    def _receipt(self, ch: str, item: Claimed | None, entry: F.AckEntry,
                 ) -> tuple[R.Receipt, R.Proof, str | None, bytes | None]:
        """The receipt `entry` must carry (for our queued `item`, or as it says), why
        it does not verify (None if it does), and the root of its batch (if known)."""
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
            return receipt, proof, "it carries no signed receipt", None
        if self.verifier is None:
            return receipt, proof, "there is no peer certificate to check its receipt " \
                "with", None
        problem, root = self.verifier.check(receipt, proof)
        return receipt, proof, problem, root

    def _store_receipts(self, ch: str, docs: list[R.ReceiptDoc]) -> None:
        """Blocking: receipts durable in <state_dir>/receipts/ before the files go."""
        R.ReceiptStore(self.link.cfg.node.state_dir / "receipts").append(self.link.name, ch,
                                                                        docs)

    def _archive_receipts(self, ch: str, docs: list[R.ReceiptDoc]) -> None:
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
        docs: dict[int, R.ReceiptDoc] = {}
        alg = ekeys.algorithm(self.verifier.cert.public_key()) if self.verifier else "?"
        for entry in entries:
            flight = state.in_flight.pop(entry.seq, None)
            if flight is None:
                continue        # failed or renumbered meanwhile (e.g. changed while sent)
            item = flight.item
            same = (entry.sha256.hex(), entry.size, entry.sent_name) == \
                (item.sha256, item.size, item.name)
            receipt, proof, problem, root = self._receipt(ch, item if same else None, entry)
            if problem is not None and (same or flight.probe):
                self.log.error("receipt_invalid", peer=link.name, channel=ch, seq=item.seq,
                               name=item.name, sha256=item.sha256, reason=problem)
                self._violation(f"the receipt for message {item.seq} on {ch!r} does not "
                                f"verify: {problem}")
                return
            if same:
                matched[item.seq] = entry
                docs[item.seq] = R.document(receipt, proof, alg, root)
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
            self._not_busy(ch)              # the peer stores again
            # The receipts are durable before any file leaves the queue: stored first,
            # in the same thread hop that resolves the batch.
            ordered = [docs[s] for s in sorted(docs)]
            resolved = await spool.resolve(
                list(matched), before=lambda: self._store_receipts(ch, ordered))
            if getattr(spool.outbound, "archive_sent", False) and resolved:
                try:
                    await trio.to_thread.run_sync(
                        self._archive_receipts, ch, [docs[r.item.seq] for r in resolved])
                except OSError as exc:
                    self.log.warning("receipt_archive_failed", peer=link.name, channel=ch,
                                     reason=str(exc))
            link.refresh_queued([ch])
            if link.ack_overdue:
                self._ack_resumed(ch, matched)
            stats = link.status.channel(ch)
            sent: list[dict[str, object]] = []     # message_sent lines, logged a run at once
            for r in resolved:
                item, entry = r.item, matched[r.item.seq]
                self.attempts.pop((ch, item.seq), None)
                stats.note_sent(item.size)
                fields: dict[str, object] = dict(peer=link.name, channel=ch, name=item.name,
                                                 seq=item.seq, size=item.size, sha256=item.sha256)
                if entry.name != item.name:
                    fields["delivered_name"] = entry.name
                sent.append(fields)
                if r.changed:       # its message_changed line follows its message_sent
                    logmod.info_many(self.log, "message_sent", sent)
                    sent = []
                    self.log.warning("message_changed", peer=link.name, channel=ch,
                                     name=item.name, seq=item.seq, sha256=item.sha256,
                                     reason="the queued file was changed after pick-up; the "
                                            "peer holds it as it was when it was queued")
            logmod.info_many(self.log, "message_sent", sent)
        self.sender_wake.set()

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

    def _ready(self) -> tuple[list[tuple[str, int]], set[str]]:
        """The channels with something to send now, with their priorities, and those
        of them held back while a higher priority has a message in flight."""
        assert self.session is not None
        ready = []
        for name, state in self.out.items():
            if state.current is not None:
                if self.session.sendable(name) > 0 or self._sum_ready(state):
                    ready.append((name, state.priority))
            elif (item := self._next_item(state)) is not None and not (
                    item.seq in state.hashing and self._needs_hash(state, item)):
                ready.append((name, state.priority))
        # While a higher priority has a message in flight, lower ones wait (for at most
        # a share of the time, and 0.33 s at a time: PriorityHold), so that its
        # delivery gets the CPU and the disk of both hosts instead of the bulk bytes
        # sent right behind it.
        top = max((s.priority for s in self.out.values() if s.in_flight), default=None)
        if self.hold.share != self.link.cfg.link.priority_hold:     # (a reload changed it)
            self.hold.set_share(self.link.cfg.link.priority_hold)
        # (only while the hold alone keeps the link idle: while the higher priority
        # still sends its own bytes, it goes first anyway and no credit is spent)
        want = top is not None and bool(ready) and all(p < top for _, p in ready)
        before = self.hold.held_s
        held = {n for n, _ in ready} if self.hold.update(trio.current_time(), want) \
            else set()
        if self.hold.held_s != before:
            self.link.status.priority_held_s += self.hold.held_s - before
        return ready, held

    # -- a big file's late SHA-256 (spool/outbound.py) ----------------------------

    def _needs_hash(self, state: _OutChannel, item: Claimed) -> bool:
        """`item` has no SHA-256 yet, and its msg must carry one: a probe (the peer's
        answer is compared with it), or a peer that does not take it late."""
        assert self.session is not None
        return not item.sha256 and (item.seq <= state.peer_committed
                                    or not self.session.peer_late_hash)

    def _sum_ready(self, state: _OutChannel) -> bool:
        """The current message's data is out, and its late SHA-256 (or why there is
        none) is known: the next step sends its sum (or abandons it)."""
        assert self.session is not None
        item = state.current
        return item is not None and self.session.sum_due(state.name) \
            and (item.seq in state.hashed or bool(item.sha256))

    def _start_hash(self, state: _OutChannel, item: Claimed) -> None:
        if item.seq in state.hashing or item.seq in state.hashed or self.nursery is None:
            return
        state.hashing.add(item.seq)
        self.nursery.start_soon(self._hash_late, state, item)

    async def _hash_late(self, state: _OutChannel, item: Claimed) -> None:
        """Take and record `item`'s SHA-256 in a thread, beside its transfer."""
        result: Claimed | Exception
        try:
            while True:
                try:
                    result = await self.link.spools[state.name].hash_late(item)
                except (OSError, SpoolError) as exc:
                    if not (isinstance(exc, ResourceBusy) or is_resource_error(exc)):
                        result = exc
                        break
                    # Out of descriptors or memory: not the file's fault, and what
                    # went out of it so far stays good: hash again in a while.
                    self.log.warning("send_delayed", peer=self.link.name, channel=state.name,
                                     seq=item.seq, name=item.name,
                                     reason=f"cannot hash it now: {exc}")
                    await trio.sleep(READ_RETRY)
                else:
                    break
        finally:
            state.hashing.discard(item.seq)
        state.hashed[item.seq] = result
        if isinstance(result, Claimed):
            flight = state.in_flight.get(item.seq)
            if flight is not None and flight.item.path == result.path:
                flight.item = result        # what its ack is checked against
        self.sender_wake.set()

    async def _send_sum(self, state: _OutChannel) -> None:
        """The current message's data is out: send its late SHA-256, or, if it could
        not be taken (the file changed after its claim...), abandon the message."""
        assert self.session is not None and state.current is not None
        item = state.current
        got = state.hashed.pop(item.seq, None)
        if isinstance(got, Exception):
            self._abandon(state)
            await self._unreadable(state, item, got)
            return
        hashed = got if got is not None else item
        if not hashed.sha256:       # (not seen: the item went while it was hashed)
            self._abandon(state)
            await self._unreadable(state, item, FileChanged("its SHA-256 could not be "
                                                            "recorded"))
            return
        self.session.send_sum(state.name, item.seq, bytes.fromhex(hashed.sha256))
        flight = state.in_flight.get(item.seq)
        if flight is not None:
            flight.item = hashed
        state.current = None
        self._mark_sent(state, item.seq)
        self._show_in_flight(state)

    def _next_wait(self) -> float:
        """When a channel held back by `wait_until` may send again."""
        now = trio.current_time()
        waits = [s.wait_until for s in self.out.values() if s.wait_until > now]
        return min([*waits, self.hold.ends_at()])

    async def _sender(self) -> None:
        """Send what is ready, a step (a Msg, a Data chunk) at a time. A run of steps
        on one channel that need no thread hop (small files read ahead) is written
        out together: one flush per COALESCE_STEPS steps or COALESCE_BYTES of
        output, and always before waiting or turning to another channel (so a
        priority message is never held behind another channel's step); a step
        that hops to a thread wakes the writer first, so nothing queued waits for
        the disk."""
        assert self.session is not None
        unflushed = 0
        last: str | None = None
        while self.session.state is S.State.OPEN:
            if self.nacks or any(s.probing for s in self.out.values()):
                if unflushed:
                    await self.flush()
                    unflushed = 0
                if self.nacks:
                    await self._handle_nacks()
                    continue
                for state in list(self.out.values()):
                    if state.probing and self._probing_done(state):
                        await self._finish_probing(state)
            ready, held = self._ready()
            name = self.scheduler.pick(ready, held)
            if name is None:
                if unflushed:
                    await self.flush()
                    unflushed = 0
                    continue            # look again: acks and credit came in meanwhile
                with trio.move_on_at(self._next_wait()):
                    await self.sender_wake.wait()
                continue
            if unflushed and name != last:
                await self.flush()
                unflushed = 0
            last = name
            await self._step(self.out[name])
            unflushed += 1
            if unflushed >= COALESCE_STEPS or self.session.pending_output >= COALESCE_BYTES:
                await self.flush()
                unflushed = 0
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
        state.prefetched.clear()
        verdicts, state.verdicts = state.verdicts, {}
        spool = self.link.spools.get(state.name)
        if not verdicts or spool is None:
            return
        first = min(verdicts)
        moved = await spool.renumber_tail(first, state.peer_committed)
        for old, new in moved:
            self.attempts.pop((state.name, old.seq), None)
            fields: dict[str, object] = dict(peer=self.link.name, channel=state.name,
                                             name=old.name, seq=new.seq, old_seq=old.seq,
                                             size=old.size, sha256=old.sha256 or None)
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
        self._not_busy(item.channel)
        spool = self.link.spools.get(item.channel)
        if spool is None:
            return
        self.writer_wake.set()              # what is queued goes out during the hop
        failed = await spool.fail(item, reason)
        self.link.refresh_queued([item.channel])
        if failed is not None:
            self.link.log_failed([failed])

    def _not_busy(self, ch: str) -> None:
        """The peer's "cannot store it" no longer describes the channel: its message
        is being sent again, was acknowledged, or failed."""
        state = self.out.get(ch)
        if state is not None and state.busy is not None:
            state.busy = None
            self._set_held(ch, state.held)

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

    def _mark_sent(self, state: _OutChannel, seq: int) -> None:
        """The message's last frame is out: from now on it awaits the peer's ack."""
        flight = state.in_flight.get(seq)
        if flight is not None:
            flight.sent_at = trio.current_time()
            if self.ack_watch_idle:
                self.ack_watch_wake.set()

    @staticmethod
    def _unacked(state: _OutChannel) -> list[tuple[float, Claimed]]:
        """(when it was sent, trio time; the item) of each message of the channel sent
        whole whose ack has not come (a probe counts: it asks what the peer holds)."""
        return [(f.sent_at, f.item) for f in state.in_flight.values()
                if f.sent_at is not None and not f.acked]

    def awaiting(self, channel: str) -> tuple[int, int, float | None]:
        """/status `awaiting_ack`: (messages of `channel` sent whole and not yet
        acknowledged, their bytes, seconds since the oldest of them was sent)."""
        state = self.out.get(channel)
        sent = self._unacked(state) if state is not None else []
        if not sent:
            return 0, 0, None
        return (len(sent), sum(item.size for _, item in sent),
                max(0.0, trio.current_time() - min(at for at, _ in sent)))

    def _ack_resumed(self, ch: str, matched: dict[int, F.AckEntry]) -> None:
        """`ack_resumed` for each of `matched` that was logged `ack_overdue`. Acks come
        in order, so an overdue message before the last one acknowledged that is not
        among them was answered otherwise (failed, renumbered): it is forgotten."""
        last = max(matched)
        now = trio.current_time()
        for key in [k for k in self.link.ack_overdue if k[0] == ch and k[1] <= last]:
            at = self.link.ack_overdue.pop(key)
            if key[1] in matched:
                self.log.info("ack_resumed", peer=self.link.name, channel=ch, seq=key[1],
                              waited_s=round(now - at, 1))

    async def _ack_watch(self) -> None:
        """Warn (`ack_overdue`) when a channel's oldest message sent whole has awaited
        the peer's ack for ACK_OVERDUE seconds, once for each message found so: a
        peer acknowledges once the file is durable, so its storage hangs or it
        withholds its acks; the session itself stays up (heartbeats answer), and
        nothing else would say so. It sleeps until the oldest message's deadline,
        and without a deadline (nothing awaits an ack: an idle link, a hub's idle
        peers) until a message is sent."""
        warned: dict[str, int] = {}
        while True:
            now = trio.current_time()
            due = math.inf
            for name, state in self.out.items():
                sent = self._unacked(state)
                if not sent:
                    continue
                at, item = min(sent, key=lambda pair: pair[0])
                if now - at < ACK_OVERDUE:
                    due = min(due, at + ACK_OVERDUE)
                    continue
                due = min(due, now + ACK_WATCH_INTERVAL)    # until its ack comes
                if warned.get(name) == item.seq:
                    continue
                warned[name] = item.seq
                self.link.ack_overdue.setdefault((name, item.seq), at)
                self.log.warning("ack_overdue", peer=self.link.name, channel=name,
                                 seq=item.seq, name=item.name, waited_s=round(now - at, 1),
                                 awaiting=len(sent),
                                 reason=f"{self.link.name} has not acknowledged message "
                                        f"{item.seq} ({item.name!r}) in {int(now - at)}s: "
                                        f"its storage may hang; the file stays queued "
                                        f"(linkctl reconnect --force asks it again)")
            self.ack_watch_idle = due == math.inf
            with trio.move_on_at(due):
                await self.ack_watch_wake.wait()

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
        state.current, state.fh, state.ahead = None, None, None
        self._show_in_flight(state)
        self.session.abandon(state.name)

    async def _step(self, state: _OutChannel) -> None:
        assert self.session is not None
        session = self.session
        fh: BinaryIO | None
        if state.current is not None and session.sum_due(state.name):
            await self._send_sum(state)
            return
        if state.current is not None and state.fh is None:
            # Its data is out, and a nack that came in while we flushed took its sum
            # away: _handle_nacks decides what comes next (review of the late hash).
            return
        if state.current is None:
            item = self._next_item(state)
            if item is None:        # the pending set changed since _ready() looked
                return
            got = state.hashed.pop(item.seq, None)     # (stale once it has its hash)
            if not item.sha256:
                if isinstance(got, Exception):
                    await self._unreadable(state, item, got)
                    return
                if got is not None and got.path == item.path and got.sha256:
                    item = got
                elif self._needs_hash(state, item):
                    self._start_hash(state, item)
                    return          # its msg waits for it (_ready skips the channel)
            state.next_seq = item.seq + 1
            if item.seq <= state.peer_committed:
                # A probe: the peer says what it holds under this seq (see the top). No
                # size limit applies: no data goes out, and the peer may hold it already
                # (its limit may have been lowered since it took it).
                session.send_msg(state.name, item.seq, item.name, item.size,
                                 bytes.fromhex(item.sha256), item.size)
                state.in_flight[item.seq] = _InFlight(item, probe=True)
                self._mark_sent(state, item.seq)
                return
            # Only this session's word counts: a limit from an earlier session of the
            # peer means nothing now (it may have been raised since).
            peer_ch = session.peer_channels.get(state.name)
            peer_max = peer_ch.max if peer_ch is not None else None
            if peer_max is not None and item.size > peer_max:
                await self._fail(item, f"{item.size} bytes is over {self.link.name}'s "
                                       f"max_message_bytes of {peer_max} on {state.name!r}")
                return
            offset = 0
            if state.resume is not None and state.resume[0] == item.seq \
                    and state.resume[1] <= item.size:
                offset = state.resume[1]
            state.resume = None
            spool = self.link.spools[state.name]
            # A small file is read whole, with the small files queued after it, in one
            # thread hop per batch (its SHA-256 checked there), and sent at once below.
            # (a small file without a SHA-256 -- a migrated revision 1 claim -- is sent
            # as a big one is: hashed beside it)
            small = item.size - offset <= CHUNK_SIZE and bool(item.sha256)
            try:
                if small and offset == 0:
                    fh = io.BytesIO(await self._read_whole(state, item))
                else:
                    self.writer_wake.set()      # what is queued goes out during the hop
                    fh = await spool.open(item, offset, prefetch=small)
            except (OSError, SpoolError) as exc:
                await self._unreadable(state, item, exc)
                return
            if self._nacked(state.name) or session.state is not S.State.OPEN:
                fh.close()
                state.next_seq = item.seq       # _handle_nacks decides where to resume
                return
            # A big file claimed without its SHA-256 goes out at once, hashed beside
            # it; its sum follows the data (_send_sum).
            session.send_msg(state.name, item.seq, item.name, item.size,
                             bytes.fromhex(item.sha256) if item.sha256 else None, offset)
            state.in_flight[item.seq] = _InFlight(item, probe=False, offset=offset)
            if not item.sha256:
                self._start_hash(state, item)
            self._not_busy(state.name)          # sent again: held no longer
            if offset:
                self.log.info("transfer_resumed", peer=self.link.name, channel=state.name,
                              seq=item.seq, name=item.name, size=item.size, offset=offset)
            if offset == item.size:
                fh.close()
                if not item.sha256:
                    state.current = item        # no data left: its sum is next
                else:
                    self._mark_sent(state, item.seq)
                return
            state.current, state.fh, state.offset = item, fh, offset
            self._show_in_flight(state)
            if not isinstance(fh, io.BytesIO) or session.sendable(state.name) == 0:
                return
        n = session.sendable(state.name)
        item = state.current
        fh = state.fh
        assert item is not None and fh is not None     # a message in progress has its file
        if isinstance(state.hashed.get(item.seq), Exception):
            await self._send_sum(state)     # its hash failed: abandoned, not sent on
            return
        try:
            data = await self._read_chunk(state, fh, n)
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
        session.send_data(state.name, data)
        state.offset += len(data)
        shown = getattr(self.link.status.channel(state.name), "in_flight", None)
        if isinstance(shown, dict):
            shown["sent_bytes"] = state.offset
        if session.remaining(state.name) == 0:
            # Not hashed again here (it cost 0.9 CPU-s per GiB on the event loop): the
            # peer checks the SHA-256 of what it got against the one taken at pick-up
            # and refuses a mismatch, so a file written to while we read it is never
            # delivered; its nack finds the file changed (_handle_nacks) and fails it.
            # A change that left the bytes sent as they were (an append, a touch) is
            # delivered, and logged message_changed when the ack resolves it.
            fh.close()
            state.fh, state.ahead, state.ahead_buffer = None, None, None
            if not session.sum_due(state.name):
                state.current = None
                self._mark_sent(state, item.seq)
            self._show_in_flight(state)

    async def _read_whole(self, state: _OutChannel, item: Claimed) -> bytes:
        """The content of a small queued file (OSError, SpoolError). Read ahead: a miss
        reads it together with the small files queued after it (up to PREFETCH_FILES
        and PREFETCH_BYTES) in one thread hop; later steps take theirs from memory.
        An entry is only used for the very item it was read for (a renumbered or
        failed item is another object), and the read-ahead is dropped on a nack."""
        out = self.link.outbound.get(state.name)
        fresh = out.take_fresh(item) if out is not None else None
        if fresh is not None:
            return fresh        # as examined at pick-up: no thread hop, no second read
        got = state.prefetched.pop(item.seq, None)
        if got is None or got[0] is not item:
            self.writer_wake.set()          # what is queued goes out during the hop
            batch = self._prefetch_batch(state, item)
            results = await self.link.spools[state.name].read_whole(batch)
            state.prefetched = {i.seq: (i, r) for i, r in zip(batch, results, strict=False)}
            got = state.prefetched.pop(item.seq)
        result = got[1]
        if isinstance(result, Exception):
            raise result
        return result

    def _prefetch_batch(self, state: _OutChannel, item: Claimed) -> list[Claimed]:
        """`item` and the small files queued right after it, in seq order."""
        out = self.link.outbound[state.name]
        batch, size = [item], item.size
        resume_seq = state.resume[0] if state.resume is not None else None
        while len(batch) < PREFETCH_FILES:
            try:
                nxt = out.next_pending(batch[-1].seq + 1)
            except (RuntimeError, KeyError):
                break           # the pending set is changing in a worker thread
            if nxt is None or nxt.size > CHUNK_SIZE or size + nxt.size > PREFETCH_BYTES \
                    or nxt.seq == resume_seq or out.has_fresh(nxt.seq):
                break
            batch.append(nxt)
            size += nxt.size
        return batch

    async def _read_chunk(self, state: _OutChannel, fh: BinaryIO, n: int) -> bytes | memoryview:
        """The next `n` bytes of the file being sent. A big file is read READ_AHEAD
        bytes per thread hop and sent from that: a hop per 256 KiB chunk costs more
        CPU than the read it carries. It is read into one buffer per file, allocated
        here (a buffer allocated in each worker thread stays in that thread's malloc
        arena: 7 MiB more RSS measured). The caller is done with the bytes returned
        (hashed, copied into the session's output) before it asks for more. Fewer
        bytes than `n`: the file shrank."""
        if isinstance(fh, io.BytesIO):
            return fh.read(n)               # prefetched when opened: no thread hop
        ahead = state.ahead[1] if state.ahead is not None and state.ahead[0] is fh else None
        if ahead is None or len(ahead) < n:
            # Empty, or less left than asked for (the credit window cut an earlier
            # step short of a chunk): keep what is left and read on.
            left = bytes(ahead) if ahead is not None else b""   # (the buffer is reused)
            assert self.session is not None
            want = max(n, min(READ_AHEAD, self.session.remaining(state.name) or 0)) - len(left)
            if state.ahead_buffer is None or len(state.ahead_buffer) < want:
                state.ahead_buffer = bytearray(max(want, READ_AHEAD))
            view = memoryview(state.ahead_buffer)[:want]
            self.writer_wake.set()          # what is queued goes out during the hop
            reader = cast(io.BufferedIOBase, fh)   # os.fdopen(fd, "rb"): buffered
            ahead = view[:await trio.to_thread.run_sync(reader.readinto, view)]
            if left:
                joined = left + bytes(ahead[:n - len(left)])
                rest = ahead[n - len(left):]
                state.ahead = (fh, rest) if rest else None
                return joined
        chunk, rest = ahead[:n], ahead[n:]
        state.ahead = (fh, rest) if rest else None
        return chunk

    async def _handle_nacks(self) -> None:
        nacks, self.nacks = self.nacks, []
        for nack in nacks:
            state = self.out.get(nack.ch)
            spool = self.link.spools.get(nack.ch)
            if state is None or spool is None:
                continue
            if state.fh is not None:
                state.fh.close()
            state.current, state.fh, state.ahead = None, None, None
            state.prefetched.clear()
            self._show_in_flight(state)         # (it showed the abandoned send's bytes)
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
                                 wait=nack.wait, resume=nack.resume)
                state.wait_until = trio.current_time() + max(nack.wait, 0.1)
                # The peer keeps what it stored durably: send from there (the resend's
                # msg carries the offset, which the peer checks against its checkpoint).
                if nack.resume:     # (else keep a hello's resume point, for a probe's nack)
                    state.resume = (nack.seq, nack.resume)
                state.busy = f"{self.link.name}: {nack.reason}"
                self._set_held(nack.ch, state.held or state.busy)
                continue
            if nack.kind == F.NACK_STALE:
                # The peer cannot say what it holds under this seq: renumbered with the
                # rest of the tail once the probing is over (duplicate_possible then).
                state.verdicts[item.seq] = "unknown"
                state.next_seq = nack.seq + 1       # probe the rest (they were discarded)
                continue
            whole = flight is not None and not flight.probe and flight.offset == 0
            if spool.outbound.changed(item) or (
                    whole and nack.retry and nack.kind == F.NACK_RETRY
                    and await trio.to_thread.run_sync(spool.outbound.content_differs, item,
                                                      abandon_on_cancel=True)):
                # (The second look reads the file, once per refusal: a retryable
                # refusal of a message sent whole is the peer's checksum. Its inode,
                # size and mtime are as claimed, yet its content may differ: rewritten
                # with its mtime put back. Sent again, it would only be refused, and
                # quarantined, again. It only reads: a session that ends meanwhile
                # need not wait for it. A resume is not looked at (refused at its
                # start it sent no data); its next send is whole, and looked at.
                # Nothing else can resolve, fail or renumber it meanwhile: it left
                # in_flight above, and only this task fails or renumbers.)
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


