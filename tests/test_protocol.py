"""Bad input, smuggling, STARTTLS, timeouts and connection limits (issue 2, point 7).

End to end: the real proxy process in front of the session's private Postfix, whose Maildirs
show what was actually delivered; a scripted recorder downstream where the test must see the
exact commands the proxy sent (CR/NUL injection) or needs a downstream fault (timeouts).
Postfix 3.7 accepts bare-LF ends of data, so it is a real victim for the smuggling tests.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from support.ports import LOOPBACK, free_port
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.smtpclient import ConnectionClosed, RawSMTP, Reply, dot_stuff
from support.smuggling import SMUGGLED, SMUGGLING_VARIANTS
from support.wait import wait_until

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]

TERMINATOR = b"\r\n.\r\n"


# ---------------------------------------------------------------------- helpers


def code(reply: Reply) -> tuple[int, str | None]:
    return reply.code, reply.enhanced


def message(subject: str, body: str = "Hello.") -> bytes:
    return (
        f"From: sender@example.org\r\nTo: alice@relay.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4()}@example.org>\r\n\r\n{body}\r\n"
    ).encode()


def connect(proxy: ProxyProcess, timeout: float = 10) -> RawSMTP:
    client = RawSMTP(timeout=timeout)
    greeting = client.connect(proxy.host, proxy.port)
    assert greeting is not None and greeting.code == 220, greeting
    return client


def open_data(client: RawSMTP, rcpt: str = "alice@relay.test") -> None:
    """EHLO, MAIL, RCPT, DATA up to the 354."""
    assert client.ehlo().code == 250
    assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
    rcpt_reply = client.cmd(f"RCPT TO:<{rcpt}>")
    assert rcpt_reply.code == 250, rcpt_reply
    data = client.cmd("DATA")
    assert data.code == 354, data


def smuggle_payload(variant: bytes, marker: str) -> bytes:
    """One message whose body hides a second transaction behind ``variant``; the proxy's (and
    the smuggled message's) end of data is the final <CRLF>.<CRLF>."""
    outer = (
        f"From: sender@example.org\r\nTo: alice@relay.test\r\nSubject: outer {marker}\r\n"
        f"\r\nouter body {marker}"
    ).encode()
    return outer + variant + SMUGGLED + TERMINATOR


