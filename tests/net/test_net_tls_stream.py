"""TLSStream (linkd.net.tls_stream) as a trio Stream: pyOpenSSL over memory BIOs.

Over `memory_stream_pair` (buffered) and `lockstep_stream_pair` (every send waits for
the matching receive, which exposes ordering deadlocks): both directions, half-close,
close_notify versus abrupt EOF, large writes, full duplex, cancellation, misuse. Every
test runs twice: calling pyOpenSSL's bindings directly where its API copies more
(tls_stream.USE_BINDINGS, the default) and with its public API only. The bulk receive
path is pinned by counting: one transport read and one buffer per receive.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from memlink import node_config

from linkd.config import ChannelConfig, PeerConfig
from linkd.net import tls_stream
from linkd.net.tls import make_contexts
from linkd.net.tls_stream import EOF_WITHOUT_CLOSE_NOTIFY, TLSError, TLSStream

PAIRS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "memory": trio.testing.memory_stream_pair,
    "lockstep": trio.testing.lockstep_stream_pair,
}


@pytest.fixture(autouse=True, params=[True, False], ids=["bindings", "public-api"])
def bindings(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param and not tls_stream.USE_BINDINGS:   # pragma: no cover
        pytest.skip("pyOpenSSL's bindings are not where tls_stream expects them")
    monkeypatch.setattr(tls_stream, "USE_BINDINGS", request.param)
    return bool(request.param)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    alpha = node_config(tmp, ca, "alpha", [PeerConfig("bravo", channels=(ChannelConfig("d"),))])
    bravo = node_config(tmp, ca, "bravo", [PeerConfig("alpha", channels=(ChannelConfig("d"),))])
    return make_contexts(alpha), make_contexts(bravo)


def streams(contexts: tuple[Any, Any], kind: str = "memory") -> tuple[TLSStream, TLSStream]:
    """(client, server), not yet handshaken; the raw transports stay reachable."""
    alpha, bravo = contexts
    left, right = PAIRS[kind]()
    client = alpha.client_stream(left, PeerConfig("bravo", channels=(ChannelConfig("d"),)))
    server = bravo.server_stream(right, [PeerConfig("alpha", channels=(ChannelConfig("d"),))])
    return client, server


async def connected(contexts: tuple[Any, Any], kind: str = "memory"
                    ) -> tuple[TLSStream, TLSStream]:
    client, server = streams(contexts, kind)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
    return client, server


async def receive_exactly(stream: TLSStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("kind", PAIRS)
async def test_both_directions(contexts, kind):
    client, server = await connected(contexts, kind)
    assert client.version() == server.version() == "TLSv1.3"
    assert client.group() == server.group() == "X25519MLKEM768"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"from the client")
            assert await receive_exactly(server, 15) == b"from the client"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"from the server")
            assert await receive_exactly(client, 15) == b"from the server"


@pytest.mark.parametrize("kind", PAIRS)
async def test_a_client_that_writes_first_does_not_deadlock_on_the_servers_tickets(
        contexts, kind):
    """Over lockstep, tickets sent at the end of the server's handshake would block it
    until the client reads, while the client blocks in its first write (trio #819)."""
    client, server = streams(contexts, kind)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"hello")
            assert await receive_exactly(server, 5) == b"hello"   # handshakes implicitly
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"world")           # the tickets go with it
            assert await receive_exactly(client, 5) == b"world"


async def test_receive_some_honours_max_bytes_and_a_zero_byte_send_sends_nothing(contexts):
    client, server = await connected(contexts)
    await client.send_all(b"")
    await client.send_all(b"abcdef")
    assert await server.receive_some(4) == b"abcd"
    assert await server.receive_some(100) == b"ef"
    with pytest.raises(ValueError):
        await server.receive_some(0)


@pytest.mark.parametrize("kind", PAIRS)
async def test_half_close_each_direction_on_its_own(contexts, kind):
    client, server = await connected(contexts, kind)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"last words")
            assert await receive_exactly(server, 10) == b"last words"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_eof)
            assert await server.receive_some() == b""      # close_notify: a clean EOF
        assert await server.receive_some() == b""          # and it stays at EOF
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"more")
        # the other direction still works
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"reply after your EOF")
            assert await receive_exactly(client, 20) == b"reply after your EOF"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_eof)
            assert await client.receive_some() == b""
    await client.aclose()
    await server.aclose()


