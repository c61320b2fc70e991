"""The receiving half of a session (see connection.py for the whole picture).

One inbound worker per channel applies that channel's message events to its
`Inbound` spool a batch per thread hop (begin/write/finish, then one group
commit), signs the receipts of the batch (one signature over their Merkle root,
docs/EVIDENCE.md), and answers with acks naming each message's content, or with
nacks. A storage error on one channel nacks its oldest unacknowledged message as
"busy" (the sender waits and resends, not counted as an attempt) instead of
ending the session; a re-send or probe at or below `committed` is answered from
the delivery journal. `ReceiverMixin` holds these methods of SessionRunner.

After the worker nacks a message, the session discards the channel's frames until
the sender rewinds; but events it emitted before the nack reached it may already
be queued for the worker (the sender pipelines), so the worker applies the same
rule, proto's `DiscardUntilRewind`, to its queue.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
from collections.abc import Mapping
from pathlib import Path
from typing import TypeAlias

import trio

from .. import log as logmod
from ..errors import SpoolError
from ..evidence import audit as audit_mod
from ..evidence import receipts as R
from ..evidence import service as evidence_service
from ..evidence.canonical import micros
from ..proto import frames as F
from ..proto import session as S
from ..proto.channel import DiscardUntilRewind
from ..spool import (
    ChecksumMismatch,
    Completed,
    Delivered,
    InboundRefused,
)
from ..spool.inbound import quarantine_usage
from .peer import delivered_fields
from .sender import RunnerState

AUDIT_REFUSAL = "the audit log "   # how AuditLog.refusal() begins
BUSY_WAIT = (1.0, 30.0)       # a channel whose disk work failed nacks "busy" (first, max wait)
QUARANTINE_WAIT = 30.0        # seconds a sender waits after a "quarantine full" busy nack
ACKS_PER_FRAME = 256          # signed ack entries per frame (an RSA-4096 entry is ~1.5 KiB)
INBOUND_BATCH_BYTES = 1 << 20  # data written per thread hop while a message streams in

# What one thread hop of `_apply_inbound` hands back to the worker on the event loop:
Nack: TypeAlias = tuple[str, int, str, bool, str]              # ch, seq, reason, retry, kind
Quarantined: TypeAlias = tuple[str, str, int, str, Path | None]  # ch, name, seq, reason, where
Applied: TypeAlias = tuple[dict[str, list[F.AckEntry]], list[Nack], list[Delivered],
                           dict[str, int], list[Quarantined]]   # acks, nacks, delivered, credit


class ReceiverMixin(RunnerState):
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

    def _inbound_backlog(self) -> int:
        return sum(r.statistics().current_buffer_used for _s, r in self.inbound_qs.values())

    async def _inbound_worker(self, queue: trio.MemoryReceiveChannel[S.MessageEvent]) -> None:
        """Applies one channel's inbound events to its spool, a batch per thread hop."""
        assert self.session is not None
        rx = _Receiver()
        busy_wait = BUSY_WAIT[0]
        batch: list[S.MessageEvent] = []
        while True:
            # The last batch is written and its credit given back: let its data go now,
            # not once the next megabyte has arrived (that would be 5 MiB held, not 4).
            batch.clear()
            batch = await self._gather(queue)
            try:
                result = await trio.to_thread.run_sync(self._apply_inbound, batch, rx)
            except (OSError, SpoolError) as exc:
                # Disk full, EIO, EMFILE... on this channel: nothing of the batch was
                # acknowledged. Nack the oldest unacknowledged message as "busy" (the
                # sender waits, then sends it again; not counted as an attempt) and
                # repair the spool; the session and the other channels go on.
                ch = batch[0].ch
                self.log.error("inbound_storage_failed", channel=ch, reason=str(exc))
                self.link.status.channel(ch).inbound_error = str(exc)
                inbound = self.link.inbound.get(ch)
                if inbound is not None:
                    try:
                        await trio.to_thread.run_sync(inbound.recover)
                    except (OSError, SpoolError) as again:
                        self.end(f"local storage failure: {again}", True)
                        return
                    # a commit that failed after its renames is complete now: log it
                    # (its resend will be answered from the journal)
                    await self.link.log_recovered()
                returned = sum(len(ev.data) for ev in batch if isinstance(ev, S.MessageData))
                self.session.grant(ch, returned)
                # The oldest message not acknowledged: of earlier batches, or started or
                # answered in this one (whose acks and nacks were all lost with it, even
                # a nack that had already started discarding), so the sender rewinds
                # to it; resending too early costs a journal answer, too late a message.
                pending = [s for s in (rx.oldest_unacked(ch), rx.batch_low) if s is not None]
                if pending:
                    # What of it is durable (recover() kept the last checkpoint): the
                    # resend starts there, not at byte 0 (a disk that fills up at 120
                    # MiB of a 200 MiB file would otherwise take 120 MiB again per try).
                    point = inbound.resume_point() if inbound is not None else None
                    resume = point[1] if point is not None and point[0] == min(pending) \
                        and point[1] > 0 else None
                    self.session.send_nack(ch, min(pending),
                                           f"receiver cannot store it now: {exc}",
                                           True, F.NACK_BUSY, busy_wait, resume)
                    rx.discard(ch)
                busy_wait = min(busy_wait * 2, BUSY_WAIT[1])
                self.inbound_drained.set()
                self.writer_wake.set()
                continue
            self.inbound_drained.set()
            acks, nacks, delivered, credit, quarantined = result
            if any(acks.values()):
                # Only a message stored to the end shows the storage works again: a
                # resend that writes some data before it fails again keeps the
                # waits growing (reset on every written batch, they stayed at 1 s).
                busy_wait = BUSY_WAIT[0]
            # A message answered now (stored, or refused for a reason of its own) shows
            # the last storage error no longer describes the channel.
            for ch in {*(c for c, e in acks.items() if e),
                       *(n[0] for n in nacks if n[4] != F.NACK_BUSY)}:
                self.link.status.channel(ch).inbound_error = None
            for ch, seq, reason, retry, kind in nacks:
                resume = None
                if kind == F.NACK_BUSY and reason.startswith(AUDIT_REFUSAL):
                    self.log.error("inbound_storage_failed", peer=self.link.name, channel=ch,
                                   seq=seq, reason=reason)
                    self.link.status.channel(ch).inbound_error = reason
                elif kind == F.NACK_BUSY:   # quarantine/ over its quota: ask again later
                    self.log.warning("quarantine_full", peer=self.link.name, channel=ch,
                                     seq=seq, reason=reason)
                if kind == F.NACK_BUSY:     # what of it we hold durably: resend from there
                    inbound = self.link.inbound.get(ch)
                    point = inbound.resume_point() if inbound is not None else None
                    if point is not None and point[0] == seq and point[1] > 0:
                        resume = point[1]
                wait = QUARANTINE_WAIT if kind == F.NACK_BUSY else 0.0
                if kind == F.NACK_BUSY and reason.startswith(AUDIT_REFUSAL):
                    wait = evidence_service.refusal_wait(wait)  # back when it tries again
                self.session.send_nack(ch, seq, reason, retry, kind, wait, resume)
            for d in delivered:     # logged by _announce, inside the commit
                self.link.status.channel(d.channel).note_received(d.size)
            for ch, name, seq, reason, where in quarantined:
                self.link.status.channel(ch).quarantined += 1
                self.log.warning("message_quarantined", peer=self.link.name, channel=ch,
                                 name=name, seq=seq, reason=reason, path=str(where))
            for ch, entries in acks.items():
                for i in range(0, len(entries), ACKS_PER_FRAME):
                    self.session.send_ack(ch, entries[i:i + ACKS_PER_FRAME])
            for ch, n in credit.items():
                self.session.grant(ch, n)
            self.writer_wake.set()

    @staticmethod
    async def _gather(queue: trio.MemoryReceiveChannel[S.MessageEvent]) \
            -> list[S.MessageEvent]:
        """The next batch of a channel's events for one thread hop: whatever is queued,
        and while the batch ends inside a message's data, more of it, up to
        INBOUND_BATCH_BYTES. A hop costs ~150 us of CPU here, half of what writing and
        hashing a 256 KiB chunk does: not one per chunk. The wait cannot stall the
        sender: what is held back is under a quarter of the credit we grant
        (INITIAL_CREDIT), so the sender can still send the rest of the message, or
        its end, or a rewind."""
        batch = [await queue.receive()]
        data = 0
        while len(batch) < 512:
            last = batch[-1]
            if isinstance(last, S.MessageData):
                data += len(last.data)
            try:
                batch.append(queue.receive_nowait())
                continue
            except trio.WouldBlock:
                pass
            if not isinstance(last, S.MessageData) or data >= INBOUND_BATCH_BYTES:
                break
            batch.append(await queue.receive())
        return batch

    def _apply_inbound(self, batch: list[S.MessageEvent], rx: _Receiver) -> Applied:
        """Blocking: apply a batch of inbound events to the spool (one thread hop)."""
        link = self.link
        acks: dict[str, list[F.AckEntry]] = collections.defaultdict(list)
        nacks: list[Nack] = []
        credit: dict[str, int] = collections.defaultdict(int)
        quarantined: list[Quarantined] = []
        done: dict[str, list[Completed]] = collections.defaultdict(list)
        names: dict[tuple[str, int], str] = {}
        full: str | None = None          # quarantine quota problem (looked up once a batch)
        audit = audit_mod.current()
        unaudited = audit.refusal() if audit is not None else ""
        checked: set[str] = set()        # channels whose tmp/ a begin() of this batch checked
        # what the error path nacks if this batch fails: its discard() calls may drop
        # earlier messages from the unacknowledged list before the failure
        rx.batch_low = rx.oldest_unacked(batch[0].ch) if batch else None
        for ev in batch:
            ch = ev.ch
            inbound = link.inbound.get(ch)
            if isinstance(ev, S.MessageData):
                credit[ch] += len(ev.data)
            if inbound is None:
                continue
            if not rx.passes(ev):
                continue
            if isinstance(ev, S.MessageStart):
                rx.batch_low = ev.seq if rx.batch_low is None else min(rx.batch_low, ev.seq)
                rx.skipping.pop(ch, None)
                names[(ch, ev.seq)] = ev.name
                if ev.rewind:
                    inbound.abort()             # a message the sender abandoned mid-way
                if unaudited:
                    # No delivery, and no answer from the journal, without its audit
                    # line: the sender keeps the file and asks again later.
                    rx.skipping[ch] = ev.seq
                    nacks.append((ch, ev.seq, unaudited, True, F.NACK_BUSY))
                    rx.discard(ch)
                    continue
                if ev.seq <= inbound.committed:
                    # A re-send (its ack was lost) or a probe: say what we hold there.
                    rx.skipping[ch] = ev.seq
                    held = inbound.lookup(ev.seq)
                    if held is not None:
                        # unacknowledged until this batch's acks leave: if a later
                        # step of the batch fails, the busy nack must name it
                        rx.started(ch, ev.seq)
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
                    inbound.begin(ev.seq, ev.name, ev.size,
                                  ev.sha256.hex() if ev.sha256 is not None else "", ev.offset,
                                  checked=ch in checked)
                    checked.add(ch)
                    if ev.offset:       # (logged from this thread, as message_delivered is)
                        self.log.info("transfer_resumed", peer=self.link.name, channel=ch,
                                      seq=ev.seq, name=ev.name, size=ev.size,
                                      offset=ev.offset)
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
                    done[ch].append(inbound.finish(
                        ev.sha256.hex() if ev.sha256 is not None else None))
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
                got = link.inbound[ch].commit(completed, self._announce)
                delivered += got
                acks[ch].extend(_ack_entry(d) for d in got)
        for ch, entries in acks.items():    # nothing failed: all of them leave now
            rx.acked(ch, [e.seq for e in entries])
        # One signature per channel and batch: re-sends answered from the journal and
        # new deliveries share one Merkle tree.
        signed = {ch: self._sign(ch, entries) for ch, entries in acks.items()}
        return signed, nacks, delivered, dict(credit), quarantined

    def _announce(self, delivered: list[Delivered]) -> None:
        """Blocking, inside the group commit (Inbound.commit's `announce`): log each
        delivery and make its audit line durable before `committed` records it, so
        neither its ack nor a later ack from the journal goes out without that line,
        even if we are killed (the line's fields are what the ack names)."""
        audit = audit_mod.current()
        mark = audit.failures if audit is not None else 0
        logmod.info_many(self.log, "message_delivered", (
            delivered_fields(self.link.name, d.channel, d.name, d.seq, d.size, d.sha256,
                             d.sent_name) for d in delivered))
        if audit is not None and delivered:
            audit.sync()
            if audit.lost_since(mark):
                # Dropped while the log was failed, and it was resumed before this
                # sync: the lines are not in it. Fail the commit as a failed sync would
                # (the reconciliation after the resume, or at start-up, logs them).
                raise OSError(errno.EIO, f"audit log {audit.path}: the lines of this "
                                         f"commit were lost while it could not be written")

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


