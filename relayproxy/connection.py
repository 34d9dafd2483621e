"""Buffered byte I/O for one inbound connection, as an asyncio Protocol.

The session reads command lines and, in DATA, whole chunks; after the end of data it must give
back the bytes that followed the dot (pipelined commands), and after STARTTLS it must throw away
whatever plaintext was pipelined behind the command (RFC 3207 4.2). StreamReader offers neither
without reaching into its internals, so this small protocol owns the buffer itself.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import cast

# Reading pauses when this much is buffered, and DATA is taken from the buffer whole, so
# an inbound connection holds at most a few hundred KB whatever the message size.
MAX_BUFFER = 64 * 1024
CLOSE_FLUSH_TIMEOUT = 5.0  # seconds a closing connection may take to flush its last replies


class LineTooLong(Exception):
    """A command line exceeded the limit; it has been consumed through its line end."""


class ClientConnection(asyncio.Protocol):
    def __init__(self, on_made: Callable[[ClientConnection], None]) -> None:
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._scanned = 0  # how much of _buf is known to hold no LF
        self._overlong = False  # the line being read is over the limit, and being dropped
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.peer: tuple[str, int] = ("", 0)

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small replies must not wait for a delayed ACK (Nagle): ~40 ms per message.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self._on_made(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_BUFFER and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Keep our side open: the commands before the client's EOF still get their replies,
        # and the session closes the connection when it has read everything.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        if self._drain_waiter and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain_waiter and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # reading

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait_data(self) -> None:
        if self._eof:
            raise ConnectionResetError("client closed the connection")
        if self._paused_reading and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _consumed(self) -> None:
        if self._paused_reading and len(self._buf) <= MAX_BUFFER // 2 and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()

    async def talks_within(self, seconds: float) -> bool:
        """Did the client send anything (or close) within seconds? Nothing is consumed."""
        if self._buf or self._eof:
            return True
        try:
            async with asyncio.timeout(seconds):
                await self._wait_data()
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def take_line(self, limit: int) -> bytes | None:
        """The next buffered line including its LF, or None if no whole line is buffered yet.

        Raises LineTooLong, once the line has been consumed, when it exceeds limit; nothing of
        an overlong line is kept meanwhile.
        """
        idx = self._buf.find(b"\n", self._scanned)
        if idx < 0:
            if len(self._buf) > limit:
                self._overlong = True
                self._buf.clear()
            self._scanned = len(self._buf)
            return None
        line = bytes(self._buf[: idx + 1])
        del self._buf[: idx + 1]
        self._scanned = 0
        self._consumed()
        if self._overlong or len(line) > limit:
            self._overlong = False
            raise LineTooLong
        return line

    async def readline(self, limit: int) -> bytes:
        while (line := self.take_line(limit)) is None:
            await self._wait_data()
        return line

    # exact reads, for the PROXY protocol header that comes before any SMTP line

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._wait_data()
        return self._take(n)

    async def read_some(self, n: int) -> bytes:
        """1 to n buffered bytes."""
        while not self._buf:
            await self._wait_data()
        return self._take(n)

    async def read_until(self, separator: bytes, limit: int) -> bytes:
        """Bytes through separator; ValueError once more than limit bytes hold none."""
        while (idx := self._buf.find(separator)) < 0 or idx + len(separator) > limit:
            if len(self._buf) > limit or idx >= 0:
                raise ValueError(f"no {separator!r} within {limit} bytes")
            await self._wait_data()
        return self._take(idx + len(separator))

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._scanned = 0
        self._consumed()
        return data

    @property
    def writing_paused(self) -> bool:
        return self._paused_writing

    async def read_chunk(self, limit: int = 0) -> bytes:
        """Whatever is buffered (at least one byte), or its first limit bytes; raises
        ConnectionResetError at EOF."""
        while not self._buf:
            await self._wait_data()
        if limit and len(self._buf) > limit:
            return self._take(limit)
        data = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        self._consumed()
        return data

    def unread(self, data: bytes) -> None:
        if data:
            self._buf[:0] = data
            self._scanned = 0

    def discard_buffered(self) -> int:
        n = len(self._buf)
        self._buf.clear()
        self._scanned = 0
        return n

    # writing

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self._paused_writing and self.transport and not self.transport.is_closing():
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """Switch to TLS. Anything buffered now is plaintext sent before the handshake."""
        assert self.transport is not None
        # RFC 3207 4.2: drop the plaintext pipelined behind STARTTLS. This one clear is enough:
        # loop.start_tls pauses reading and puts its TLS protocol in front of this one before
        # its first await, so no plaintext can reach the buffer after it. Whatever arrives
        # while the handshake completes is decrypted and is the client's, to be kept: with the
        # stdlib loop, a command sent together with the client's Finished is delivered before
        # start_tls returns, and clearing again would lose it (the client then waits forever).
        self.discard_buffered()
        loop = asyncio.get_running_loop()
        new_transport = await loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        if new_transport is None:
            raise ConnectionResetError("TLS handshake failed")
        self.transport = new_transport

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            if transport.get_write_buffer_size():
                # close() waits to flush; a client that never reads would keep it open forever
                asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT, transport.abort)