async def test_aclose_sends_close_notify_and_then_everything_is_closed(contexts):
    client, server = await connected(contexts)
    await client.send_all(b"bye")
    await client.aclose()
    assert await receive_exactly(server, 3) == b"bye"
    assert await server.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()
    await client.aclose()          # idempotent
    await server.aclose()


async def test_abrupt_eof_without_close_notify_is_broken_not_clean(contexts):
    client, server = await connected(contexts)
    await client.send_all(b"partial")
    await client.transport_stream.aclose()      # the TCP connection just goes away
    assert await receive_exactly(server, 7) == b"partial"
    with pytest.raises(trio.BrokenResourceError) as info:
        await server.receive_some()
    assert isinstance(info.value.__cause__, TLSError)
    assert str(info.value.__cause__) == EOF_WITHOUT_CLOSE_NOTIFY
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()              # broken for good
    await server.aclose()


async def test_eof_during_the_handshake_is_broken(contexts):
    client, server = streams(contexts)
    await client.transport_stream.aclose()
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        await server.do_handshake()


async def test_garbage_instead_of_tls_breaks_the_stream(contexts):
    _client, server = streams(contexts)
    raw = _client.transport_stream
    await raw.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
        await server.do_handshake()
    assert isinstance(info.value.__cause__, TLSError)


@pytest.mark.parametrize("kind", PAIRS)
async def test_large_writes_arrive_whole_and_in_order(contexts, kind):
    client, server = await connected(contexts, kind)
    data = os.urandom(8 << 20) + b"end"        # one send_all of 8 MiB: ~512 records
    received = bytearray()

    async def reader() -> None:
        while len(received) < len(data):
            chunk = await server.receive_some()
            assert chunk
            received.extend(chunk)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await client.send_all(data)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize("kind", PAIRS)
async def test_full_duplex_both_sides_send_and_receive_at_once(contexts, kind):
    """Four tasks: each side writes 2 MiB while reading the other's 2 MiB. A stream that
    serialised send and receive, or read only after writing, would deadlock on lockstep."""
    client, server = await connected(contexts, kind)
    payloads = {id(client): os.urandom(2 << 20), id(server): os.urandom(2 << 20)}
    got: dict[int, bytes] = {}

    async def send(stream: TLSStream) -> None:
        view = memoryview(payloads[id(stream)])
        for i in range(0, len(view), 100_000):       # odd sizes: records split across sends
            await stream.send_all(view[i:i + 100_000])

    async def receive(stream: TLSStream, other: TLSStream) -> None:
        got[id(stream)] = await receive_exactly(stream, len(payloads[id(other)]))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, client)
            nursery.start_soon(send, server)
            nursery.start_soon(receive, client, server)
            nursery.start_soon(receive, server, client)
    assert got[id(server)] == payloads[id(client)]
    assert got[id(client)] == payloads[id(server)]


async def test_a_second_concurrent_sender_or_receiver_is_a_busy_error(contexts):
    client, server = await connected(contexts, "lockstep")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"x" * 100_000)  # blocks: nobody reads
            nursery.start_soon(client.receive_some)              # blocks: nothing comes
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await client.send_all(b"y")
            with pytest.raises(trio.BusyResourceError):
                await client.receive_some()
            with pytest.raises(trio.BusyResourceError):
                await client.wait_send_all_might_not_block()
            nursery.cancel_scope.cancel()


async def test_a_cancelled_receive_that_got_nothing_leaves_the_stream_usable(contexts):
    client, server = await connected(contexts)
    with trio.move_on_after(0.05) as scope:
        await server.receive_some()
    assert scope.cancelled_caught
    await client.send_all(b"still here")
    with trio.fail_after(10):
        assert await receive_exactly(server, 10) == b"still here"


async def test_a_send_cancelled_half_way_breaks_the_stream(contexts):
    """Part of a record may be on the wire: the only safe state is broken (as trio's)."""
    client, server = await connected(contexts, "lockstep")
    with trio.move_on_after(0.2) as scope:
        await client.send_all(b"z" * 1_000_000)      # the server never reads
    assert scope.cancelled_caught
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"more")
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    await client.aclose()                             # a broken stream still closes
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")


