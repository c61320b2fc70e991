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
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .. import log as logmod
from ..config import ChannelConfig, Config, PeerConfig
from ..errors import SpoolError
from ..spool import Claimed, FailedFile, Inbound, Outbound, ResourceBusy, SpoolLayout
from ..status import PeerStatus
from ..wakeup import Wakeup
from .spoolio import ChannelSpool

T = TypeVar("T")
RESCAN_INTERVAL = 2.0
RESOURCE_BACKOFF = (0.2, 5.0)   # pick-up retry after EMFILE & co: first, at most

try:
    import inotify_simple
except ImportError:  # pragma: no cover - the dependency is declared; be robust anyway
    inotify_simple = None


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


class PeerLink:
    def __init__(self, cfg: Config, peer: PeerConfig, status: PeerStatus) -> None:
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
        self.active: Any = None                 # the SessionRunner holding the slot
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
        self.oldest_claim: dict[str, float | None] = {}
        self.cancel_scope: trio.CancelScope | None = None
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

    async def reconfigure(self, cfg: Config, peer: PeerConfig) -> None:
        """Apply a reloaded config: new channels are added; removed ones stop being sent."""
        self.cfg = cfg
        self.peer = peer
        removed = set(self.channels) - {c.name for c in peer.channels}
        for name in removed:
            self.channels.pop(name, None)
            self.outbound.pop(name, None)
            self.inbound.pop(name, None)
            self.spools.pop(name, None)
            self.status.channels.pop(name, None)
        added = [c for c in peer.channels if c.name not in self.outbound]
        self.channels = {c.name: c for c in peer.channels}
        self._set_channels(peer.channels)
        if added:
            layout = self.layout
            await in_thread(layout.create, [c.name for c in added], cfg.link.archive_sent)
            for c in added:
                await self.spools[c.name].recover_outbound()
                await in_thread(self.inbound[c.name].recover)
        self._rescan.set()

    # -- the slot -------------------------------------------------------------

    async def wait_idle(self) -> None:
        while self.active is not None:
            await self._slot_free.wait()

    def take_slot(self, runner: Any) -> None:
        self.active = runner
        self._slot_free = trio.Event()

    def release_slot(self, runner: Any) -> None:
        if self.active is runner:
            self.active = None
            self._slot_free.set()

    # -- counters -------------------------------------------------------------

    def refresh_queued(self, channels: list[str] | None = None) -> None:
        """Recount `queued` (and the oldest queued file's age) for `channels`."""
        now = time.time()
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
            if hasattr(stats, "oldest_queued_age_s"):
                stats.oldest_queued_age_s = None if oldest is None else round(now - oldest, 3)

    def queue_entries(self, channel: str | None = None) -> list[dict[str, Any]]:
        """Every queued file of this peer (CONTRACT §10 `linkctl queue`), oldest first
        per channel; files still waiting in out/ come last with seq None."""
        now = time.time()
        entries: list[dict[str, Any]] = []
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
                entries.append({"peer": self.name, "channel": name, "seq": item.seq,
                                "name": item.name, "size": item.size,
                                "age_s": round(max(0.0, now - item.claimed_at), 3),
                                "sent_bytes": sent_bytes, "state": state,
                                "reason": held if state == "held" else None,
                                "sha256": item.sha256})
            for fname, size, ctime in out.waiting_files():
                entries.append({"peer": self.name, "channel": name, "seq": None,
                                "name": fname, "size": size,
                                "age_s": round(max(0.0, now - ctime), 3), "sent_bytes": 0,
                                "state": "held" if held else "waiting", "reason": held,
                                "sha256": None})
        return entries

    def log_recovered(self) -> None:
        """Log deliveries that crash recovery completed (their session never did)."""
        for name, inbound in self.inbound.items():
            for d in inbound.recovered:
                self.status.channel(name).note_received(d.size)
                fields: dict[str, Any] = dict(peer=self.name, channel=d.channel, name=d.name,
                                              seq=d.seq, size=d.size, sha256=d.sha256,
                                              recovered=True)
                if d.sent_name != d.name:
                    fields["sent_name"] = d.sent_name
                self.log.info("message_delivered", **fields)
            inbound.recovered = []

    def log_failed(self, failed: list[FailedFile]) -> None:
        for f in failed:
            self.status.channel(f.channel).failed += 1
            fields: dict[str, Any] = {"peer": self.name, "channel": f.channel, "name": f.name,
                                      "reason": f.reason}
            if f.seq is not None:
                fields["seq"] = f.seq
            if f.size is not None:
                fields["size"] = f.size
            self.log.warning("message_failed", **fields)

    # -- pick-up --------------------------------------------------------------

    def log_queued(self, claimed: list[Claimed]) -> None:
        for item in claimed:
            self.log.info("message_queued", peer=self.name, channel=item.channel,
                          name=item.name, seq=item.seq, size=item.size, sha256=item.sha256)

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

    async def pickup(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Claim files as they arrive in out/<channel>/ (inotify + rescan).

        One task per channel waits for its own inotify events (or the periodic
        rescan) and claims that channel's files, so a big file being hashed on
        one channel never delays pick-up on another. This task reads inotify,
        wakes the channels concerned, and starts tasks for channels added by a
        reload (a removed channel's task ends by itself). Only IN_MOVED_TO and
        IN_CLOSE_WRITE wake a channel: IN_CREATE comes before a `cp` has
        written anything. It reports started at once: the backlog is claimed
        after READY."""
        notifier = None
        if inotify_simple is not None:
            try:
                notifier = inotify_simple.INotify()
            except OSError as exc:
                self.log.warning("inotify_unavailable", reason=str(exc))
        watched: dict[str, int] = {}
        wakeups: dict[str, Wakeup] = {}
        measuring: set[str] = set()
        notified: set[str] = set()
        mask = 0
        if notifier is not None:
            flags = inotify_simple.flags
            mask = flags.MOVED_TO | flags.CLOSE_WRITE

        async def channel_task(name: str, wakeup: Wakeup) -> None:
            try:
                relist = True
                while name in self.outbound:
                    again = await self.pick_up(name, relist)
                    wait = RESCAN_INTERVAL if again is None else min(again, RESCAN_INTERVAL)
                    relist = True
                    with trio.move_on_after(wait):
                        await wakeup.wait()
                        relist = name in notified
                    notified.discard(name)
            finally:
                if wakeups.get(name) is wakeup:
                    del wakeups[name]

        async def measure_task(name: str) -> None:
            try:
                await self.measure_queue(name)
            finally:
                measuring.discard(name)

        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    for name in list(self.channels):
                        if name not in wakeups:
                            wakeups[name] = Wakeup()
                            nursery.start_soon(channel_task, name, wakeups[name])
                        out = self.outbound.get(name)
                        if out is not None and out.unmeasured and name not in measuring:
                            measuring.add(name)
                            nursery.start_soon(measure_task, name)
                        if notifier is not None and name not in watched:
                            try:
                                watched[name] = notifier.add_watch(
                                    str(self.layout.out_dir(name)), mask)
                            except OSError as exc:
                                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                                    raise
                    woken: list[str] = []
                    with trio.move_on_after(RESCAN_INTERVAL):   # also retries failed watches
                        if notifier is None:
                            await self._rescan.wait()
                            woken = list(wakeups)
                        else:
                            woken = await self._next_events(notifier, watched)
                    for name in woken:
                        if name in wakeups:
                            notified.add(name)
                            wakeups[name].set()
        finally:
            if notifier is not None:
                notifier.close()

    async def _next_events(self, notifier: Any, watched: dict[str, int]) -> list[str]:
        """Wait for inotify events (-> the channels they concern) or a reload (-> all)."""
        woken: list[str] = []
        async with trio.open_nursery() as nursery:
            async def on_fs() -> None:
                await trio.lowlevel.wait_readable(notifier.fileno())
                by_wd = {wd: name for name, wd in watched.items()}
                for event in notifier.read(timeout=0):
                    name = by_wd.get(event.wd)
                    if name is not None and name not in woken:
                        woken.append(name)
                nursery.cancel_scope.cancel()

            async def on_rescan() -> None:
                await self._rescan.wait()
                woken.extend(watched)
                woken.extend(self.channels)
                nursery.cancel_scope.cancel()
            nursery.start_soon(on_fs)
            nursery.start_soon(on_rescan)
        return woken
