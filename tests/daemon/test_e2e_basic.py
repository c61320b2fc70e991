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


def test_a_peer_restarting_is_not_reported_as_a_tls_refusal(pair):
    """A listener that said goodbye (SIGTERM) went on accepting until it exited: the
    dialler, told goodbye, redialled at once and was cut mid-handshake, logging
    `tls_refused` "Connection reset by peer" (4 restarts in 6 here) as if its
    certificate had been refused. Now the listening socket closes first: the
    redial is refused by the kernel and simply backs off."""
    a, b = pair(link={"reconnect_min": 0.01, "reconnect_max": 0.05})
    for _ in range(4):
        b.stop()
        b.start()
        a.wait_state("bravo")
    assert a.events("tls_refused") == [] and b.events("tls_refused") == []
    a.drop("bravo", "data", "after.txt", b"still flows")
    wait_for(lambda: b.inbound("alpha", "data") == {"after.txt": b"still flows"}, 30)


def test_a_stopping_dialler_says_goodbye_before_it_stops_dialling(pair):
    """A stopping daemon cancelled the dial loop its session runs in before saying
    goodbye: the session was cut, the dialler logged no link_down of its own and the
    listener an unclean one ("connection reset by peer", found by an operator's
    restart trial). Now the goodbye comes first, on both sides, every time (a
    review found no test that failed with the old order)."""
    a, b = pair(link={"reconnect_min": 0.01, "reconnect_max": 0.05})
    for i in range(1, 4):
        a.stop()
        downs = a.events("link_down")
        assert len(downs) == i, downs
        assert (downs[-1]["reason"], downs[-1]["clean"]) == \
            ("shutdown: peer is shutting down", True)
        theirs = wait_for(lambda i=i: b.events("link_down")[i - 1:], 10)
        assert (theirs[0]["reason"], theirs[0]["clean"]) == \
            ("peer said goodbye: shutdown: peer is shutting down", True)
        a.start()
        b.wait_state("alpha")
