"""TLSStream: a trio Stream over a pyOpenSSL `Connection` with memory BIOs.

Theory of operation (the shape of trio's `SSLStream` around `ssl.SSLObject`;
read the long comment at the top of trio's `_ssl.py` for the why):

* The `Connection` is sans-IO. Each of its calls (`do_handshake`, `recv`,
  `send`, `shutdown`) may append bytes to the outgoing BIO, consume bytes from
  the incoming BIO, and raise `WantReadError` when it needs more bytes from
  the peer. After `WantReadError` the *same* call must be retried later with
  the same data (pyOpenSSL sets ACCEPT_MOVING_WRITE_BUFFER, so an equal buffer
  at another address is fine). Writes to a memory BIO never fail, so
  `WantWriteError` cannot happen.
* `_retry(fn)` turns one such call into an async operation: call it (never
  awaiting while touching the Connection), then do exactly *one* thing that
  makes progress - send what the Connection produced (under a StrictFIFOLock,
  so bytes hit the wire in the order they left the BIO), or else, if it wants
  input, receive once from the transport (under a lock, with a counter so that
  a task that waited for another task's receive re-tries instead of reading
  again) - and loop.
* One task may send while another receives (full duplex); a second concurrent
  sender or receiver is a caller bug (trio.BusyResourceError).
* TLS 1.3 only (the context enforces it): no renegotiation, so after the
  handshake a write never needs to read. A read may need to write (a
  KeyUpdate answer, an alert); `_retry` handles both anyway.
* Receiving in bulk: one `receive_some(n)` (or `receive_into` a buffer of n
  bytes, which the caller may reuse) reads the transport once for up to n bytes
  plus their records' overhead (headers and tags), and decrypts every whole
  record of it into *one* buffer, a record (one SSL_read) at a time with
  `recv_into`: no per-record allocation of n bytes and no join. So a large n
  (the session reader asks for 256 KiB) costs one trip through the event loop
  per n bytes, not one per 64 KiB (trio's default transport read).
* End of stream: a close_notify from the peer makes `receive_some` return
  b"" (and keep returning it); the transport's EOF without a close_notify is
  a truncation attack as far as we know, so it raises BrokenResourceError.
  `send_eof()` sends our close_notify and keeps receiving (TLS 1.3 closes each
  direction separately); `aclose()` sends it (best effort, without waiting for
  the peer's) and closes the transport.
* Any TLS error, or a cancelled send (some unknown part of a record may be on
  the wire), breaks the stream for good: BrokenResourceError from a
  `TLSError` whose text is OpenSSL's reason in plain words.
* The server's TLS 1.3 NewSessionTicket messages (pyOpenSSL cannot turn them
  off; they are useless to the client as the session cache is off, see tls.py)
  are held back and sent with the server's first write, as trio does: sent at
  the end of the handshake they can deadlock against a client that writes
  first over an unbuffered transport.

Size: over 400 lines on purpose: one stream object whose send, receive,
handshake and close paths share the Connection, its locks and its state.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar, TypeVarTuple

import trio
from OpenSSL import SSL

from ..errors import TLSError as TLSError  # re-exported

try:    # pyOpenSSL's cffi bindings (private): SSL_read into our own buffer, see _read_into
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL that moved them: the public path
    _ffi = _lib = None

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

DEFAULT_RECEIVE_SIZE = 64 * 1024
_BIO_READ_SIZE = 512 * 1024
TLS_RECORD = 16 * 1024          # the most plaintext one TLS record (one SSL_read) carries
RECORD_OVERHEAD = 22            # what TLS 1.3 adds to a record: header, content type, AEAD tag
# Call pyOpenSSL's cffi bindings directly where its public API allocates or copies more
# (SSL_read into our buffer, the outgoing BIO's length): the default when the bindings are
# where we expect them. False: only the public API (recv_into, bio_read until WantRead).
USE_BINDINGS = _lib is not None and hasattr(SSL.Connection, "_raise_ssl_error")


EOF_WITHOUT_CLOSE_NOTIFY = "peer closed the connection without close_notify"




def describe_openssl_error(exc: BaseException) -> str:
    """OpenSSL's reasons as plain words: 'certificate verify failed', not a list of tuples."""
    if isinstance(exc, SSL.SysCallError):
        code = exc.args[0] if exc.args else None
        if code in (-1, 0):
            return EOF_WITHOUT_CLOSE_NOTIFY
        return f"system error: {exc.args[1] if len(exc.args) > 1 else exc}"
    reasons: list[str] = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(item, tuple) and item:
            text = str(item[-1])
            if text and text not in reasons:
                reasons.append(text)
    if not reasons:
        return str(exc) or type(exc).__name__
    text = "; ".join(reasons)
    if text == "unexpected eof while reading":
        return EOF_WITHOUT_CLOSE_NOTIFY
    for alert, meaning in _ALERTS.items():
        if alert in text:
            return f"{text}: {meaning}"
    return text


