"""The sender reads a big file ahead, READ_AHEAD bytes per thread hop; a step the
credit window cuts short of a chunk leaves less read ahead than the next step
asks for. That remainder must be topped up from the file, not taken for the file
having shrunk (the operator-fault campaign saw ~2 MB files failed as "changed
size while being sent" after the read-ahead landed)."""

import os
from types import SimpleNamespace

from linkd.net import sender as sendmod


class _Session:
    def __init__(self, size):
        self.left = size

    def remaining(self, name):
        return self.left


async def test_read_ahead_tops_up_a_remainder_shorter_than_the_step(tmp_path):
    content = os.urandom(3 * sendmod.READ_AHEAD + 12345)
    path = tmp_path / "big.bin"
    path.write_bytes(content)
    state = sendmod._OutChannel("bulk", 0)
    session = _Session(len(content))
    runner = SimpleNamespace(session=session, writer_wake=SimpleNamespace(set=lambda: None))
    got = bytearray()
    steps = [100_000, 262_144, 262_144, 5, 262_144]      # credit cuts some steps short
    with open(path, "rb") as fh:  # noqa: ASYNC230 (a test fixture file)
        i = 0
        while len(got) < len(content):
            n = min(steps[i % len(steps)], len(content) - len(got))
            data = await sendmod.SenderMixin._read_chunk(runner, state, fh, n)
            assert len(data) == n, (i, len(data), n)        # never short before the end
            got += data
            session.left -= n
            i += 1
    assert bytes(got) == content
