"""PeerLink: everything linkd keeps for one configured peer across sessions.

It owns the peer's spool objects (one Outbound and one Inbound per channel),
its status entry, the pick-up task (inotify plus a periodic rescan), and the
*slot* that guarantees at most one active session per peer: a session must
hold the slot before it touches the spool, and the tie-break between two
sessions of the same peer (both sides dialled) is decided here.

Spool calls are blocking and go through `trio.to_thread.run_sync`, a batch
per hop; they are never cancelled half-way (threads are not abandoned), so a
cancelled session cannot leave half a state change behind.
"""

from __future__ import annotations

import datetime as dt
import errno
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from . import log as logmod
from .config import ChannelConfig, Config, PeerConfig
from .errors import SpoolError
from .spool import FailedFile, Inbound, Outbound, SpoolLayout
from .status import PeerStatus
from .wakeup import Wakeup

T = TypeVar("T")
RESCAN_INTERVAL = 2.0
CLAIM_BATCH = 256               # files claimed per thread hop

try:
    import inotify_simple
except ImportError:  # pragma: no cover - the dependency is declared; be robust anyway
    inotify_simple = None


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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
        self.channels: dict[str, ChannelConfig] = {}
        self.peer_max: dict[str, int] = {}      # the peer's limits from its last hello
        self.work = Wakeup()                    # new outbound files claimed
        self.active: Any = None                 # the SessionRunner holding the slot
        self._slot_free = trio.Event()
        self._slot_free.set()
        self.slot_lock = trio.Lock()
        # Outbound objects are not thread-safe and every call runs in a worker thread:
        # scan (pick-up), ack and fail of one channel must never overlap, or a claim and
        # an ack race on the sequence counters (seen: numbers reused, claimed files
        # overwritten). One lock per channel, not per peer: hashing a 1 GiB file at
        # pick-up must not hold back another channel's pick-up or acks (CONTRACT §4.4).
        self.spool_locks: dict[str, trio.Lock] = {}
        self.send_attempts: dict[tuple[str, int], int] = {}   # (channel, seq) -> sends nacked
        self.removed = False                    # set by a reload that dropped this peer
        self.last_session_open = False          # the last dialled session was stable
        self.sessions_opened = 0                # sessions that reached the hello (any side)
        self._rescan = Wakeup()
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
            self.status.channel(ch.name)

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
            self.status.channels.pop(name, None)
        added = [c for c in peer.channels if c.name not in self.outbound]
        self.channels = {c.name: c for c in peer.channels}
        self._set_channels(peer.channels)
        if added:
            layout = self.layout
            await in_thread(layout.create, [c.name for c in added], cfg.link.archive_sent)
            for c in added:
                await in_thread(self.outbound[c.name].recover)
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

    def spool_lock(self, channel: str) -> trio.Lock:
        """The lock that serialises spool calls on `channel`'s Outbound."""
        lock = self.spool_locks.get(channel)
        if lock is None:
            lock = self.spool_locks[channel] = trio.Lock()
        return lock

    def refresh_queued(self, channels: list[str] | None = None) -> None:
        """Recount `queued` for `channels` (all by default); call under their locks."""
        for name in list(self.outbound) if channels is None else channels:
            out = self.outbound.get(name)
            if out is None:
                continue
            stats = self.status.channel(name)
            pending = out.pending()
            waiting_count, waiting_bytes = out.waiting()
            stats.queued = len(pending) + waiting_count
            stats.queued_bytes = sum(i.size for i in pending) + waiting_bytes

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

    def _scan_one(self, name: str, out: Outbound) -> tuple[int, list[FailedFile]]:
        """Blocking: claim up to CLAIM_BATCH files waiting in out/<name>/ (hashing
        each). Returns (files handled, failures)."""
        try:
            if not out.usable:          # an earlier I/O error: finish what it cut short
                for problem in out.recover():
                    self.log.warning("recovery", channel=name, problem=problem)
            claimed, failed = out.scan(self.peer_max.get(name), CLAIM_BATCH)
        except (OSError, SpoolError) as exc:
            self.log.error("pickup_failed", channel=name, reason=str(exc))
            return 0, []
        self.refresh_queued([name])
        return len(claimed) + len(failed), failed

    async def scan_channel(self, name: str) -> None:
        """Claim everything waiting on `name`, a batch per thread hop, releasing the
        channel's spool lock between batches so acks and shutdown never wait long."""
        while True:
            out = self.outbound.get(name)
            if out is None:
                return
            async with self.spool_lock(name):
                handled, failed = await in_thread(self._scan_one, name, out)
            self.log_failed(failed)
            self.work.set()
            if self.active is not None:
                self.active.sender_wake.set()
            if handled < CLAIM_BATCH:
                return

    async def scan_now(self) -> None:
        """Pick up on every channel at once, each on its own."""
        async with trio.open_nursery() as nursery:
            for name in list(self.outbound):
                nursery.start_soon(self.scan_channel, name)

    async def pickup(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Claim files as they are renamed into out/<channel>/ (inotify + rescan).

        One task per channel waits for its own inotify events (or the periodic
        rescan) and claims that channel's files, so a big file being hashed on
        one channel never delays pick-up on another. This task reads inotify,
        wakes the channels concerned, and starts tasks for channels added by a
        reload (a removed channel's task ends by itself)."""
        notifier = None
        if inotify_simple is not None:
            try:
                notifier = inotify_simple.INotify()
            except OSError as exc:
                self.log.warning("inotify_unavailable", reason=str(exc))
        watched: dict[str, int] = {}
        wakeups: dict[str, Wakeup] = {}
        mask = 0
        if notifier is not None:
            flags = inotify_simple.flags
            mask = flags.MOVED_TO | flags.CLOSE_WRITE | flags.CREATE

        async def channel_task(name: str, wakeup: Wakeup) -> None:
            try:
                while name in self.outbound:
                    await self.scan_channel(name)
                    with trio.move_on_after(RESCAN_INTERVAL):
                        await wakeup.wait()
            finally:
                if wakeups.get(name) is wakeup:
                    del wakeups[name]

        try:
            await self.scan_now()
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    for name in list(self.channels):
                        if name not in wakeups:
                            wakeups[name] = Wakeup()
                            nursery.start_soon(channel_task, name, wakeups[name])
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
