"""Two real daemons on 127.0.0.1: the walking skeleton end to end."""

import os

from procs import wait_for


def test_files_cross_both_ways_intact(pair):
    a, b = pair()
    payload = os.urandom(300_000)
    a.drop("bravo", "data", "there.bin", payload)
    b.drop("alpha", "data", "back.bin", b"reply")
    wait_for(lambda: b.inbound("alpha", "data") == {"there.bin": payload}, 30)
    wait_for(lambda: a.inbound("bravo", "data") == {"back.bin": b"reply"}, 30)
    wait_for(lambda: not any(a.out_dir("bravo", "data").iterdir()), 10)
    sent = wait_for(lambda: a.events("message_sent"), 10)
    assert sent[0]["name"] == "there.bin" and sent[0]["seq"] == 1
