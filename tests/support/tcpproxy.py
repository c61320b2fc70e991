"""Small user-space TCP proxies (threads) for fault tests, with one accept loop.

`Proxy` counts, holds and cuts the bytes:

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

`DelayProxy` adds latency and cuts connections mid-stream:

    proxy = DelayProxy(upstream_port, delay=0.2)   # every byte arrives 200 ms late, each way
    proxy.address                                  # "127.0.0.1:PORT" for the dialling side
    proxy.cut_after("up", 123_456)                 # forward 123,456 more client->server bytes,
                                                   # then reset both sides, mid-frame
    proxy.cuts, proxy.connections
    proxy.close()

Each direction of a connection has a reader thread (stamps chunks with their
due time into a queue, bounded to MAX_BUFFERED bytes so the sender feels TCP
back-pressure) and a writer thread (sleeps until a chunk is due, forwards it).
A cut writes exactly the bytes allowed, then closes both sockets with SO_LINGER
0: each daemon sees a TCP reset, most likely inside a TLS record and a frame.

Both share `_Listener`: bind 127.0.0.1:0, accept, dial the upstream (a
connection it cannot reach is reset), TCP_NODELAY both ways, count, and hand
the pair to the subclass's `_serve`.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time

MAX_BUFFERED = 8 << 20


def _reset(sock: socket.socket, shutdown: bool = True) -> None:
    """Close with a TCP reset (SO_LINGER 0). `shutdown` first wakes a thread blocked
    in recv() on it (Proxy's pumps); DelayProxy's threads watch their own flag."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    if shutdown:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        sock.close()
    except OSError:
        pass


class _Listener:
    """The accept loop both proxies share (see the module docstring)."""

    shutdown_on_reset = True     # _reset's `shutdown` for a connection refused here

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.lock = threading.Lock()
        self.connections = 0         # connections accepted (and connected upstream) so far
        self._closed = False
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _refusing(self) -> bool:
        """True: reset a new connection at once (the link stays down)."""
        return False

    def _serve(self, client: socket.socket, server: socket.socket) -> None:
        """Forward between the pair; called with `self.lock` held."""
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._refusing():
                _reset(client, self.shutdown_on_reset)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client, self.shutdown_on_reset)
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                self._serve(client, server)

    def _close_listener(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)     # wakes the accept thread
        except OSError:
            pass
        try:
            self.listener.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- Proxy


class Proxy(_Listener):
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.up_bytes = 0            # client -> server (sender -> receiver when alpha dials)
        self.down_bytes = 0          # server -> client
        self.held_bytes = 0          # server -> client bytes swallowed while holding
        self.hold_down = False
        self.refuse = False          # True: accept and close at once (link stays down)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        super().__init__(upstream_port, upstream_host)

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
        self._close_listener()
        self.cut()

    # -- pumps -----------------------------------------------------------------

    def _refusing(self) -> bool:
        return self.refuse

    def _serve(self, client: socket.socket, server: socket.socket) -> None:
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


# --------------------------------------------------------------------------- DelayProxy


class _Conn:
    def __init__(self, proxy: DelayProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client, self.server = client, server
        self.closed = threading.Event()
        self._lock = threading.Lock()
        for name, src, dst in (("up", client, server), ("down", server, client)):
            d = _Direction(self, name, src, dst)
            threading.Thread(target=d.reader, daemon=True, name=f"proxy-{name}-r").start()
            threading.Thread(target=d.writer, daemon=True, name=f"proxy-{name}-w").start()

    def reset(self) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        _reset(self.client, shutdown=False)
        _reset(self.server, shutdown=False)


class _Direction:
    def __init__(self, conn: _Conn, name: str, src: socket.socket, dst: socket.socket) -> None:
        self.conn, self.name, self.src, self.dst = conn, name, src, dst
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.cv = threading.Condition()

    def reader(self) -> None:
        while not self.conn.closed.is_set():
            try:
                data = self.src.recv(65536)
            except OSError:
                data = b""
            with self.cv:
                while self.buffered > MAX_BUFFERED and not self.conn.closed.is_set():
                    self.cv.wait(0.1)
                self.queue.append((time.monotonic() + self.conn.proxy.delay, data))
                self.buffered += len(data)
                self.cv.notify_all()
            if not data:
                return

    def writer(self) -> None:
        proxy = self.conn.proxy
        while True:
            with self.cv:
                while not self.queue and not self.conn.closed.is_set():
                    self.cv.wait(0.1)
                if self.conn.closed.is_set():
                    return
                due, data = self.queue.popleft()
                self.buffered -= len(data)
                self.cv.notify_all()
            wait = due - time.monotonic()
            if wait > 0 and self.conn.closed.wait(wait):
                return
            if not data:                      # EOF from src: pass it on, as TCP would
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            cut = False
            with proxy.lock:
                left = proxy._cut.get(self.name)
                if left is not None:
                    if len(data) >= left:
                        data, cut = data[:left], True
                        del proxy._cut[self.name]
                    else:
                        proxy._cut[self.name] = left - len(data)
                proxy.bytes[self.name] += len(data)
            try:
                if data:
                    self.dst.sendall(data)
            except OSError:
                self.conn.reset()
                return
            if cut:
                self.conn.reset()
                with proxy.lock:
                    proxy.cuts += 1
                return


class DelayProxy(_Listener):
    shutdown_on_reset = False

    def __init__(self, upstream_port: int, delay: float = 0.0,
                 upstream_host: str = "127.0.0.1") -> None:
        self.delay = delay
        self.cuts = 0
        self.bytes = {"up": 0, "down": 0}
        self._cut: dict[str, int] = {}
        self._conns: list[_Conn] = []
        super().__init__(upstream_port, upstream_host)

    def cut_after(self, direction: str, nbytes: int) -> None:
        """Reset the connection once `nbytes` more bytes went `direction` ("up" is
        client -> server, i.e. from the dialling daemon)."""
        assert direction in ("up", "down")
        with self.lock:
            self._cut[direction] = nbytes

    def pending_cut(self) -> bool:
        with self.lock:
            return bool(self._cut)

    def cancel_cuts(self) -> None:
        with self.lock:
            self._cut.clear()

    def _serve(self, client: socket.socket, server: socket.socket) -> None:
        self._conns.append(_Conn(self, client, server))

    def close(self) -> None:
        self._close_listener()
        with self.lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.reset()