class Tap:
    """A TCP relay between the proxy and Postfix that records what the proxy sends.

    A test waits until the proxy has forwarded the first part of a message before it sends
    the rest: the two parts are then certainly two separate reads in the proxy, which is the
    only way to pin a chunk boundary end to end without sleeping.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)  # lets the accept loop notice close()
        self.port: int = self._listener.getsockname()[1]
        self._cond = threading.Condition()
        self._sent = bytearray()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._start(self._accept_loop)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                inbound, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            inbound.settimeout(None)
            outbound = socket.create_connection(self.target, timeout=5)
            outbound.settimeout(None)
            self._sockets += [inbound, outbound]
            self._start(self._pump, inbound, outbound, True)
            self._start(self._pump, outbound, inbound, False)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._cond:
                        self._sent += data
                        self._cond.notify_all()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def wait_for(self, marker: bytes, timeout: float = 10) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: marker in self._sent, timeout):
                raise AssertionError(
                    f"the proxy did not forward {marker!r} within {timeout}s; "
                    f"tail: {bytes(self._sent[-300:])!r}"
                )

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        for sock in self._sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)


# ---------------------------------------------------------------------- module proxies


@pytest.fixture(scope="module")
def pf_proxy(
    postfix: PostfixInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """Defaults (bare_newline = reject, max_line_length = 998) in front of Postfix."""
    config = base_config(postfix.port, downstream={"reuse_connections": False})
    with ProxyProcess(config, workdir=tmp_path_factory.mktemp("proxy-default")) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def normalize_proxy(
    postfix: PostfixInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    # No connection reuse: a desynchronised downstream session must not leak into the next
    # test case if the proxy ever lets a smuggled end of data through.
    config = base_config(
        postfix.port, server={"bare_newline": "normalize"},
        downstream={"reuse_connections": False},
    )
    with ProxyProcess(config, workdir=tmp_path_factory.mktemp("proxy-normalize")) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def tapped(
    postfix: PostfixInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[ProxyProcess, Tap]]]:
    """For each bare_newline mode, a proxy whose downstream traffic to Postfix is tapped."""
    tap = Tap((postfix.host, postfix.port))
    try:
        with (
            ProxyProcess(
                base_config(tap.port, downstream={"reuse_connections": False}),
                workdir=tmp_path_factory.mktemp("proxy-tap-reject"),
            ) as reject,
            ProxyProcess(
                base_config(tap.port, server={"bare_newline": "normalize"},
                            downstream={"reuse_connections": False}),
                workdir=tmp_path_factory.mktemp("proxy-tap-normalize"),
            ) as normalize,
        ):
            yield {"reject": (reject, tap), "normalize": (normalize, tap)}
    finally:
        tap.close()


@pytest.fixture(scope="module")
def recorder() -> Iterator[ScriptedDownstream]:
    server = ScriptedDownstream().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def recorder_proxy(
    recorder: ScriptedDownstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("proxy-rec")
    with ProxyProcess(base_config(recorder.port), workdir=workdir) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "c", directory / "k"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=proxy.test",
         "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_proxy(
    postfix: PostfixInstance,
    tls_files: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    cert, key = tls_files
    config = base_config(postfix.port, tls={"cert": str(cert), "key": str(key)})
    with ProxyProcess(config, workdir=tmp_path_factory.mktemp("proxy-tls")) as proxy:
        yield proxy


# ---------------------------------------------------------------------- overlong lines


def test_command_line_over_512_octets(pf_proxy: ProxyProcess, mailboxes: PostfixInstance) -> None:
    with connect(pf_proxy) as client:
        assert client.ehlo().code == 250
        # 512 octets including CRLF is the RFC 5321 4.5.3.1.4 limit: still a command.
        assert code(client.cmd("NOOP " + "x" * (512 - 7))) == (250, "2.0.0")
        assert code(client.cmd("NOOP " + "x" * (512 - 6))) == (500, "5.5.2")
        assert code(client.cmd("NOOP")) == (250, "2.0.0")
        # An overlong MAIL opens no transaction and reaches nobody.
        long_mail = "MAIL FROM:<sender@example.org> ENVID=" + "e" * 600
        assert code(client.cmd(long_mail)) == (500, "5.5.2")
        assert code(client.cmd("RCPT TO:<alice@relay.test>")) == (503, "5.5.1")
        # A 100 KB line: the whole of it is discarded, not read as further commands.
        assert code(client.cmd(b"RSET " + b"r" * 100_000)) == (500, "5.5.2")
        assert code(client.cmd("NOOP")) == (250, "2.0.0")
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(message("after long lines") + b".\r\n")
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    assert b"Subject: after long lines" in delivered
    mailboxes.wait_queue_empty()
    assert len(mailboxes.deliveries()) == 1


def test_data_line_over_max_line_length(pf_proxy: ProxyProcess, mailboxes: PostfixInstance) -> None:
    limit = 998  # server.max_line_length default
    with connect(pf_proxy) as client:
        open_data(client)
        client.send(message("too long", "a" * (limit + 1)) + b".\r\n")
        assert code(client.read_reply()) == (500, "5.5.2")
        # The session goes on, and a line of exactly the limit is fine.
        assert code(client.cmd("NOOP")) == (250, "2.0.0")
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(message("at the limit", "b" * limit) + b".\r\n")
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    mailboxes.wait_queue_empty()
    assert len(mailboxes.deliveries()) == 1
    assert b"Subject: at the limit" in delivered
    assert b"b" * limit in delivered


def test_data_line_at_limit_starting_with_dot_is_delivered(
    pf_proxy: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    """RFC 5321 4.5.3.1.6: the limit does not count the dot doubled for transparency, so a
    998-octet text line starting with "." (999 octets on the wire) is a legal line."""
    line = "." + "c" * 997
    with connect(pf_proxy) as client:
        open_data(client)
        client.send(dot_stuff(message("dot line at the limit", line)) + b".\r\n")
        reply = client.read_reply()
        assert reply.code == 250, reply
        client.cmd("QUIT")
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    assert f"\n{line}\n".encode() in delivered


# ---------------------------------------------------------------------- error limit


def test_max_errors_http_scanner_gets_421(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port, server={"max_errors": 5}))
    request = (
        b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: y\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n"
    )
    with connect(proxy) as client:
        client.send(request)  # a scanner writes its whole request at once
        replies = [client.read_reply() for _ in range(5)]
        assert [code(r) for r in replies] == [(500, "5.5.2")] * 5
        closing = client.read_reply()
        assert code(closing) == (421, "4.7.0"), closing
        assert client.closed_by_peer(timeout=5)
    # A scanner costs the downstream nothing: no connection was ever opened.
    assert downstream.connections == 0


def test_max_errors_counts_errors_not_commands(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port, server={"max_errors": 3}))
    with connect(proxy) as client:
        assert code(client.cmd("GET / HTTP/1.1")) == (500, "5.5.2")
        assert code(client.cmd("NOOP")) == (250, "2.0.0")
        assert code(client.cmd("RCPT TO:<alice@relay.test>")) == (503, "5.5.1")
        assert client.ehlo().code == 250
        assert code(client.cmd("Host: x")) == (500, "5.5.2")  # third error
        assert code(client.read_reply()) == (421, "4.7.0")
        assert client.closed_by_peer(timeout=5)


# ---------------------------------------------------------------------- CR / LF / NUL


_INJECTIONS: dict[str, tuple[str, bytes]] = {
    # id: (state before the bad line, bad line)
    "helo-cr": ("start", b"HELO client.test\rRCPT TO:<INJECTED@relay.test>"),
    "helo-nul": ("start", b"HELO client\x00INJECTED"),
    "ehlo-cr": ("start", b"EHLO client\rINJECTED"),
    "ehlo-nul": ("start", b"EHLO client\x00INJECTED"),
    "mail-address-cr": ("ehlo", b"MAIL FROM:<a\rINJECTED@example.org>"),
    "mail-address-nul": ("ehlo", b"MAIL FROM:<a\x00INJECTED@example.org>"),
    "mail-param-cr": ("ehlo", b"MAIL FROM:<a@example.org> BODY=8BITMIME\rRCPT TO:<INJECTED@x>"),
    "mail-param-nul": ("ehlo", b"MAIL FROM:<a@example.org> ENVID=x\x00INJECTED"),
    "rcpt-address-cr": ("mail", b"RCPT TO:<bob\rINJECTED@relay.test>"),
    "rcpt-address-nul": ("mail", b"RCPT TO:<bob\x00INJECTED@relay.test>"),
    "rcpt-param-cr": ("mail", b"RCPT TO:<bob@relay.test> NOTIFY=NEVER\rDATA\rINJECTED"),
    "rcpt-param-nul": ("mail", b"RCPT TO:<bob@relay.test> ORCPT=rfc822;x\x00INJECTED"),
}


@pytest.mark.parametrize("case", list(_INJECTIONS))
def test_cr_and_nul_in_arguments_refused_and_never_forwarded(
    case: str, recorder: ScriptedDownstream, recorder_proxy: ProxyProcess
) -> None:
    state, bad = _INJECTIONS[case]
    sender = f"s-{uuid.uuid4().hex[:8]}@example.org"  # identifies this case downstream
    with connect(recorder_proxy) as client:
        if state != "start":
            assert client.ehlo().code == 250
        if state == "mail":
            assert client.cmd(f"MAIL FROM:<{sender}>").code == 250
        assert code(client.cmd(bad)) == (501, "5.5.4")
        # The refused line changed nothing: the state is the one before it.
        if state == "start":
            assert code(client.cmd(f"MAIL FROM:<{sender}>")) == (503, "5.5.1")
            assert client.ehlo().code == 250
        if state in ("start", "ehlo"):
            assert code(client.cmd("RCPT TO:<bob@relay.test>")) == (503, "5.5.1")
            assert client.cmd(f"MAIL FROM:<{sender}>").code == 250
        assert client.cmd("RCPT TO:<bob@relay.test>").code == 250
        assert client.cmd("RSET").code == 250
        client.cmd("QUIT")
    # The recorder saw this session's commands, so it would have seen an injected one too.
    recorder.wait_for_command(f"MAIL FROM:<{sender}>")
    recorder.wait_for_command("RSET")
    for line in recorder.all_commands:
        assert "\r" not in line and "\x00" not in line, line
        assert "INJECTED" not in line, line


# ---------------------------------------------------------------------- SMTP smuggling


@pytest.mark.parametrize("variant", list(SMUGGLING_VARIANTS))
def test_smuggling_rejected_and_nothing_delivered(
    variant: str, pf_proxy: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    marker = uuid.uuid4().hex
    with connect(pf_proxy) as client:
        open_data(client)
        client.send(smuggle_payload(SMUGGLING_VARIANTS[variant], marker))
        assert code(client.read_reply()) == (550, "5.6.0")
        # The next reply is the NOOP's: none of the smuggled commands was answered.
        assert code(client.cmd("NOOP")) == (250, "2.0.0")
        client.cmd("QUIT")
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries("alice") == []
    assert mailboxes.deliveries("bob") == []
    assert mailboxes.deliveries() == []


def _assert_one_clean_delivery(mailboxes: PostfixInstance, marker: str) -> None:
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries("bob") == [], "the smuggled message was delivered"
    assert len(mailboxes.deliveries("alice")) == 1
    assert len(mailboxes.deliveries()) == 1
    # Postfix stores CRLF as LF; a bare CR that reached it would still be here.
    assert b"\r" not in delivered
    assert f"outer body {marker}".encode() in delivered
    # The would-be commands arrived as text of the one message.
    assert b"\nMAIL FROM:<evil@example.org>\nRCPT TO:<bob@relay.test>\nDATA\n" in delivered


@pytest.mark.parametrize("variant", list(SMUGGLING_VARIANTS))
def test_smuggling_normalized_delivers_one_message(
    variant: str, normalize_proxy: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    marker = uuid.uuid4().hex
    with connect(normalize_proxy) as client:
        open_data(client)
        client.send(smuggle_payload(SMUGGLING_VARIANTS[variant], marker))
        assert client.read_reply().code == 250
        assert code(client.cmd("NOOP")) == (250, "2.0.0")
        client.cmd("QUIT")
    _assert_one_clean_delivery(mailboxes, marker)


@pytest.mark.parametrize("variant", list(SMUGGLING_VARIANTS))
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_smuggling_split_across_reads(
    mode: str,
    variant: str,
    tapped: dict[str, tuple[ProxyProcess, Tap]],
    mailboxes: PostfixInstance,
) -> None:
    """The same attempts with a TCP boundary inside the pattern, as a real attacker may send.

    normalize: cut just after the variant's first (bare) line end; reject: cut before the
    variant (nothing after a bare line end is forwarded, so that is the last cut that shows
    up downstream and can be waited for).
    """
    proxy, tap = tapped[mode]
    marker = uuid.uuid4().hex
    payload = smuggle_payload(SMUGGLING_VARIANTS[variant], marker)
    cut = payload.index(SMUGGLING_VARIANTS[variant]) + (1 if mode == "normalize" else 0)
    with connect(proxy) as client:
        open_data(client)
        client.send(payload[:cut])
        tap.wait_for(f"outer body {marker}".encode())
        client.send(payload[cut:])
        final = client.read_reply()
        if mode == "reject":
            assert code(final) == (550, "5.6.0")
        else:
            assert final.code == 250, final
        assert code(client.cmd("NOOP")) == (250, "2.0.0")
        client.cmd("QUIT")
    if mode == "reject":
        mailboxes.wait_queue_empty()
        assert mailboxes.deliveries() == []
    else:
        _assert_one_clean_delivery(mailboxes, marker)


# ---------------------------------------------------------------------- STARTTLS


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed; the test compares the cert instead
    return context


def starttls(client: RawSMTP, context: ssl.SSLContext) -> ssl.SSLSocket:
    """Switch the RawSMTP connection to TLS after a 220 to STARTTLS."""
    # Anything already buffered would be plaintext the server sent after its 220.
    assert client._buffer == b"", client._buffer
    assert client.sock is not None
    tls = context.wrap_socket(client.sock, server_hostname="proxy.test")
    client.sock = tls
    return tls


def test_starttls_advertised_and_resets_state(
    tls_proxy: ProxyProcess, tls_files: tuple[Path, Path], mailboxes: PostfixInstance
) -> None:
    cert, _ = tls_files
    with connect(tls_proxy) as client:
        assert "STARTTLS" in client.ehlo().extensions
        # A transaction open before STARTTLS must not survive it.
        assert client.cmd("MAIL FROM:<before-tls@example.org>").code == 250
        assert code(client.cmd("STARTTLS")) == (220, "2.0.0")
        tls = starttls(client, client_context())
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(cert.read_text())
        # RFC 3207 4.2: the client must greet again; nothing of the old session is kept.
        assert code(client.cmd("MAIL FROM:<sender@example.org>")) == (503, "5.5.1")
        ehlo = client.ehlo()
        assert ehlo.code == 250
        assert "STARTTLS" not in ehlo.extensions
        assert {"PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES"} <= set(ehlo.extensions)
        assert code(client.cmd("RCPT TO:<alice@relay.test>")) == (503, "5.5.1")
        assert code(client.cmd("STARTTLS")) == (503, "5.5.1")
        client.cmd("QUIT")
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


def test_message_over_tls_delivered_with_esmtps(
    tls_proxy: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    with connect(tls_proxy) as client:
        client.ehlo()
        assert client.cmd("STARTTLS").code == 220
        starttls(client, client_context())
        open_data(client)
        client.send(message("over tls") + b".\r\n")
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    assert b"Subject: over tls" in delivered
    assert b"(relayproxy) with ESMTPS id" in delivered, delivered[:600]


def test_commands_pipelined_with_starttls_are_discarded(
    tls_proxy: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    with connect(tls_proxy) as client:
        client.ehlo()
        # One write, so both lines are in the proxy's buffer when it answers STARTTLS.
        client.send(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
        assert code(client.read_reply()) == (220, "2.0.0")
        starttls(client, client_context())
        # Had the injected MAIL been kept, its reply (503: no EHLO yet) would come first.
        ehlo = client.ehlo()
        assert ehlo.code == 250 and ehlo.lines[0] == "proxy.test", ehlo
        assert code(client.cmd("NOOP")) == (250, "2.0.0")
        # No transaction was opened by the injected MAIL either.
        assert code(client.cmd("RCPT TO:<alice@relay.test>")) == (503, "5.5.1")
        client.cmd("QUIT")
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


def _tls11_context() -> ssl.SSLContext | None:
    """A client limited to TLS 1.1, or None if this OpenSSL cannot build one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context = client_context()
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return None
    return context


