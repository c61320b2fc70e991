"""linkd.systemd: sd_notify datagrams to real sockets, watchdog timing in virtual time."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from linkd import systemd


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def receiver(clean_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named in $NOTIFY_SOCKET."""
    folder = tempfile.mkdtemp(prefix="lsd", dir="/tmp")   # short: AF_UNIX paths are limited
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    clean_env.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()
    shutil.rmtree(folder)


def test_not_under_systemd_every_call_is_a_no_op(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready("up") is False
    assert systemd.watchdog_interval() is None
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


def test_nobody_listening_is_false_not_an_error(clean_env: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify("READY=1") is False


def test_ready_status_stopping_reach_a_path_socket(receiver: socket.socket) -> None:
    assert systemd.ready("2 peers,\n1 connected")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=2 peers, 1 connected"
    assert systemd.ready()
    assert receiver.recv(4096) == b"READY=1"
    assert systemd.status("draining  queue")
    assert receiver.recv(4096) == b"STATUS=draining queue"
    assert systemd.stopping()
    assert receiver.recv(4096) == b"STOPPING=1"


def test_reloading_carries_the_monotonic_time(receiver: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", receiver.recv(4096))
    assert m and before <= int(m.group(1)) <= after


def test_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"linkd-test-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("usec, pid, expected", [
    ("30000000", None, 30.0),
    ("500000", "self", 0.5),
    ("30000000", "1", None),          # meant for another process
    ("30000000", "x", None),
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
    (None, None, None),
])
def test_watchdog_interval(clean_env: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        clean_env.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    if pid == "1" and os.getpid() == 1:
        pytest.skip("we are pid 1")
    assert systemd.watchdog_interval() == expected


async def collect(sock: trio.socket.SocketType, into: list[tuple[float, bytes]]) -> None:
    while True:
        data = await sock.recv(4096)
        into.append((trio.current_time(), data))


async def test_watchdog_pings_at_half_the_interval_while_healthy(
        receiver: socket.socket, clean_env: pytest.MonkeyPatch,
        autojump_clock: trio.testing.MockClock) -> None:
    clean_env.setenv("WATCHDOG_USEC", "2000000")          # 2 s: a ping every second
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    got: list[tuple[float, bytes]] = []
    start = trio.current_time()

    def healthy() -> bool:   # wedged from t=4.5 to t=7.5
        return not 4.5 <= trio.current_time() - start < 7.5

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, trio.socket.from_stdlib_socket(receiver), got)
        with trio.move_on_after(10.5):
            await systemd.watchdog_loop(healthy)
        nursery.cancel_scope.cancel()
    assert {data for _, data in got} == {b"WATCHDOG=1"}
    assert [round(t - start, 6) for t, _ in got] == [0, 1, 2, 3, 4, 8, 9, 10]


async def test_watchdog_loop_with_an_explicit_interval(
        receiver: socket.socket, autojump_clock: trio.testing.MockClock) -> None:
    got: list[tuple[float, bytes]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, trio.socket.from_stdlib_socket(receiver), got)
        with trio.move_on_after(59):
            await systemd.watchdog_loop(lambda: True, interval=30)
        nursery.cancel_scope.cancel()
    assert len(got) == 4                                   # t = 0, 15, 30, 45


async def test_watchdog_loop_returns_at_once_without_a_watchdog(
        clean_env: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    await systemd.watchdog_loop(lambda: True)
    assert trio.current_time() == start
