"""A small user-space TCP proxy for fault tests: count, hold and cut the bytes.

    proxy = Proxy(upstream_port)          # listens on 127.0.0.1:proxy.port
    proxy.hold_down = True                # from now on, server->client bytes are held back
    proxy.cut()                           # close every open connection (held bytes are lost)
    proxy.up_bytes, proxy.down_bytes      # bytes forwarded client->server / server->client
    proxy.close()

Each accepted connection gets two pump threads (one per direction), so a
stalled direction never blocks the other. `cut()` shuts both sockets down with
a TCP reset (SO_LINGER 0), which both peers see at once, like a broken link.
`hold_down` applies to connections open when it is set and to later ones,
until it is cleared (`cut()` leaves it as it is).
"""

from __future__ import annotations

import socket
import struct
import threading


class Proxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.up_bytes = 0            # client -> server (sender -> receiver when alpha dials)
        self.down_bytes = 0          # server -> client
        self.held_bytes = 0          # server -> client bytes swallowed while holding
        self.connections = 0         # connections accepted so far
        self.hold_down = False
        self.refuse = False          # True: accept and close at once (link stays down)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- control ---------------------------------------------------------------

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut."""
        with self.lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                _reset(s)
        return len(pairs)

    def open_connections(self) -> int:
        with self.lock:
            return len(self._pairs)

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        self.cut()

    # -- pumps -----------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True,
                             name="proxy-up").start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True,
                             name="proxy-down").start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    break
                if not up and self.hold_down:
                    with self.lock:
                        self.held_bytes += len(data)
                    continue
                dst.sendall(data)
                with self.lock:
                    if up:
                        self.up_bytes += len(data)
                    else:
                        self.down_bytes += len(data)
        except OSError:
            pass
        finally:
            # One direction ended: end the whole connection (like a real broken link).
            with self.lock:
                self._pairs = [p for p in self._pairs if src not in p]
            _reset(src)
            _reset(dst)


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
