"""PeerLink: everything linkd keeps for one configured peer across sessions.

It owns the peer's spool objects (one Outbound and one Inbound per channel),
its status entry, the pick-up task (inotify plus a periodic rescan, and the
measuring of the queued sizes that start-up recovery does not read), and the
*slot* that guarantees at most one active session per peer: a session must
hold the slot before it touches the spool, and the tie-break between two
sessions of the same peer (both sides dialled) is decided here.

Each channel's outbound spool has one async owner (`net.spoolio.ChannelSpool`):
pick-up, the session's sender and its acknowledgement handling all go through
it. Pick-up is two hops per batch: hash without the lock, claim under it.
READY is reported before the backlog is scanned, and recovery reads only a
bounded part of the queue (docs/DELIVERY.md §3): a large queue never delays
start-up or signal handling.

Size: over 400 lines on purpose: the slot, pick-up (with its watches) and the
queue's bookkeeping all act on the same per-peer state; split, each part
would reach into the others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar, TypeVarTuple

import trio
from structlog.typing import FilteringBoundLogger

from .. import log as logmod
from ..config import ChannelConfig, Config, PeerConfig
from ..errors import SpoolError
from ..evidence import audit as audit_mod
from ..evidence.audit import AuditTail
from ..jsontypes import JSONObject
from ..spool import Claimed, FailedFile, Inbound, Outbound, ResourceBusy, SpoolLayout
from ..spool.outbound_items import OVERFLOW, SUSPECT
from ..status import PeerStatus
from ..wakeup import Wakeup
from .spoolio import ChannelSpool
from .watcher import FolderWatcher, Watch

if TYPE_CHECKING:
    from .connection import SessionRunner

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
RESCAN_INTERVAL = 2.0     # a channel whose out/ has no inotify watch: look this often
SAFETY_RESCAN = 60.0      # a watched channel: inotify wakes it; this is only a backstop
VERIFY_INTERVAL = 10.0    # how often a watched out/ is checked to be the folder watched
RESOURCE_BACKOFF = (0.2, 5.0)   # pick-up retry after EMFILE & co: first, at most


async def in_thread(fn: Callable[[*Ts], T], *args: *Ts) -> T:
    return await trio.to_thread.run_sync(fn, *args)



def delivered_fields(peer: str, channel: str, name: object, seq: int, size: object,
                     sha256: object, sent_name: object,
                     recovered: bool = False) -> dict[str, object]:
    """The fields of a message_delivered line (CONTRACT §10, an audit event)."""
    fields: dict[str, object] = dict(peer=peer, channel=channel, name=name, seq=seq,
                                     size=size, sha256=sha256)
    if recovered:
        fields["recovered"] = True
    if sent_name != name:
        fields["sent_name"] = sent_name
    return fields


def log_delivered(log: FilteringBoundLogger, peer: str, channel: str, name: object,
                  seq: int, size: object, sha256: object, sent_name: object,
                  recovered: bool = False) -> None:
    """The message_delivered line: from crash recovery and the start-up
    reconciliation (the group commit logs its batch at once: net/receiver.py)."""
    log.info("message_delivered", **delivered_fields(peer, channel, name, seq, size,
                                                     sha256, sent_name, recovered))

class PeerLink:
    def __init__(self, cfg: Config, peer: PeerConfig, status: PeerStatus) -> None:
        # the peer's newest audit checkpoint we witnessed (line, its bytes' SHA-256):
        # one for a lower line later means its log went back (connection._witness)
        self.witnessed: tuple[int, str] | None = None
        self.cfg = cfg
        self.peer = peer
        self.name = peer.name
        self.status = status
        self.log = logmod.get(peer=peer.name)
        self.layout = SpoolLayout(cfg.node.spool_dir, cfg.node.state_dir, peer.name)
        self.outbound: dict[str, Outbound] = {}
        self.inbound: dict[str, Inbound] = {}
        self.spools: dict[str, ChannelSpool] = {}
        self.channels: dict[str, ChannelConfig] = {}
        self.active: SessionRunner | None = None    # the session holding the slot
        self._slot_free = trio.Event()
        self._slot_free.set()
        self.slot_lock = trio.Lock()
        # is_paused(channel) -> bool; the daemon wires it to its pause control
        self.is_paused: Callable[[str], bool] = lambda channel: False
        self.send_attempts: dict[tuple[str, int], int] = {}   # (channel, seq) -> sends nacked
        self.removed = False                    # set by a reload that dropped this peer
        self.last_session_open = False          # the last dialled session was stable
        self.sessions_opened = 0                # sessions that reached the hello (any side)
        self._rescan = Wakeup()
        self.watcher: FolderWatcher | None = None    # the daemon's one inotify instance
        self.oldest_claim: dict[str, float | None] = {}
        # (channel, seq) -> when it was sent (trio time), for each message logged
        # ack_overdue: its ack, in this session or a later one, is logged ack_resumed
        self.ack_overdue: dict[tuple[str, int], float] = {}
        self.cancel_scope: trio.CancelScope | None = None
        # the dial loop's wake-up and "dial at once" flag (supervisor.redial_now)
        self.redial: trio.Event | None = None
        self.redial_pending = False
        self._set_channels(peer.channels)

    def _set_channels(self, channels: tuple[ChannelConfig, ...]) -> None:
        for ch in channels:
            self.channels[ch.name] = ch
            if ch.name not in self.outbound:
                self.outbound[ch.name] = Outbound(self.layout, ch.name, ch.max_message_bytes,
                                                  self.cfg.link.archive_sent)
                self.inbound[ch.name] = Inbound(self.layout, ch.name, ch.max_message_bytes,
                                                self.cfg.node.file_mode)
                self.spools[ch.name] = ChannelSpool(ch.name, self.outbound[ch.name],
                                                    self.inbound[ch.name])
            else:       # a reload: the new limits apply to the existing channel too
                self.outbound[ch.name].configure(ch.max_message_bytes,
                                                 self.cfg.link.archive_sent)
                self.inbound[ch.name].configure(ch.max_message_bytes, self.cfg.node.file_mode)
            self.status.channel(ch.name)

    def apply_limits(self) -> None:
        """Re-apply the channels' limits from the current config (a reload)."""
        self._set_channels(tuple(self.channels.values()) if self.peer is None
                           else self.peer.channels)

    def wake_sender(self) -> None:
        if self.active is not None:
            self.active.sender_wake.set()

    # -- start-up -------------------------------------------------------------

    def prepare(self) -> list[str]:
        """Blocking: create folders and run crash recovery for every channel."""
        self.layout.create(list(self.channels), self.cfg.link.archive_sent)
        problems: list[str] = []
        for name in self.channels:
            problems += self.outbound[name].recover()
            problems += self.inbound[name].recover()
        return problems

    def left_behind(self) -> list[tuple[str, int, int]]:
        """Blocking: (channel, files queued, files in out/) of each folder pair of a
        channel no longer configured that still holds files: a removed channel's
        files stay on disk (reconfigure), and after a restart nothing else says so."""
        found = []
        try:
            with os.scandir(self.layout.peer_dir / "queue") as it:
                names = {e.name for e in it if e.is_dir(follow_symlinks=False)}
            with os.scandir(self.layout.peer_dir / "out") as it:
                names |= {e.name for e in it if e.is_dir(follow_symlinks=False)}
        except OSError:
            return []
        for name in sorted(names - set(self.channels)):
            if name.startswith("."):
                continue
            counts = []
            for folder, keep in ((self.layout.peer_dir / "queue" / name,
                                  lambda n: n.endswith(".data")),
                                 (self.layout.peer_dir / "out" / name,
                                  lambda n: not n.startswith("."))):
                try:
                    with os.scandir(folder) as it:
                        counts.append(sum(1 for e in it if keep(e.name)
                                          and e.is_file(follow_symlinks=False)))
                except OSError:
                    counts.append(0)
            if any(counts):
                found.append((name, counts[0], counts[1]))
        return found

    async def reconfigure(self, cfg: Config, peer: PeerConfig) -> None:
        """Apply a reloaded config: new channels are added; removed ones stop being sent."""
        self.cfg = cfg
        self.peer = peer
        removed = set(self.channels) - {c.name for c in peer.channels}
        for name in removed:
            out = self.outbound.get(name)
            stats = out.queue_stats() if out is not None else (0, 0, None, 0, 0)
            queued = stats[0]
            if queued + stats[3]:
                self.status.left_behind[name] = queued + stats[3]   # (status, check)
            if queued:
                # they stay where they are (nothing is lost), out of every listing
                self.log.warning("channel_removed", channel=name, queued=queued, reason=(
                    f"channel {name} was removed with {queued} file(s) still queued: they "
                    f"stay in {self.layout.queue_dir(name)} and go out once the channel "
                    f"is configured again"))
            self.channels.pop(name, None)
            self.outbound.pop(name, None)
            self.inbound.pop(name, None)
            self.spools.pop(name, None)
            self.status.channels.pop(name, None)
        added = [c for c in peer.channels if c.name not in self.outbound]
        for c in added:
            self.status.left_behind.pop(c.name, None)
        self.channels = {c.name: c for c in peer.channels}
        self._set_channels(peer.channels)
        if added:
            layout = self.layout
            await in_thread(layout.create, [c.name for c in added], cfg.link.archive_sent)
            for c in added:
                await self.spools[c.name].recover_outbound()
                await in_thread(self.inbound[c.name].recover)
            await self.log_recovered()
        self._rescan.set()

    # -- the slot -------------------------------------------------------------

    async def wait_idle(self) -> None:
        while self.active is not None:
            await self._slot_free.wait()

    def take_slot(self, runner: SessionRunner) -> None:
        self.active = runner
        self._slot_free = trio.Event()

    def release_slot(self, runner: SessionRunner) -> None:
        if self.active is runner:
            self.active = None
            self._slot_free.set()

    # -- counters -------------------------------------------------------------

    def refresh_queued(self, channels: list[str] | None = None) -> None:
        """Recount `queued` (and the oldest queued file's age) for `channels`."""
        for name in list(self.outbound) if channels is None else channels:
            out = self.outbound.get(name)
            if out is None:
                continue
            while out.late_problems:    # found while loading the queue's window
                self.log.warning("recovery", channel=name, problem=out.late_problems.pop(0))
            stats = self.status.channel(name)
            # O(1): this runs after every pick-up batch and every batch of acks
            count, size, oldest, waiting_count, waiting_bytes = out.queue_stats()
            stats.queued = count + waiting_count
            stats.queued_bytes = size + waiting_bytes
            self.oldest_claim[name] = oldest
            stats.oldest_queued_at = oldest

    def iter_queue_entries(self, channel: str | None = None) -> Iterator[JSONObject]:
        """Blocking: every queued file of this peer (CONTRACT §10 `linkctl queue`),
        oldest first per channel; files still waiting in out/ come last with seq None.
        One at a time: a queue of 100,000 is streamed, never held as one list."""
        now = time.time()
        runner = self.active
        for name, out in list(self.outbound.items()):
            if channel is not None and name != channel:
                continue
            held = None
            if self.is_paused(name):
                held = "paused by an operator (linkctl resume)"
            elif runner is not None:
                held = runner.held_reason(name)
            for item in out.iter_pending():     # beyond the window: one record at a time
                sent_bytes, in_flight = 0, False
                if runner is not None:
                    sent_bytes, in_flight = runner.progress(name, item.seq)
                state = "held" if held and not in_flight else (
                    "in_flight" if in_flight else "waiting")
                yield {"peer": self.name, "channel": name, "seq": item.seq,
                       "name": item.name, "size": item.size,
                       "age_s": round(max(0.0, now - item.claimed_at), 3),
                       "sent_bytes": sent_bytes, "state": state,
                       "reason": held if state == "held" else None,
                       "sha256": item.sha256 or None}
            for fname, size, ctime in out.waiting_files():
                yield {"peer": self.name, "channel": name, "seq": None,
                       "name": fname, "size": size,
                       "age_s": round(max(0.0, now - ctime), 3), "sent_bytes": 0,
                       "state": "held" if held else "waiting",
                       "reason": held or out.waiting_reason(fname),
                       "sha256": None}

    async def log_recovered(self) -> None:
        """Log deliveries that crash recovery completed (their session never did),
        except those whose line the audit log's tail already holds: written by the
        receiver's announce just before a crash (spool/inbound.py, K3)."""
        taken = [(name, inbound.take_recovered()) for name, inbound in self.inbound.items()]
        taken = [(name, done) for name, done in taken if done]
        if not taken:
            return
        audit = audit_mod.current()
        tail = await in_thread(audit.tail) if audit is not None else None
        for name, done in taken:
            for d in done:
                self.status.channel(name).note_received(d.size)
                if tail is not None and \
                        (self.name, name, d.seq, d.sha256) in tail.delivered:
                    continue
                log_delivered(self.log, self.name, name, d.name, d.seq, d.size, d.sha256,
                              d.sent_name, recovered=True)

    def journaled(self) -> dict[str, list[dict[str, object]]]:
        """Blocking: each channel's journaled deliveries (reads the journals)."""
        return {name: inbound.journaled() for name, inbound in self.inbound.items()}

    def reconcile_audit(self, tail: AuditTail,
                        journaled: dict[str, list[dict[str, object]]],
                        until: float | None = None) -> None:
        """At start-up: log message_delivered (recovered=True) for each journaled
        delivery made since the audit log's tail began that has no line in it -- one
        whose line a crash or a failed audit log lost (docs/EVIDENCE.md). Deliveries
        older than the tail are not judged. Covers what recovery just completed.
        `journaled`: what `journaled()` read (blocking: in a worker thread). `until`:
        judge only deliveries made before it (after a full audit log resumed: the
        ones made since log their own lines)."""
        now = time.time() if until is None else until
        for name, inbound in self.inbound.items():
            # What recovery just completed: logged here whatever its date (after a
            # resume, one recovered since `until` is logged by nothing else).
            taken = set()
            for d in inbound.take_recovered():
                self.status.channel(name).note_received(d.size)
                taken.add(d.seq)
                if (self.name, name, d.seq, d.sha256) not in tail.delivered:
                    log_delivered(self.log, self.name, name, d.name, d.seq, d.size,
                                  d.sha256, d.sent_name, recovered=True)
            for e in journaled.get(name, []):
                seq, sha = e.get("seq"), e.get("sha256")
                if seq in taken:
                    continue
                when = e.get("delivered_at")
                # (a delivered_at in the future: the clock was stepped back since; its
                # line, if any, is older than the tail's start by the clock: not judged)
                if not isinstance(seq, int) or not isinstance(when, int | float) \
                        or not tail.since <= when <= now \
                        or (self.name, name, seq, sha) in tail.delivered:
                    continue
                log_delivered(self.log, self.name, name, e.get("name"), seq, e.get("size"),
                              sha, e.get("sent_name"), recovered=True)

    def log_failed(self, failed: list[FailedFile]) -> None:
        for f in failed:
            self.status.channel(f.channel).failed += 1
            fields: dict[str, object] = {"peer": self.name, "channel": f.channel, "name": f.name,
                                         "reason": f.reason}
            if f.seq is not None:
                fields["seq"] = f.seq
            if f.size is not None:
                fields["size"] = f.size
            self.log.warning("message_failed", **fields)

    # -- pick-up --------------------------------------------------------------

    def log_queued(self, claimed: list[Claimed]) -> None:
        # A big file's SHA-256 is taken after its claim, while it is sent (LATE_HASH):
        # its line leaves it out ("where known", CONTRACT §10); message_sent has it.
        logmod.info_many(self.log, "message_queued", (
            dict(peer=self.name, channel=item.channel, name=item.name, seq=item.seq,
                 size=item.size, **({"sha256": item.sha256} if item.sha256 else {}))
            for item in claimed))

    async def pick_up(self, name: str, relist: bool) -> float | None:
        """Claim what is ready on `name` now, a bounded batch per hop, until nothing
        more is ready. Returns when to look again for files not ready yet (a writer
        still has them open), or None."""
        delay = RESOURCE_BACKOFF[0]
        while True:
            spool = self.spools.get(name)
            if spool is None:
                return None
            try:
                if not spool.outbound.usable:   # an earlier I/O error: rebuild first
                    for problem in await spool.recover_outbound():
                        self.log.warning("recovery", channel=name, problem=problem)
                # No peer limit at pick-up: only a live session's limits count, at send
                # time (net/connection.py); our own max_message_bytes applies here.
                found = await spool.examine(None, relist)
                claimed, failed = await spool.claim(found.ready)
                if spool.outbound.wants_fill() and await spool.fill():
                    self.wake_sender()          # an earlier load of the window was cut
            except ResourceBusy as exc:
                # Out of descriptors or memory: nothing is wrong with the files.
                self.log.warning("pickup_delayed", channel=name, reason=str(exc))
                await trio.sleep(delay)
                delay = min(delay * 2, RESOURCE_BACKOFF[1])
                continue
            except (OSError, SpoolError) as exc:
                self.log.error("pickup_failed", channel=name, reason=str(exc))
                return RESCAN_INTERVAL
            relist = False
            self.log_failed(found.failed + failed)
            self.log_queued(claimed)
            self.refresh_queued([name])
            if claimed:
                self.wake_sender()
            if not found.more:
                return found.retry_after
            await trio.lowlevel.checkpoint()

    async def measure_queue(self, name: str) -> None:
        """Learn the sizes of the queued files that start-up recovery did not read
        (a bounded batch per hop), so that `queued_bytes` becomes exact."""
        while True:
            spool = self.spools.get(name)
            if spool is None or not spool.outbound.unmeasured or not spool.outbound.usable:
                return
            await spool.measure()
            self.refresh_queued([name])
            await trio.lowlevel.checkpoint()

    async def scan_now(self) -> None:
        """Pick up on every channel at once, each on its own."""
        async with trio.open_nursery() as nursery:
            for name in list(self.outbound):
                nursery.start_soon(self.pick_up, name, True)

    async def pickup(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim files as they arrive in out/<channel>/ (inotify + a backstop rescan).

        One task per channel waits for its own inotify events (or the rescan)
        and claims that channel's files, so a big file being hashed on one
        channel never delays pick-up on another. This task watches each out/
        folder on the daemon's one inotify instance (net/watcher.py), starts
        tasks for channels added by a reload (a removed channel's task ends by
        itself) and re-watches a folder that was replaced (an event says so, or
        every VERIFY_INTERVAL an lstat finds another folder at the path, e.g.
        its parent was renamed or a file system mounted over it, or after an
        event queue overflow), then lists it. A watched channel is
        rescanned only every SAFETY_RESCAN seconds: an idle hub must not list
        hundreds of folders every few seconds; an unwatched one (no inotify, or
        its folder missing) every RESCAN_INTERVAL. It reports started at once:
        the backlog is claimed after READY."""
        own = None
        watcher = self.watcher
        watched: dict[str, Watch] = {}
        ever: set[str] = set()                  # channels watched at some point
        wakeups: dict[str, Wakeup] = {}
        measuring: set[str] = set()
        notified: set[str] = set()
        rewatch = Wakeup()

        def interval(name: str) -> float:
            return SAFETY_RESCAN if name in watched else RESCAN_INTERVAL

        def wake(name: str) -> None:
            wakeup = wakeups.get(name)
            if wakeup is not None:
                notified.add(name)
                wakeup.set()

        def watch(name: str) -> Watch | None:
            assert watcher is not None
            mine: list[Watch] = []

            def on_event(kind: str) -> None:
                if kind == "lost" and mine and watched.get(name) is mine[0]:
                    del watched[name]           # the folder was moved or deleted
                if kind != "event":             # lost, or overflow: check the folders
                    rewatch.set()
                wake(name)
            out = self.outbound.get(name)
            found = watcher.add(self.layout.out_dir(name), on_event,
                                out.writing if out is not None else None,
                                out.writing_lock if out is not None else None)
            if found is None and out is not None and watcher.available \
                    and not watcher.remote(self.layout.out_dir(name)):
                # a local folder whose watch failed (max_user_watches used up...):
                # writers go unseen; where no lease can be had, every file there must
                # be quiet for longer (a network file system keeps the plain quiet
                # period: inotify never sees its writers, as documented)
                out.writing[OVERFLOW] = (time.monotonic(), SUSPECT)
            if found is not None:
                mine.append(found)
                if out is not None:
                    # a folder watched anew (start-up, replaced, pick-up restarted): the
                    # writers of what is in it now may not have been seen (a producer
                    # writing in place across a restart was delivered truncated); where
                    # no lease can be had, pick-up asks those files a longer quiet
                    # period. The marks it has are kept: a stale one only delays.
                    out.writing[OVERFLOW] = (time.monotonic(), SUSPECT)
            return found

        async def channel_task(name: str, wakeup: Wakeup) -> None:
            try:
                relist = True
                while name in self.outbound:
                    again = await self.pick_up(name, relist)
                    wait = interval(name) if again is None else min(again, interval(name))
                    relist = True
                    with trio.move_on_after(wait):
                        await wakeup.wait()
                        relist = name in notified
                    notified.discard(name)
            finally:
                if wakeups.get(name) is wakeup:
                    del wakeups[name]

        async def reloads() -> None:
            while True:
                await self._rescan.wait()       # a reload: every channel looks again
                for name in list(wakeups):
                    wake(name)
                rewatch.set()

        async def measure_task(name: str) -> None:
            try:
                await self.measure_queue(name)
            finally:
                measuring.discard(name)

        try:
            async with trio.open_nursery() as nursery:
                if watcher is None:             # no daemon (tests): a watcher of our own
                    watcher = own = FolderWatcher()
                    await nursery.start(own.run)
                nursery.start_soon(reloads)
                task_status.started()
                while True:
                    for name in list(self.channels):
                        if name not in wakeups:
                            wakeups[name] = Wakeup()
                            nursery.start_soon(channel_task, name, wakeups[name])
                        out = self.outbound.get(name)
                        if out is not None and out.unmeasured and name not in measuring:
                            measuring.add(name)
                            nursery.start_soon(measure_task, name)
                        old = watched.get(name)
                        # (an lstat of a local folder: cheap enough for the event loop)
                        if old is not None and not old.current():
                            watcher.remove(watched.pop(name))   # replaced: watch the new one
                        if name not in watched:
                            found = watch(name)
                            if found is not None:
                                watched[name] = found
                                if name in ever:
                                    wake(name)  # files may have come while unwatched
                                ever.add(name)
                    for name in [n for n in watched if n not in self.channels]:
                        watcher.remove(watched.pop(name))
                    missing = any(n not in watched for n in self.channels)
                    # retry a missing watch soon; check the watched folders now and then
                    with trio.move_on_after(RESCAN_INTERVAL if missing else VERIFY_INTERVAL):
                        await rewatch.wait()
        finally:
            if watcher is not None:
                for found in watched.values():
                    watcher.remove(found)