async def test_a_cancelled_handshake_breaks_the_stream(contexts):
    client, _server = streams(contexts)
    with trio.move_on_after(0.05) as scope:
        await client.do_handshake()                   # the server never answers
    assert scope.cancelled_caught
    with pytest.raises(trio.BrokenResourceError):
        await client.do_handshake()
    await client.aclose()


async def test_concurrent_handshake_callers_share_one_handshake(contexts):
    client, server = streams(contexts)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
    assert client.group() == "X25519MLKEM768"
    await client.do_handshake()                       # done: a checkpoint, nothing else


async def test_information_is_none_before_the_handshake(contexts):
    client, _server = streams(contexts)
    assert client.version() is None and client.cipher() is None and client.group() is None
    assert client.peer_certificate_der() is None


async def test_wait_send_all_might_not_block_passes_through(contexts):
    client, server = await connected(contexts)
    with trio.fail_after(10):
        await client.wait_send_all_might_not_block()
    await client.send_all(b"ok")
    assert await receive_exactly(server, 2) == b"ok"



class CountingTransport(trio.abc.Stream):
    """A transport that records the size asked for by each receive_some."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.asked: list[int | None] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.asked.append(max_bytes)
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def counted_pair(contexts: tuple[Any, Any]) -> tuple[TLSStream, TLSStream,
                                                            CountingTransport]:
    left, right = trio.testing.memory_stream_pair()
    counting = CountingTransport(right)
    client, server = await handshaken(contexts, left, counting)
    return client, server, counting


async def handshaken(contexts: tuple[Any, Any], left: trio.abc.Stream,
                     right: trio.abc.Stream) -> tuple[TLSStream, TLSStream]:
    """alpha's client stream on `left`, bravo's server stream on `right`, handshaken."""
    alpha, bravo = contexts
    client = alpha.client_stream(left, PeerConfig("bravo", channels=(ChannelConfig("d"),)))
    server = bravo.server_stream(right, [PeerConfig("alpha", channels=(ChannelConfig("d"),))])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
    return client, server


@pytest.mark.parametrize("how", ["receive_into", "receive_some"])
async def test_a_bulk_receive_is_one_transport_read_decrypted_into_one_buffer(contexts, how):
    """1 MiB read 256 KiB at a time (the session reader's size): each receive asks the
    transport once for all of it (plus the records' overhead) and returns nearly all of
    it, instead of trio's 64 KiB transport reads and a join of 16 KiB records."""
    client, server, counting = await counted_pair(contexts)
    payload = os.urandom(1 << 20)
    await client.send_all(payload)                  # buffered whole by the memory stream
    counting.asked.clear()
    buffer = bytearray(256 << 10)
    got = bytearray()
    receives = 0
    with trio.fail_after(10):
        while len(got) < len(payload):
            if how == "receive_into":
                n = await server.receive_into(buffer)
                got += buffer[:n]
            else:
                got += await server.receive_some(len(buffer))
            receives += 1
    assert got == payload
    assert receives <= 5
    assert len(counting.asked) <= 5
    assert all(asked is not None and asked > 256 << 10 for asked in counting.asked)


async def test_receive_into_returns_zero_at_close_notify_and_refuses_an_empty_buffer(contexts):
    client, server = await connected(contexts)
    await client.send_all(b"last words")
    await client.send_eof()
    buffer = bytearray(100)
    with trio.fail_after(10):
        n = await server.receive_into(buffer)
        assert buffer[:n] == b"last words"
        assert await server.receive_into(buffer) == 0
    with pytest.raises(ValueError):
        await server.receive_into(bytearray())


async def test_with_the_bindings_records_are_decrypted_straight_into_the_buffer(
        contexts, bindings, monkeypatch):
    """No scratch buffer per record (pyOpenSSL's recv/recv_into allocate one and copy
    it), the outgoing BIO is read only when it holds something, and the end of the
    decryptable records raises no exception (at most the one WantReadError that sends
    a receive to the transport)."""
    from OpenSSL import SSL
    client, server = await connected(contexts)
    calls: dict[str, int] = {"recv": 0, "recv_into": 0, "empty bio_read": 0}
    real = {name: getattr(SSL.Connection, name) for name in ("recv", "recv_into", "bio_read")}

    def counted(name: str) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                result = real[name](self, *args, **kwargs)
            except SSL.WantReadError:
                if name == "bio_read":
                    calls["empty bio_read"] += 1
                raise
            if name != "bio_read":
                calls[name] += 1
            return result
        return call
    for name in real:
        monkeypatch.setattr(SSL.Connection, name, counted(name))
    raised = []
    raise_ssl_error = SSL.Connection._raise_ssl_error

    def counted_raise(self: Any, ssl: Any, result: int) -> None:
        if result <= 0:                 # a failed call: an exception is raised
            raised.append(result)
        raise_ssl_error(self, ssl, result)
    monkeypatch.setattr(SSL.Connection, "_raise_ssl_error", counted_raise)
    payload = os.urandom(2 << 20)
    buffer = bytearray(256 << 10)
    got = bytearray()
    receives = 0
    with trio.fail_after(30):
        for i in range(0, len(payload), 100_000):   # less than a buffer at a time: each
            await client.send_all(payload[i:i + 100_000])   # receive ends on WantRead
            while len(got) < min(i + 100_000, len(payload)):
                n = await server.receive_into(buffer)
                got += buffer[:n]
                receives += 1
    assert got == payload
    if bindings:
        assert calls == {"recv": 0, "recv_into": 0, "empty bio_read": 0}
        assert len(raised) <= receives
    else:
        assert calls["recv_into"] >= len(payload) // tls_stream.TLS_RECORD


async def socket_pair(contexts: tuple[Any, Any], tcp: bool = False
                      ) -> tuple[TLSStream, TLSStream]:
    """(client, server) over real sockets (trio.SocketStream transports): a socketpair,
    or a TCP connection on 127.0.0.1."""
    if tcp:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        left = await trio.open_tcp_stream("127.0.0.1", port)
        right = await listener.accept()
        await listener.aclose()
    else:
        a, b = trio.socket.socketpair()
        left, right = trio.SocketStream(a), trio.SocketStream(b)
    return await handshaken(contexts, left, right)


async def test_bulk_reads_from_a_socket_reuse_one_buffer(contexts, monkeypatch):
    """Over a socket, a bulk receive reads into one buffer kept for the stream: the
    socket's receive_some (a new bytes object per read) is left to small reads."""
    client, server = await socket_pair(contexts)
    calls: list[int | None] = []
    receive_some = trio.SocketStream.receive_some

    async def counted(self: Any, max_bytes: int | None = None) -> bytes:
        calls.append(max_bytes)
        return await receive_some(self, max_bytes)
    monkeypatch.setattr(trio.SocketStream, "receive_some", counted)
    payload = os.urandom(4 << 20)
    buffer = bytearray(256 << 10)
    got = bytearray()
    buffers = set()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            while len(got) < len(payload):
                n = await server.receive_into(buffer)
                got += buffer[:n]
                assert server._transport_buffer is not None
                buffers.add(id(server._transport_buffer.obj))
    assert got == payload
    assert calls == [] and len(buffers) == 1
    # small reads still take the socket's own path, and the end of the stream is the end
    await client.send_all(b"tail")
    assert await receive_exactly(server, 4) == b"tail"
    assert calls and all(c is not None and c <= tls_stream.DEFAULT_RECEIVE_SIZE for c in calls)
    await client.aclose()
    with trio.fail_after(10):
        assert await server.receive_into(buffer) == 0
    await server.aclose()


async def test_a_socket_that_breaks_or_closes_during_a_bulk_read(contexts):
    client, server = await socket_pair(contexts)
    buffer = bytearray(256 << 10)
    try:
        assert server._socket is not None
        server._socket.close()                    # our own transport closed under us
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_into(buffer)
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)
    client, server = await socket_pair(contexts, tcp=True)
    try:
        await client.send_all(b"x" * 1000)
        assert client._socket is not None
        client._socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client._socket.close()                    # a TCP reset, not a close_notify
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError,
                                                match="socket connection broken"):
            while True:
                await server.receive_into(buffer)
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)
