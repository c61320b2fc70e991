"""ChannelSpool: the one async owner of one channel's outbound spool.

Theory of operation
-------------------
`Outbound` is plain blocking code with in-memory state; every call that
changes that state (claim, resolve, fail, renumber, raise_floor, recover) runs
in a worker thread while this object's lock is held, so two of them never
overlap, and nothing else in the daemon touches the Outbound except through
here (reads of `pending()` from the event loop are a single dict copy).
Hashing at pick-up (`examine`) reads only files still in out/ and state that
only the pick-up task uses, so it runs in a thread *without* the lock: a
1 GiB file being hashed never delays an acknowledgement or a send. Each hop is
bounded (examine: CLAIM_BATCH files or CLAIM_BYTES bytes; claim: one batch;
read_whole: the sender's batch of small files, see net/sender.py),
and every channel has its own owner, so a slow disk on one channel never
delays another (CONTRACT §4.4).

Threads are never abandoned: a cancelled caller waits for the hop in hand, so
a cancelled session cannot leave half a state change behind.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import BinaryIO, TypeVar, TypeVarTuple

import trio

from ..spool import Claimed, FailedFile, Inbound, Outbound, Resolved
from ..spool.outbound import Candidate, Examined

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class ChannelSpool:
    def __init__(self, name: str, outbound: Outbound, inbound: Inbound) -> None:
        self.name = name
        self.outbound = outbound
        self.inbound = inbound
        self.lock = trio.Lock()

    async def _locked(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        async with self.lock:
            return await trio.to_thread.run_sync(fn, *args)

    async def examine(self, peer_max: int | None, relist: bool) -> Examined:
        """Hash waiting files (no lock: only the pick-up task calls this)."""
        return await trio.to_thread.run_sync(
            lambda: self.outbound.examine(peer_max, relist=relist))

    async def claim(self, ready: list[Candidate]) -> tuple[list[Claimed], list[FailedFile]]:
        return await self._locked(self.outbound.claim, ready)

    async def resolve(self, seqs: list[int],
                      before: Callable[[], None] | None = None) -> list[Resolved]:
        """Resolve acknowledged seqs; `before` (blocking: e.g. making their receipts
        durable) runs first in the same thread hop, and nothing is resolved if it
        raises."""
        def _resolve() -> list[Resolved]:
            if before is not None:
                before()
            return self.outbound.resolve(seqs)
        return await self._locked(_resolve)

    async def fail(self, item: Claimed, reason: str) -> FailedFile | None:
        async with self.lock:
            if self.outbound.get(item.seq) is None:
                return None         # resolved or failed meanwhile
            return await trio.to_thread.run_sync(self.outbound.fail, item, reason)

    async def renumber(self, item: Claimed, above: int) -> Claimed | None:
        async with self.lock:
            if self.outbound.get(item.seq) is None:
                return None
            return await trio.to_thread.run_sync(self.outbound.renumber, item, above)

    async def renumber_tail(self, first: int, above: int) -> list[tuple[Claimed, Claimed]]:
        return await self._locked(self.outbound.renumber_tail, first, above)

    async def raise_floor(self, committed: int) -> bool:
        return await self._locked(self.outbound.raise_floor, committed)

    async def recover_outbound(self) -> list[str]:
        return await self._locked(self.outbound.recover)

    async def fill(self) -> int:
        """Load the queue's window up again (after a load cut by an error)."""
        return await self._locked(self.outbound.fill)

    async def measure(self) -> int:
        """Learn a bounded batch of the sizes recovery did not read: how many remain."""
        return await self._locked(self.outbound.measure)

    async def read_whole(self, items: list[Claimed]) -> list[bytes | Exception]:
        """Read a batch of small queued files whole, in one thread hop (no lock, like
        open(): sending only reads). One entry per item, in order: its bytes, or why
        it cannot be sent (see Outbound.read_whole); the list stops early after a
        resource error."""
        return await trio.to_thread.run_sync(self.outbound.read_whole, items)

    async def hash_late(self, item: Claimed) -> Claimed:
        """Take the SHA-256 of a big file claimed without one (reading, without the
        lock, like examine()) and record it (with the lock); the queued item as it now
        is. FileChanged, OSError. Cancelled, the reading thread stops at its next
        read (it is abandoned, not waited for: 0.6 s per GiB)."""
        stop = threading.Event()
        try:
            sha256 = await trio.to_thread.run_sync(self.outbound.digest_late, item,
                                                   stop.is_set, abandon_on_cancel=True)
        finally:
            stop.set()
        return await self._locked(self.outbound.record_sha256, item, sha256)

    async def open(self, item: Claimed, offset: int, prefetch: bool = False) -> BinaryIO:
        """Open a queued file for sending at `offset` (FileChanged, OSError).

        prefetch=True (a small file: the caller sends it in one chunk): read the
        rest of it in the same thread hop and return it as an in-memory file
        (`io.BytesIO`, read without a hop); a file that shrank meanwhile gives
        fewer bytes, which the sender treats like any short read."""
        def _open() -> BinaryIO:
            fh = self.outbound.open(item)
            try:
                if offset:
                    fh.seek(offset)
                if prefetch:
                    data = fh.read(item.size - offset)
                    fh.close()
                    return io.BytesIO(data)
            except BaseException:
                fh.close()
                raise
            return fh
        return await trio.to_thread.run_sync(_open)
