"""The sans-IO protocol core: bytes, events and `now` in; bytes, events and deadlines out.

Nothing in this package may import trio, socket, ssl, os, time or a logger
(tests/proto/test_proto_purity.py enforces it).

    session.py    the Session: dispatch of frames, calls and timers; output queues
    state.py      the session's states and the (state, input) -> state table
    channel.py    one channel's state, both directions; discard-until-rewind
    events.py     what the session reports to its owner
    frames.py     the wire vocabulary and its one encoder/decoder
    framing.py    length-prefixed frames on a byte stream
    flow.py       credit windows
    heartbeat.py  ping, RTT and silence deadlines
    scheduler.py  which channel sends next (priority, no starvation)

The naming rules (channel, node, file names) live in linkd/names.py, shared
with the spool.
"""
