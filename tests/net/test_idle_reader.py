"""An idle session's reader waits holding no big buffer (issue 13): a hub of 200
idle peers held ~0.5 MiB per session (a 256 KiB receive buffer per waiting read
and a 256 KiB transport buffer), 221 MiB in all; with small reads until bulk
data flows it holds 82 MiB."""

from types import SimpleNamespace

import trio

from linkd.net import connection as conn
from linkd.net.tls_stream import TLSStream


async def test_an_idle_tls_session_reads_small_until_bulk_data_flows():
    asked = []
    replies = [b"p" * 40, b"q" * conn.IDLE_READ]     # a ping; then a read that fills up

    async def receive_some(max_bytes):
        asked.append(max_bytes)
        if not replies:
            raise trio.ClosedResourceError
        return replies.pop(0)

    async def receive_into(buffer):
        asked.append(("into", len(buffer)))
        raise trio.ClosedResourceError
    stream = object.__new__(TLSStream)                # a TLSStream for isinstance only
    stream.receive_some = receive_some
    stream.receive_into = receive_into
    ended = []
    runner = SimpleNamespace(
        session=SimpleNamespace(receive_data=lambda data, now: [], pending_output=0,
                                state=None, peer_said_bye=False,
                                has_output=False),
        stream=stream, _inbound_backlog=lambda: 0, _dispatch=lambda events: None,
        opened=trio.Event(), end=lambda why, fault: ended.append(why),
        writer_wake=SimpleNamespace(set=lambda: None))
    await conn.SessionRunner._reader(runner)
    assert asked == [conn.IDLE_READ, conn.IDLE_READ, ("into", conn.READ_SIZE)]
    assert ended
