"""A counting SMTP sink for large-message tests, and a helper that streams one through."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass

from .ports import LOOPBACK
from .proxy import ProxyProcess
from .smtpclient import RawSMTP, Reply


@dataclass
class SinkMessage:
    length: int  # body octets before the final ".\r\n" (as on the wire)
    head: bytes  # the first 64 KiB
    tail: bytes  # the last 64 octets


class CountingSink:
    """A minimal SMTP server that counts message bytes instead of keeping them, so a 60 MB
    message costs the test process nothing."""

    HEAD = 65536

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(0.2)  # lets the accept loop notice stop()
        self.port: int = self.listener.getsockname()[1]
        self.messages: list[SinkMessage] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []

    def start(self) -> CountingSink:
        thread = threading.Thread(target=self._accept_loop, name="core-sink", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        self.listener.close()

    def wait_for_messages(self, n: int, timeout: float = 60) -> list[SinkMessage]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, timeout):
                raise AssertionError(f"sink: {len(self.messages)} of {n} messages after "
                                     f"{timeout}s")
            return list(self.messages)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._conns.append(conn)
            thread = threading.Thread(target=self._session, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _session(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"220 sink.test ESMTP\r\n")
            buffer = b""
            while not self._stop.is_set():
                while b"\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                line, _, buffer = buffer.partition(b"\n")
                verb = line.strip().split(b" ", 1)[0].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250 SIZE 500000000\r\n")
                elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    conn.sendall(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 bye\r\n")
                    return
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    message, buffer = self._read_body(conn, buffer)
                    with self._cond:
                        self.messages.append(message)
                        self._cond.notify_all()
                    conn.sendall(b"250 2.0.0 counted\r\n")
                else:
                    conn.sendall(b"502 5.5.2 not here\r\n")

    def _read_body(self, conn: socket.socket, pending: bytes) -> tuple[SinkMessage, bytes]:
        head = bytearray()
        total = 0  # stream octets before the current chunk
        recent = b""  # the last 68 of them: the terminator may span reads, and the tail
        chunk = pending
        while True:
            if chunk:
                window = recent + chunk
                end = window.find(b"\r\n.\r\n")
                if end >= 0:
                    length = total - len(recent) + end + 2
                    if len(head) < self.HEAD:
                        head += chunk[: self.HEAD - len(head)]
                    body_end = window[: end + 2]
                    return (SinkMessage(length, bytes(head[:length]), body_end[-64:]),
                            window[end + 5 :])
                if len(head) < self.HEAD:
                    head += chunk[: self.HEAD - len(head)]
                total += len(chunk)
                recent = window[-68:]
            chunk = conn.recv(1 << 20)
            if not chunk:
                raise ConnectionError("sink: connection closed during DATA")


def stream_message(proxy: ProxyProcess, header: bytes, block: bytes, blocks: int) -> Reply:
    with RawSMTP(timeout=60) as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        size = len(header) + len(block) * blocks
        assert client.cmd(f"MAIL FROM:<big@example.org> SIZE={size}").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(header)
        for _ in range(blocks):
            client.send(block)
        client.send(b".\r\n")
        reply = client.read_reply()
        client.cmd("QUIT")
    return reply