# Alerts the peer sends when it refuses us: what each says about our side (OpenSSL's
# own words are about the protocol, and read as if the fault were ours to find here)
_ALERTS = {
    "alert unknown ca": "the peer does not trust the CA that issued our certificate "
                        "(its [tls].ca is not ours): both sites need the link's CA",
    "alert certificate revoked": "the peer's CRL revokes our certificate: issue a new one",
    "alert certificate expired": "the peer finds our certificate expired (or its clock is "
                                 "off): renew it",
    "alert bad certificate": "the peer refused our certificate; its log (tls_refused) "
                             "says why",
    "alert certificate unknown": "the peer refused our certificate; its log (tls_refused) "
                                 "says why",
    "alert internal error": "the peer refused the session, e.g. our certificate names "
                            "another node than the one it expects here; its log "
                            "(tls_refused) says why",
    "alert access denied": "the peer refused the session; its log (tls_refused) says why",
}


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over `transport_stream`, driven by an `OpenSSL.SSL.Connection` on memory BIOs.

    `app_data` is attached to the Connection (`connection.get_app_data()`): the
    verify callback of the context finds its per-connection state there.
    """

    def __init__(self, transport_stream: trio.abc.Stream, context: SSL.Context, *,
                 server_side: bool = False, server_hostname: str | None = None,
                 app_data: object = None) -> None:
        self.transport_stream = transport_stream
        self.server_side = server_side
        conn = SSL.Connection(context, None)
        if app_data is not None:
            conn.set_app_data(app_data)
        if server_side:
            conn.set_accept_state()
        else:
            if server_hostname:
                conn.set_tlsext_host_name(server_hostname.encode("idna"))
            conn.set_connect_state()
        self._conn = conn
        self._state = _State.OK
        self._handshake_lock = trio.Lock()
        self._handshook = False
        self._delayed_outgoing = b""
        self._sent_close_notify = False
        self._inner_send_lock = trio.StrictFIFOLock()
        self._inner_recv_lock = trio.Lock()
        self._inner_recv_count = 0
        self._transport_receive_size = DEFAULT_RECEIVE_SIZE
        # Bulk reads from a socket go into one buffer kept for the stream (bio_write copies
        # out of it), not a new bytes object per read: see _receive_transport.
        self._socket = transport_stream.socket \
            if isinstance(transport_stream, trio.SocketStream) else None
        self._transport_buffer: memoryview | None = None
        self._outer_send = _ConflictDetector("another task is sending on this TLSStream")
        self._outer_recv = _ConflictDetector("another task is receiving on this TLSStream")

    # -- information --------------------------------------------------------------

    @property
    def connection(self) -> SSL.Connection:
        return self._conn

    def version(self) -> str | None:
        return self._conn.get_protocol_version_name() if self._handshook else None

    def cipher(self) -> str | None:
        return self._conn.get_cipher_name() if self._handshook else None

    def group(self) -> str | None:
        """The negotiated key exchange group, e.g. "X25519MLKEM768"."""
        return self._conn.get_group_name() if self._handshook else None

    def peer_certificate_der(self) -> bytes | None:
        if not self._handshook:
            return None
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding
        return cert.public_bytes(Encoding.DER)

    # -- the engine ---------------------------------------------------------------

    def _check_status(self) -> None:
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("the TLS stream is broken")
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the TLS stream is closed")

    def _drain_outgoing(self) -> bytes:
        if USE_BINDINGS:
            # What the memory BIO holds (BIO_get_mem_data is its length): most calls
            # find nothing, and a read of exactly that much needs no second call.
            pending = _lib.BIO_get_mem_data(self._conn._from_ssl, _ffi.NULL)
            return self._conn.bio_read(pending) if pending > 0 else b""
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(self._conn.bio_read(_BIO_READ_SIZE))
            except SSL.WantReadError:
                break
        return b"".join(chunks)

    async def _retry(self, fn: Callable[[*Ts], T], *args: *Ts,
                     ignore_want_read: bool = False, is_handshake: bool = False) -> T | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        finished = False
        ret: T | None = None
        while not finished:
            # 1) touch the Connection without awaiting
            want_read = False
            try:
                ret = fn(*args)
            except SSL.WantReadError:
                want_read = True
            except SSL.Error as exc:
                self._state = _State.BROKEN
                # An alert may be waiting in the BIO: tell the peer why, best effort.
                alert = self._drain_outgoing()
                if alert and not self._inner_send_lock.locked():
                    with trio.move_on_after(1), _suppress_transport_errors():
                        async with self._inner_send_lock:
                            await self.transport_stream.send_all(alert)
                reason = describe_openssl_error(exc)
                raise trio.BrokenResourceError(reason) from TLSError(reason)
            else:
                finished = True
            if ignore_want_read:
                want_read = False
                finished = True
            to_send = self._drain_outgoing()
            if is_handshake and finished and self.server_side:
                # Tickets written at the end of the server's handshake: hold them back.
                self._delayed_outgoing += to_send
                to_send = b""
            # 2) exactly one thing that makes progress
            if to_send:
                async with self._inner_send_lock:   # strict FIFO: wire order = BIO order
                    yielded = True
                    if self._delayed_outgoing:
                        to_send = self._delayed_outgoing + to_send
                        self._delayed_outgoing = b""
                    try:
                        await self.transport_stream.send_all(to_send)
                    except BaseException:
                        self._state = _State.BROKEN   # some unknown part went out
                        raise
            elif want_read:
                count = self._inner_recv_count
                async with self._inner_recv_lock:
                    yielded = True
                    if count == self._inner_recv_count:
                        data = await self._receive_transport()
                        if data:
                            self._conn.bio_write(data)
                        else:
                            self._conn.bio_shutdown()
                        self._inner_recv_count += 1
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return ret

    async def _receive_transport(self) -> bytes | bytearray | memoryview:
        """One read from the transport, of up to `_transport_receive_size` bytes."""
        size = self._transport_receive_size
        if self._socket is None or size <= DEFAULT_RECEIVE_SIZE:
            return await self.transport_stream.receive_some(size)
        # A bulk read straight from the socket into a buffer reused for every read: a
        # socket's receive_some allocates `size` bytes per read (and shrinks them), which
        # churned ~256 KiB blocks through malloc at every read of a transfer.
        if self._transport_buffer is None or len(self._transport_buffer) < size:
            self._transport_buffer = memoryview(bytearray(size))
        view = self._transport_buffer[:size]
        try:
            got = await self._socket.recv_into(view)
        except OSError as exc:      # as trio.SocketStream.receive_some translates them
            if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        return view[:got]

    # -- handshake ----------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Complete the handshake (once; concurrent callers wait for the first).

        Cancelled half-way, the stream is broken."""
        self._check_status()
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        async with self._handshake_lock:
            if self._handshook:
                return
            self._check_status()
            try:
                await self._retry(self._conn.do_handshake, is_handshake=True)
            except BaseException:
                self._state = _State.BROKEN
                raise
            self._handshook = True

    async def _ensure_handshake(self) -> None:
        if not self._handshook:
            await self.do_handshake()

    # -- receiving ----------------------------------------------------------------

    def _read_into(self, view: memoryview) -> int:
        """Decrypt every record already decryptable into `view`, a record (one SSL_read)
        at a time; 0 after close_notify. WantReadError (for `_retry`) while none is."""
        conn = self._conn
        if not USE_BINDINGS:
            try:
                got = conn.recv_into(view, min(len(view), TLS_RECORD))
            except SSL.ZeroReturnError:
                return 0
            while got < len(view):
                try:
                    got += conn.recv_into(view[got:], min(len(view) - got, TLS_RECORD))
                except SSL.Error:
                    break   # WantRead, close_notify or an error: the next call meets it again
            return got
        # SSL_read straight into `view` through pyOpenSSL's own bindings: recv_into
        # decrypts into a scratch buffer it allocates per call and copies that over,
        # which costs more than the decryption.
        ssl = conn._ssl
        got = 0
        with _ffi.from_buffer(view, require_writable=True) as ptr:
            while got < len(view):
                n = _lib.SSL_read(ssl, ptr + got, min(len(view) - got, TLS_RECORD))
                if n > 0:
                    got += n
                    continue
                if got and _lib.SSL_get_error(ssl, n) == _lib.SSL_ERROR_WANT_READ:
                    break   # the usual end of a bulk read: no exception for it
                try:
                    conn._raise_ssl_error(ssl, n)
                except SSL.ZeroReturnError:
                    if not got:
                        return 0
                except SSL.Error:
                    if not got:
                        raise
                break       # as above: the next call meets it again
        return got

    async def _receive(self, view: memoryview) -> int:
        with self._outer_recv:
            self._check_status()
            await self._ensure_handshake()
            # One transport read for all of it: the bytes and their records' overhead (not
            # a record more: a whole record left in the BIO would make the next receive
            # return just that record).
            records = -(-len(view) // TLS_RECORD)
            self._transport_receive_size = max(len(view) + records * RECORD_OVERHEAD,
                                               DEFAULT_RECEIVE_SIZE)
            got = await self._retry(self._read_into, view)
            assert got is not None
            return got

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        buf = bytearray(max_bytes)
        with memoryview(buf) as view:
            got = await self._receive(view)
        del buf[got:]
        return buf

    async def receive_into(self, buffer: bytearray | memoryview) -> int:
        """Like `receive_some(len(buffer))`, into the caller's buffer (which it may
        reuse): the bytes received, 0 at the end of the stream (close_notify)."""
        with memoryview(buffer) as view:
            if not view:
                raise ValueError("receive_into needs a buffer of at least one byte")
            return await self._receive(view)

    # -- sending ------------------------------------------------------------------

    def _write(self, view: memoryview) -> int:
        """Encrypt as much of `view` as the Connection takes now, into the BIO.

        pyOpenSSL sets ENABLE_PARTIAL_WRITE, so one SSL_write encrypts one record
        (16 KiB): loop here, so that a 256 KiB send_all is one transport write, not 16.
        WantReadError after some bytes went in just ends the batch (they are
        committed); before any, it propagates and `_retry` waits for input."""
        done = self._conn.send(view)
        while done < len(view):
            try:
                done += self._conn.send(view[done:])
            except SSL.WantReadError:
                break
        return done

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._outer_send:
            self._check_status()
            if self._sent_close_notify:
                raise trio.ClosedResourceError("send_eof() was called: no more sending")
            await self._ensure_handshake()
            view = memoryview(data)
            if not view:
                await trio.lowlevel.checkpoint()
                return
            while view:
                sent = await self._retry(self._write, view)
                assert sent is not None
                view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        with self._outer_send:
            self._check_status()
            async with self._inner_send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify; receiving goes on (TLS 1.3 closes each direction on its own)."""
        with self._outer_send:
            self._check_status()
            await self._ensure_handshake()
            if self._sent_close_notify:
                await trio.lowlevel.checkpoint()
                return
            self._sent_close_notify = True
            await self._retry(self._conn.shutdown, ignore_want_read=True)

    # -- closing ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send close_notify (without waiting for the peer's) and close the transport.

        A broken or never-handshaken stream just closes the transport."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        if self._state is _State.BROKEN or not self._handshook or self._sent_close_notify:
            self._state = _State.CLOSED
            await self.transport_stream.aclose()
            return
        try:
            with _suppress_transport_errors():
                self._sent_close_notify = True
                await self._retry(self._conn.shutdown, ignore_want_read=True)
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        else:
            await self.transport_stream.aclose()
        finally:
            self._state = _State.CLOSED


class _suppress_transport_errors:
    """The peer may have closed first; a failed close_notify is not an error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        return kind is not None and issubclass(
            kind, trio.BrokenResourceError | trio.BusyResourceError | trio.ClosedResourceError)


class _ConflictDetector:
    """Raise BusyResourceError when two tasks use one direction at once (a caller bug)."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False
