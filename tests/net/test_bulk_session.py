"""A big file between two real PeerLinks over TLS (a memory stream, no sockets): the
structure of the bulk path, counted, never timed.

* the receiver reads 256 KiB per TLS receive, into one buffer it reuses once bulk
  data flows (a session that only sees small frames keeps none);
* each payload byte reaches Inbound.write as a view of the frame's buffer, copied
  once by the frame decoder;
* the receiver's inbound worker writes (and hashes) at least 1 MiB per thread hop
  while a message streams in, not one 256 KiB chunk;
* its writer task flushes only when there is something to send (credit, acks), not
  after every read;
* the sender reads the file 1 MiB per thread hop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import weakref
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from memlink import drop, make_link, node_config, peer_config, scan_sync

from linkd.net.connection import LINGER, READ_SIZE, SessionRunner
from linkd.net.receiver import INBOUND_BATCH_BYTES
from linkd.net.sender import READ_AHEAD
from linkd.net.tls import make_contexts
from linkd.proto import session as S

SIZE = 4 << 20


@dataclasses.dataclass
class Counts:
    receives: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (asked, got)
    data_hops: list[int] = dataclasses.field(default_factory=list)   # data bytes per hop
    flushes: int = 0
    writes: list[tuple[type, int, bool]] = dataclasses.field(default_factory=list)
    held_while_gathering: list[int] = dataclasses.field(default_factory=list)
    file_reads: list[int] = dataclasses.field(default_factory=list)  # sender, per thread hop
    decoder_copied: int = 0
    delivered: bytes = b""
    close_took: float = 0.0                  # the sender's goodbye, until rb closed its end


class CountingFile:
    """A queued file whose reads are counted (each one is a thread hop)."""

    def __init__(self, fh: Any, reads: list[int]) -> None:
        self.fh, self.reads = fh, reads

    def read(self, n: int) -> bytes:
        self.reads.append(n)
        data: bytes = self.fh.read(n)
        return data

    def readinto(self, buffer: Any) -> int:
        self.reads.append(len(buffer))
        got: int = self.fh.readinto(buffer)
        return got

    def fileno(self) -> int:
        fd: int = self.fh.fileno()
        return fd

    def close(self) -> None:
        self.fh.close()


async def transfer(tmp_path: Path, payload: bytes) -> Counts:
    ca = trustme.CA()
    acfg = node_config(tmp_path, ca, "alpha", [peer_config("bravo")])
    bcfg = node_config(tmp_path, ca, "bravo", [peer_config("alpha")])
    a, b = make_link(acfg, "bravo"), make_link(bcfg, "alpha")
    drop(a, "data", "big.bin", payload)
    scan_sync(a)
    counts = Counts()

    left, right = trio.testing.memory_stream_pair()
    client = make_contexts(acfg).client_stream(left, acfg.peers[0])
    server = make_contexts(bcfg).server_stream(right, list(bcfg.peers))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
    ra = SessionRunner(a, client, remote="b", dialed_by_us=True, tls_info=None)
    rb = SessionRunner(b, server, remote="a", dialed_by_us=False, tls_info=None)
    a.take_slot(ra), b.take_slot(rb)

    receive_into = server.receive_into

    async def counted_receive(buffer: Any) -> int:
        n = await receive_into(buffer)
        counts.receives.append((len(buffer), n))
        return n
    server.receive_into = counted_receive       # type: ignore[method-assign]

    apply_inbound = rb._apply_inbound
    written: list[Any] = []

    def counted_apply(batch: list[Any], rx: Any) -> Any:
        views = [ev.data for ev in batch if isinstance(ev, S.MessageData)]
        if views:
            counts.data_hops.append(sum(len(v) for v in views))
        written.extend(weakref.ref(v) for v in views if isinstance(v, memoryview))
        return apply_inbound(batch, rx)
    rb._apply_inbound = counted_apply           # type: ignore[method-assign]

    gather = rb._gather

    async def watched_gather(queue: Any) -> list[Any]:
        counts.held_while_gathering.append(sum(ref() is not None for ref in written))
        written.clear()
        return await gather(queue)
    rb._gather = watched_gather                 # type: ignore[method-assign]

    flush = rb.flush

    async def counted_flush() -> None:
        counts.flushes += 1
        await flush()
    rb.flush = counted_flush                    # type: ignore[method-assign]

    inbound = b.inbound["data"]
    write = inbound.write

    def recorded_write(data: Any) -> None:
        counts.writes.append((type(data), len(data), getattr(data, "readonly", False)))
        write(data)
    inbound.write = recorded_write              # type: ignore[method-assign]

    spool = a.spools["data"]
    spool_open = spool.open

    async def counted_open(item: Any, offset: int, prefetch: bool = False) -> Any:
        return CountingFile(await spool_open(item, offset, prefetch), counts.file_reads)
    spool.open = counted_open                   # type: ignore[method-assign]

    delivered = trio.Event()
    commit = inbound.commit

    def noted_commit(batch: Any, announce: Any = None) -> Any:
        done = commit(batch, announce)
        trio.from_thread.run_sync(delivered.set)
        return done
    inbound.commit = noted_commit               # type: ignore[method-assign]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ra.run)
            nursery.start_soon(rb.run)
            await delivered.wait()
            assert rb.session is not None
            counts.decoder_copied = rb.session._decoder.copied
            started = trio.current_time()
            await ra.close("done")      # (rb, told goodbye, closes its end: no linger)
            counts.close_took = trio.current_time() - started
            nursery.cancel_scope.cancel()
    counts.delivered = (b.layout.in_dir("data") / "big.bin").read_bytes()
    return counts


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Counts]:
    payload = os.urandom(SIZE)
    counts = trio.run(transfer, tmp_path_factory.mktemp("bulk"), payload)
    return payload, counts


def test_the_file_arrives_whole(big):
    payload, counts = big
    assert hashlib.sha256(counts.delivered).digest() == hashlib.sha256(payload).digest()
    assert counts.close_took < LINGER / 2   # the goodbye ended at the peer's close


def test_the_receiver_reads_256_kib_per_tls_receive_into_one_reused_buffer(big):
    _payload, counts = big
    assert READ_SIZE == 256 * 1024
    assert counts.receives and {asked for asked, _ in counts.receives} == {READ_SIZE}
    assert sum(got for _, got in counts.receives) >= SIZE - READ_SIZE  # the first: not yet
    assert len(counts.receives) <= 2 * SIZE // READ_SIZE + 8


async def test_a_session_with_only_small_frames_keeps_no_read_buffer(tmp_path):
    counts = await transfer(tmp_path, b"small" * 1000)
    assert counts.delivered == b"small" * 1000
    assert counts.receives == []


def test_each_payload_byte_is_copied_once_between_the_tls_read_and_the_write(big):
    _payload, counts = big
    assert sum(n for _, n, _ in counts.writes) == SIZE
    assert all(kind is memoryview and readonly for kind, _, readonly in counts.writes)
    # the decoder's one copy (fed buffer -> the frame's buffer) covers the payload and
    # the frames' few header bytes, nothing twice
    assert SIZE <= counts.decoder_copied <= SIZE + 64 * 1024


def test_the_inbound_worker_writes_a_mebibyte_or_more_per_thread_hop(big):
    _payload, counts = big
    assert sum(counts.data_hops) == SIZE
    assert all(hop >= INBOUND_BATCH_BYTES for hop in counts.data_hops[:-1])
    assert len(counts.data_hops) <= SIZE // INBOUND_BATCH_BYTES + 1


def test_a_written_batch_is_let_go_before_the_next_is_gathered(big):
    """Memory: the frames of a batch are freed once written, not held while the next
    megabyte arrives (the credit, 4 MiB, is then what bounds the frames held)."""
    _payload, counts = big
    assert counts.held_while_gathering and not any(counts.held_while_gathering)


def test_the_receivers_writer_flushes_only_when_there_is_something_to_send(big):
    _payload, counts = big
    # the hello, a credit grant per inbound hop, the ack (and a spare): not one per read
    assert counts.flushes <= 2 + len(counts.data_hops) + 3
    assert counts.flushes < len(counts.receives)


def test_the_sender_reads_a_mebibyte_per_thread_hop(big):
    _payload, counts = big
    assert counts.file_reads and all(n <= READ_AHEAD for n in counts.file_reads)
    assert len(counts.file_reads) <= SIZE // READ_AHEAD + 1