def _tls11_handshake_works(context: ssl.SSLContext, cert: Path, key: Path) -> bool:
    """Can this client really speak TLS 1.1? Try it against a permissive local server, so a
    refusal by the proxy is not mistaken for a client that cannot offer TLS 1.1 at all."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server_context.minimum_version = ssl.TLSVersion.TLSv1_1
            server_context.set_ciphers("DEFAULT:@SECLEVEL=0")
        server_context.load_cert_chain(cert, key)
    except (ValueError, ssl.SSLError):
        return False
    result: list[str | None] = []
    with socket.create_server((LOOPBACK, 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    result.append(tls.version())
            except (OSError, ssl.SSLError):
                result.append(None)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    context.wrap_socket(raw) as tls:
                version = tls.version()
        except (OSError, ssl.SSLError):
            version = None
        thread.join(10)
    return version == "TLSv1.1"


def test_tls_minimum_version_is_1_2(
    tls_proxy: ProxyProcess, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    old = _tls11_context()
    if old is not None and _tls11_handshake_works(old, cert, key):
        with connect(tls_proxy) as client:
            client.ehlo()
            assert client.cmd("STARTTLS").code == 220
            with pytest.raises((ssl.SSLError, ConnectionError)):
                starttls(client, old)
    # A TLS 1.2-only client is accepted (and, so, 1.2 is the floor, not 1.3).
    tls12 = client_context()
    tls12.minimum_version = tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with connect(tls_proxy) as client:
        client.ehlo()
        assert client.cmd("STARTTLS").code == 220
        assert starttls(client, tls12).version() == "TLSv1.2"
        assert client.ehlo().code == 250
        client.cmd("QUIT")


# ---------------------------------------------------------------------- timeouts


def _closed_with_421(client: RawSMTP, within: float) -> float:
    """Wait (bounded) for the server to close; return how long it took."""
    started = time.monotonic()
    assert client.closed_by_peer(timeout=within), f"connection still open after {within}s"
    elapsed = time.monotonic() - started
    assert code(client.read_reply()) == (421, "4.4.2")
    return elapsed


def test_idle_timeout_after_greeting(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(base_config(
        free_port(), server={"idle_timeout": 0.5, "command_timeout": 60, "data_timeout": 60}))
    with connect(proxy) as client:
        assert _closed_with_421(client, within=10) < 10
    with connect(proxy) as client:
        assert client.ehlo().code == 250  # after EHLO, still outside a transaction
        _closed_with_421(client, within=10)


def test_command_timeout_inside_transaction(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    downstream = scripted()
    # idle_timeout is long: a close within seconds can only be the command timeout.
    proxy = proxy_factory(base_config(
        downstream.port, server={"idle_timeout": 60, "command_timeout": 0.5}))
    with connect(proxy) as client:
        client.ehlo()
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        _closed_with_421(client, within=10)
    downstream.wait_for_closed(1)
    assert not any(c.upper().startswith("DATA") for c in downstream.all_commands)
    assert downstream.messages == []


def test_data_timeout_mid_data_delivers_nothing(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(
        downstream.port, server={"idle_timeout": 60, "command_timeout": 60, "data_timeout": 0.5}))
    with connect(proxy) as client:
        open_data(client)
        client.send(b"Subject: stalled\r\n\r\nfirst line, and then silence\r\n")
        _closed_with_421(client, within=10)
    # The downstream got the body so far but never the dot, and its session was dropped.
    (partial,) = downstream.wait_for_partial(1)
    assert b"first line, and then silence" in partial
    downstream.wait_for_closed(1)
    assert not downstream.dot_received
    assert downstream.messages == []


# ---------------------------------------------------------------------- connection limits


def _wait_sessions(proxy: ProxyProcess, n: int) -> None:
    # The readiness probe (and closed test clients) end asynchronously in the proxy.
    wait_until(lambda: proxy.metric("relayproxy_sessions_active") == n,
               f"relayproxy_sessions_active == {n}", 10,
               describe=lambda: f"now {proxy.metric('relayproxy_sessions_active')}")


def _connect_from(proxy: ProxyProcess, source: str) -> RawSMTP:
    client = RawSMTP()
    client.sock = socket.create_connection(
        (proxy.host, proxy.port), timeout=10, source_address=(source, 0))
    return client


def _assert_refused(client: RawSMTP, text: str) -> None:
    try:
        refusal = client.read_reply()
    except ConnectionClosed as exc:
        raise AssertionError(f"closed without a 421: {exc}") from None
    assert code(refusal) == (421, "4.7.0"), refusal
    assert text in refusal.text
    assert client.closed_by_peer(timeout=5)


def test_max_connections(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(base_config(free_port(), server={"max_connections": 3}))
    _wait_sessions(proxy, 0)
    clients = [connect(proxy) for _ in range(3)]
    try:
        extra = RawSMTP()
        extra.connect(proxy.host, proxy.port, read_greeting=False)
        with extra:
            _assert_refused(extra, "Too many connections")
        # The limit counts live sessions: one leaves, one more gets in.
        clients.pop().cmd("QUIT")
        _wait_sessions(proxy, 2)
        clients.append(connect(proxy))
    finally:
        for client in clients:
            client.close()


def test_max_connections_per_ip(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(base_config(free_port(), server={"max_connections_per_ip": 2}))
    _wait_sessions(proxy, 0)
    clients = [_connect_from(proxy, "127.0.0.1") for _ in range(2)]
    try:
        for client in clients:
            assert client.read_reply().code == 220
        with _connect_from(proxy, "127.0.0.1") as extra:
            _assert_refused(extra, "from your address")
        # Another address is not affected by 127.0.0.1's count.
        other = _connect_from(proxy, "127.0.0.2")
        clients.append(other)
        assert other.read_reply().code == 220
        assert other.ehlo().code == 250
    finally:
        for client in clients:
            client.close()
