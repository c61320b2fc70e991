"""sd_notify(3) in pure Python: READY, STATUS, RELOADING, STOPPING and the watchdog.

Theory of operation: systemd passes the path of a datagram socket in
$NOTIFY_SOCKET (a filesystem path, or "@name" for the abstract namespace).
Each notification is one datagram of newline-separated KEY=VALUE pairs. When
the variable is unset (not under systemd, or NotifyAccess=none) every call is
a no-op returning False, so the daemon calls these unconditionally.

Sending never stalls the event loop for long: the socket has a short send
timeout, and any error is swallowed (returning False) — a lost STATUS= line
must not stop the daemon.

The watchdog: with WatchdogSec= systemd sets WATCHDOG_USEC (and WATCHDOG_PID,
which must be our pid); `watchdog_loop` sends WATCHDOG=1 every half interval
while `healthy()` says so, and stays silent otherwise, letting systemd
restart a daemon whose event loop still runs but whose work is wedged.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import trio

SEND_TIMEOUT = 1.0


def _address() -> str | None:
    value = os.environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a kind we do not speak (e.g. vsock:)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=up") to systemd; False if not possible."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(state.encode("utf-8"), address)
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status: str | None = None) -> bool:
    """READY=1 (start-up or reload finished), with an optional STATUS= line."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def status(text: str) -> bool:
    """STATUS=<one line> shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    """RELOADING=1 plus MONOTONIC_USEC (required by Type=notify-reload, systemd >= 253).

    Send `ready()` once the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds, or None when the watchdog is not for us."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


async def watchdog_loop(healthy: Callable[[], bool], interval: float | None = None) -> None:
    """Ping WATCHDOG=1 every `interval`/2 seconds while healthy(); runs until cancelled.

    `interval` defaults to watchdog_interval(); without a watchdog this returns
    at once."""
    interval = watchdog_interval() if interval is None else interval
    if interval is None:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await trio.sleep(interval / 2)
