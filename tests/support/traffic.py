"""Background traffic for fault tests: a thread that keeps dropping small files."""

from __future__ import annotations

import os
import threading
from typing import Any


class Traffic:
    """Drop a new small file every `interval` seconds on each (daemon, peer, channel)
    route, remembering every file, until stop(). Names carry a route tag and a counter."""

    def __init__(self, routes: list[tuple[Any, str, str]], interval: float = 0.1,
                 size: int = 4096) -> None:
        self.routes = routes
        self.interval = interval
        self.size = size
        self.sent: dict[tuple[str, str, str], dict[str, bytes]] = {
            (d.name, p, c): {} for d, p, c in routes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            for d, peer, ch in self.routes:
                name = f"t-{d.name}-{n:05d}.bin"
                data = os.urandom(self.size)
                d.drop(peer, ch, name, data)
                self.sent[(d.name, peer, ch)][name] = data
            n += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def expected(self, sender: Any, peer: str, ch: str) -> dict[str, bytes]:
        return dict(self.sent[(sender.name, peer, ch)])

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.sent.values())
