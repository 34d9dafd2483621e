"""STARTTLS under both event loops the proxy can run on (RELAYPROXY_EVENT_LOOP).

The loops differ in when decrypted data reaches the protocol: the stdlib one delivers
application data that arrived together with the client's Finished before loop.start_tls()
returns. A TLS 1.3 client may well send its first command in that same segment, so the tests
drive the client handshake through ssl.MemoryBIO and decide what goes into each send().
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.smtpclient import RawSMTP, Reply

LOOPS = ("uvloop", "asyncio")
TIMEOUT = 5.0  # seconds for any one reply; the proxy answers these locally, at once


class TLSOverBIO:
    """A TLS client over a connected socket, with the record layer in memory BIOs.

    It has the recv/sendall/close of a socket, so RawSMTP can speak through it. Nothing is
    sent behind the caller's back: after handshake() the client's last flight (its Finished)
    is still pending, and goes out in the same send() as the first command.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._incoming, self._outgoing,
                                    server_hostname="proxy.test")
        self._deadline = time.monotonic() + timeout

    @property
    def unsent(self) -> int:
        return self._outgoing.pending

    def handshake(self) -> None:
        self._deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                pass
            self._flush()
            if not self._receive():
                raise ConnectionError("the proxy closed the connection in the handshake")

    def _flush(self) -> None:
        if self._outgoing.pending:
            self.sock.sendall(self._outgoing.read())

    def _receive(self) -> bool:
        """Feed one recv() into the TLS object; False at EOF. TimeoutError past the deadline
        of the last send, so a reply that never comes fails within self.timeout."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing from the proxy within {self.timeout}s")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            return False
        self._incoming.write(data)
        return True

    # the socket interface RawSMTP uses

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()  # with whatever the handshake left pending: one send, one segment
        self._deadline = time.monotonic() + self.timeout

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                # e.g. only a TLS 1.3 session ticket so far
                if not self._receive():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def close(self) -> None:
        self.sock.close()


def tls13_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed, and the certificate is not the point
    return context


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls-loops")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=proxy.test", "-days", "1", "-keyout", str(key), "-out",
         str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def downstream() -> Iterator[ScriptedDownstream]:
    server = ScriptedDownstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=LOOPS)
def tls_proxy(
    request: pytest.FixtureRequest,
    tls_files: tuple[Path, Path],
    downstream: ScriptedDownstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    loop: str = request.param
    cert, key = tls_files
    config = base_config(downstream.port, tls={"cert": str(cert), "key": str(key)})
    with ProxyProcess(config, workdir=tmp_path_factory.mktemp(f"proxy-{loop}"),
                      env={"RELAYPROXY_EVENT_LOOP": loop}) as proxy:
        # Otherwise a loop that was not switched would pass for the one under test.
        proxy.wait_for_log(f"event loop: {loop}")
        yield proxy


def greet_and_starttls(proxy: ProxyProcess, client: RawSMTP, pipelined: bytes = b"") -> None:
    """Greeting, EHLO, STARTTLS (with ``pipelined`` in the same write) up to its 220."""
    greeting = client.connect(proxy.host, proxy.port)
    assert greeting is not None and greeting.code == 220, greeting
    ehlo = client.ehlo()
    assert ehlo.code == 250 and "STARTTLS" in ehlo.extensions, ehlo
    client.send(b"STARTTLS\r\n" + pipelined)
    reply = client.read_reply()
    assert (reply.code, reply.enhanced) == (220, "2.0.0"), reply
    # Anything already buffered would be plaintext the proxy sent after its 220.
    assert client._buffer == b"", client._buffer


def tls_over_bio(proxy: ProxyProcess, client: RawSMTP) -> TLSOverBIO:
    """Handshake TLS 1.3 up to the client's Finished, which is left unsent; RawSMTP then
    speaks through it."""
    assert client.sock is not None
    tls = TLSOverBIO(client.sock, tls13_context(), TIMEOUT)
    tls.handshake()
    assert tls.tls.version() == "TLSv1.3", tls.tls.version()
    assert tls.unsent, "the client's Finished should still be waiting to be sent"
    client.sock = cast(socket.socket, tls)
    return tls


def first_reply(proxy: ProxyProcess, client: RawSMTP, line: str, what: str) -> Reply:
    try:
        return client.cmd(line)
    except TimeoutError:
        pytest.fail(f"no reply to {line!r} within {TIMEOUT}s: {what}\n"
                    f"--- proxy log tail ---\n{proxy.log_tail()}", pytrace=False)


def test_command_in_the_segment_of_the_client_finished_is_answered(
    tls_proxy: ProxyProcess,
) -> None:
    with RawSMTP(timeout=TIMEOUT) as client:
        greet_and_starttls(tls_proxy, client)
        tls_over_bio(tls_proxy, client)
        # One send: the client's Finished and the encrypted EHLO right behind it.
        ehlo = first_reply(tls_proxy, client, "EHLO x",
                           "the EHLO sent with the client's Finished was dropped")
        assert ehlo.code == 250 and ehlo.lines[0] == "proxy.test", ehlo
        assert "STARTTLS" not in ehlo.extensions, ehlo
        assert (client.cmd("NOOP").code, client.cmd("QUIT").code) == (250, 221)


def test_plaintext_pipelined_with_starttls_is_discarded(tls_proxy: ProxyProcess) -> None:
    with RawSMTP(timeout=TIMEOUT) as client:
        # RFC 3207 4.2: the MAIL came in clear, in the write of the STARTTLS itself.
        greet_and_starttls(tls_proxy, client, b"MAIL FROM:<injected@example.org>\r\n")
        tls_over_bio(tls_proxy, client)
        ehlo = first_reply(tls_proxy, client, "EHLO x",
                           "the EHLO sent with the client's Finished was dropped")
        # Had the injected MAIL been kept, its reply (503: no EHLO yet) would come first.
        assert ehlo.code == 250 and ehlo.lines[0] == "proxy.test", ehlo
        # Nor did it open a transaction.
        rcpt = client.cmd("RCPT TO:<alice@relay.test>")
        assert (rcpt.code, rcpt.enhanced) == (503, "5.5.1"), rcpt
        assert client.cmd("QUIT").code == 221


def test_ordinary_tls13_client(tls_proxy: ProxyProcess) -> None:
    """The usual order: the handshake completes, then the first command in its own write."""
    with RawSMTP(timeout=TIMEOUT) as client:
        greet_and_starttls(tls_proxy, client)
        assert client.sock is not None
        client.sock = tls13_context().wrap_socket(client.sock, server_hostname="proxy.test")
        ehlo = first_reply(tls_proxy, client, "EHLO x", "the session hangs after STARTTLS")
        assert ehlo.code == 250 and ehlo.lines[0] == "proxy.test", ehlo
        assert client.cmd("QUIT").code == 221


def test_unknown_event_loop_is_refused(
    downstream: ScriptedDownstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    proxy = ProxyProcess(base_config(downstream.port), env={"RELAYPROXY_EVENT_LOOP": "tokio"},
                         workdir=tmp_path_factory.mktemp("proxy-loop-var"))
    proxy.start(wait_ready=False)
    try:
        assert proxy.wait_exit() == 2, proxy.log_tail()
        assert "RELAYPROXY_EVENT_LOOP='tokio'" in proxy.log_text(), proxy.log_tail()
    finally:
        proxy.stop()