class _Receiver:
    """What one channel's inbound worker remembers between batches."""

    def __init__(self) -> None:
        self._discard: dict[str, DiscardUntilRewind] = {}
        self.skipping: dict[str, int] = {}      # channel -> seq whose data we ignore
        self.batch_low: int | None = None       # lowest unacked or started in this batch
        self._unacked: dict[str, list[int]] = collections.defaultdict(list)

    def discard(self, ch: str) -> None:
        """We nacked on `ch`: drop its queued events until the sender rewinds."""
        self._discard.setdefault(ch, DiscardUntilRewind()).start()
        self._unacked.pop(ch, None)

    def discarding(self, ch: str) -> bool:
        rule = self._discard.get(ch)
        return rule is not None and rule.active

    def passes(self, ev: S.MessageEvent) -> bool:
        """Whether the worker applies `ev` (see the module docstring)."""
        rule = self._discard.get(ev.ch)
        return rule is None or rule.passes(isinstance(ev, S.MessageStart) and ev.rewind)

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


def _ack_entry_from_journal(held: Mapping[str, object]) -> F.AckEntry:
    def number(key: str) -> int | float | str:
        """A JSON value int() or float() can take (anything else: TypeError, as int())."""
        value = held[key]
        if isinstance(value, int | float | str):
            return value
        raise TypeError(f"delivery journal entry: {key} is {value!r}, not a number")
    return F.AckEntry(seq=int(number("seq")), sha256=bytes.fromhex(str(held["sha256"])),
                      size=int(number("size")), sent_name=str(held["sent_name"]),
                      name=str(held["name"]), delivered_at=float(number("delivered_at")))

