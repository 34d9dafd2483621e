"""Scanner answers and faults the real daemons do not give on demand, from small scripted
peers: every rspamd action, broken answers, a clamd that stops reading (backpressure), and
rspamd's keep-alive pool."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from support.backpressure import TOTAL, stalled_delivery
from support.ports import LOOPBACK
from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.smtpclient import RawSMTP, Reply, data_payload
from support.wait import wait_until

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]

MESSAGE = (b"From: s@example.org\r\nTo: alice@relay.test\r\nSubject: Minutes\r\n"
           b"X-Spam: forged\r\n\r\nhello\r\n")


def send(proxy: ProxyProcess, data: bytes) -> Reply:
    with RawSMTP(timeout=30) as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("client.example.org")
        assert client.cmd("MAIL FROM:<s@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("RCPT TO:<bob@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(data))
        reply = client.read_reply()
        client.cmd("QUIT")
    return reply


# ---------------------------------------------------------------------- a scripted rspamd


class FakeRspamd:
    """An HTTP/1.1 server on loopback answering POST /checkv2 with `answer` (a dict as JSON,
    or raw bytes), keeping what it received."""

    def __init__(self, answer: dict[str, Any] | bytes, status: int = 200) -> None:
        self.answer = answer
        self.status = status
        self.requests: list[tuple[str, dict[str, list[str]], bytes]] = []
        self.connections = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def setup(self) -> None:
                super().setup()
                fake.connections += 1

            def do_POST(self) -> None:
                headers: dict[str, list[str]] = {}
                for name, value in self.headers.items():
                    headers.setdefault(name.lower(), []).append(value)
                fake.requests.append((self.path, headers, self._body()))
                payload = (fake.answer if isinstance(fake.answer, bytes)
                           else json.dumps(fake.answer).encode())
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeRspamd:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_rspamd() -> Iterator[Callable[..., FakeRspamd]]:
    started: list[FakeRspamd] = []

    def make(answer: dict[str, Any] | bytes, status: int = 200) -> FakeRspamd:
        server = FakeRspamd(answer, status).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def rspamd_proxy(factory: ProxyFactory, downstream: int, fake: FakeRspamd,
                 **extra: Any) -> ProxyProcess:
    return factory(base_config(downstream, scanners={"rspamd": {
        "url": f"http://{LOOPBACK}:{fake.port}", "timeout": 5, **extra}}))


def answer(action: str, score: float = 6.5, **more: Any) -> dict[str, Any]:
    return {"action": action, "score": score, "required_score": 15.0,
            "symbols": {"SYM_A": {"score": 3}, "SYM_B": {"score": 3.5}}, **more}


def test_rspamd_gets_the_envelope_and_the_message_streamed(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory,
    fake_rspamd: Callable[..., FakeRspamd]
) -> None:
    fake = fake_rspamd(answer("no action", 1.0))
    server = scripted()
    proxy = rspamd_proxy(proxy_factory, server.port, fake)
    assert send(proxy, MESSAGE).code == 250
    assert send(proxy, MESSAGE).code == 250
    ((path, headers, body), _) = fake.requests
    assert path == "/checkv2"
    assert headers["transfer-encoding"] == ["chunked"]
    assert headers["ip"] == ["127.0.0.1"] and headers["helo"] == ["client.example.org"]
    assert headers["from"] == ["s@example.org"]
    assert headers["rcpt"] == ["alice@relay.test", "bob@relay.test"]
    assert headers["queue-id"] and headers["user-agent"][0].startswith("relayproxy/")
    assert body == MESSAGE  # what the client sent, header section first
    assert fake.connections == 1, "the second message did not reuse the kept-alive connection"
    delivered = server.wait_for_messages(2)
    assert b"X-Spam: forged" in delivered[0]  # no action: the message is left as it came
    (line, _) = proxy.wait_for_transactions(2)
    assert (line["rspamd"], line["rspamd_score"], line["rspamd_symbols"]) == (
        "clean", "1", "SYM_A,SYM_B"), line


@pytest.mark.parametrize(("action", "code", "enhanced", "verdict"), [
    ("reject", 550, "5.7.1", "reject"),
    ("soft reject", 451, "4.7.1", "tempfail"),
    ("greylist", 451, "4.7.1", "tempfail"),
])
def test_rspamd_refusing_actions(
    action: str, code: int, enhanced: str, verdict: str, scripted: ScriptedFactory,
    proxy_factory: ProxyFactory, fake_rspamd: Callable[..., FakeRspamd]
) -> None:
    fake = fake_rspamd(answer(action, messages={"smtp_message": "Go away\r\nnow"}))
    server = scripted()
    proxy = rspamd_proxy(proxy_factory, server.port, fake)
    reply = send(proxy, MESSAGE)
    assert (reply.code, reply.enhanced, reply.text) == (code, enhanced,
                                                        f"{enhanced} Go away now"), reply
    assert server.messages == [], server.describe()
    assert proxy.metric("relayproxy_scanner_verdicts_total",
                        {"scanner": "rspamd", "verdict": verdict}) == 1


def test_rspamd_add_header_and_its_milter_fields(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory,
    fake_rspamd: Callable[..., FakeRspamd]
) -> None:
    fake = fake_rspamd(answer("add header", milter={
        "add_headers": {"X-Spamd-Bar": {"value": "++++++", "order": 0},
                        "X-Spamd-Result": "default: True [6.50 / 15.00];\r\n\tSYM_A(3.00)[]"},
        "remove_headers": {"X-Spam": 0}}))
    server = scripted()
    proxy = rspamd_proxy(proxy_factory, server.port, fake)
    assert send(proxy, MESSAGE).code == 250
    (delivered,) = server.wait_for_messages(1)
    head = delivered.partition(b"\r\n\r\n")[0]
    assert b"X-Spam: forged" not in head  # the field rspamd asked to remove (forged)
    assert b"X-Spam: Yes\r\n" in head and b"X-Spam-Score: 6.5 / 15\r\n" in head, head
    assert b"X-Spamd-Bar: ++++++\r\n" in head
    assert b"X-Spamd-Result: default: True [6.50 / 15.00];\r\n\tSYM_A(3.00)[]\r\n" in head
    assert proxy.metric("relayproxy_scanner_verdicts_total",
                        {"scanner": "rspamd", "verdict": "add_header"}) == 1


def test_rspamd_rewrite_subject(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory,
    fake_rspamd: Callable[..., FakeRspamd]
) -> None:
    fake = fake_rspamd(answer("rewrite subject", subject="***SPAM*** Minutes"))
    server = scripted()
    proxy = rspamd_proxy(proxy_factory, server.port, fake)
    assert send(proxy, MESSAGE).code == 250
    (delivered,) = server.wait_for_messages(1)
    head = delivered.partition(b"\r\n\r\n")[0]
    assert b"Subject: ***SPAM*** Minutes\r\n" in head and head.count(b"Subject:") == 1, head


@pytest.mark.parametrize(("payload", "status"), [
    (b"not json", 200), (b'{"action": "explode"}', 200), (b'{"error": "oops"}', 500)])
def test_rspamd_broken_answer_tempfails_as_protocol_error(
    payload: bytes, status: int, scripted: ScriptedFactory, proxy_factory: ProxyFactory,
    fake_rspamd: Callable[..., FakeRspamd]
) -> None:
    fake = fake_rspamd(payload, status)
    server = scripted()
    proxy = rspamd_proxy(proxy_factory, server.port, fake)
    reply = send(proxy, MESSAGE)
    assert (reply.code, reply.enhanced) == (451, "4.7.1"), reply
    assert server.messages == []
    assert proxy.metric("relayproxy_scanner_errors_total",
                        {"scanner": "rspamd", "kind": "protocol"}) == 1


# ---------------------------------------------------------------------- a clamd that stalls


def instream_chunks(stream: BinaryIO) -> Iterator[bytes]:
    """The chunks of the one zINSTREAM command a fake clamd reads, up to the zero-length one
    that ends it (each handed on, none kept: a 100 MB stream stays out of memory)."""
    assert stream.read(10) == b"zINSTREAM\0"
    while size := struct.unpack(">I", stream.read(4))[0]:
        yield stream.read(size)


class StallingClamd:
    """Takes an INSTREAM connection and reads none of it until `go` is set; then reads the
    stream to its end and answers OK."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.go = threading.Event()
        self.received = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            self.go.wait(60)
            stream = conn.makefile("rb")
            for chunk in instream_chunks(stream):
                self.received += len(chunk)
            conn.sendall(b"stream: OK\0")

    def start(self) -> StallingClamd:
        self.thread.start()
        return self


def test_stalled_clamd_slows_the_client_with_flat_rss(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    clamd = StallingClamd().start()
    server = scripted()
    proxy = proxy_factory(base_config(
        server.port, server={"max_message_size": 100 * 1024 * 1024},
        scanners={"clamd": {"address": f"{LOOPBACK}:{clamd.port}", "timeout": 60,
                            "max_bytes": 100 * 1024 * 1024}}))
    stalled_delivery(proxy, clamd.go.set, "clamd")
    assert clamd.received > TOTAL
    (line,) = proxy.wait_for_transactions(1)
    assert line["clamd"] == "clean", line


def test_rspamd_over_max_bytes_is_not_scanned_logged_and_counted(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory,
    fake_rspamd: Callable[..., FakeRspamd]
) -> None:
    fake = fake_rspamd(answer("reject"))
    server = scripted()
    proxy = rspamd_proxy(proxy_factory, server.port, fake, max_bytes=1000)
    assert send(proxy, MESSAGE + (b"z" * 70 + b"\r\n") * 40).code == 250  # not scanned
    (line,) = proxy.wait_for_transactions(1)
    assert (line["rspamd"], line["rspamd_error"]) == ("skipped", "too_big"), line
    assert proxy.metric("relayproxy_scanner_errors_total",
                        {"scanner": "rspamd", "kind": "too_big"}) == 1
    proxy.wait_for_log("over scanners.rspamd.max_bytes (1000)")
    assert server.wait_for_messages(1)
    assert fake.requests == []  # abandoned before a request was made


class SilentClamd:
    """Reads one INSTREAM to its zero-length end, then never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            stream = conn.makefile("rb")
            for chunk in instream_chunks(stream):
                self.received += len(chunk)
            self.ended.set()
            conn.recv(1)  # until the proxy gives up and closes


def test_the_downstream_has_the_whole_body_while_clamd_decides(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    # The scan overlaps the stream: the parts go to clamd and to the mail server at once, and
    # when the client's data ends only the dot waits for the verdict. A clamd that never
    # answers shows what the mail server had by then: the whole body, no dot.
    clamd = SilentClamd()
    server = scripted()
    filler = b"".join(b"line %06d of a message larger than one observed batch\r\n" % i
                      for i in range(8000))  # about 440 KB
    proxy = proxy_factory(base_config(server.port, scanners={
        "clamd": {"address": f"{LOOPBACK}:{clamd.port}", "timeout": 2}}))
    reply = send(proxy, MESSAGE + filler)
    assert (reply.code, reply.enhanced) == (451, "4.7.1"), reply  # no verdict: on_error
    assert clamd.ended.is_set() and clamd.received == len(MESSAGE + filler)
    (partial,) = server.wait_for_partial(1)
    assert partial.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1] + filler), partial[-200:]
    assert server.messages == []


class UnixClamd:
    """clamd on a unix socket: reads one INSTREAM and answers `answer`."""

    def __init__(self, path: str, answer: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.answer = answer
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            stream = conn.makefile("rb")
            for chunk in instream_chunks(stream):
                self.received += chunk
            conn.sendall(self.answer)


def test_clamd_on_a_unix_socket(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    path = str(tmp_path / "clamd.sock")
    clamd = UnixClamd(path, b"stream: Win.Test.EICAR_HDB-1 FOUND\0")
    server = scripted()
    proxy = proxy_factory(base_config(server.port, scanners={"clamd": {"address": path}}))
    reply = send(proxy, MESSAGE)
    assert (reply.code, reply.enhanced, reply.text) == (
        554, "5.7.1", "5.7.1 Virus found: Win.Test.EICAR_HDB-1"), reply
    assert clamd.received == MESSAGE  # the header section first, as the client sent it
    assert server.messages == []


def test_scanners_come_and_go_with_a_reload(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory,
    fake_rspamd: Callable[..., FakeRspamd]
) -> None:
    fake = fake_rspamd(answer("reject", messages={"smtp_message": "No thanks"}))
    server = scripted()
    config = base_config(server.port)
    proxy = proxy_factory(config)
    assert send(proxy, MESSAGE).code == 250

    def reloaded(n: int) -> None:
        wait_until(lambda: proxy.metric("relayproxy_config_reloads_total",
                                        {"result": "ok"}) == n, f"reload {n}", 10)

    proxy.reload({**config, "scanners": {"rspamd": {"url": f"http://{LOOPBACK}:{fake.port}"}}})
    reloaded(1)
    assert send(proxy, MESSAGE).text == "5.7.1 No thanks"
    proxy.reload(config)
    reloaded(2)
    assert send(proxy, MESSAGE).code == 250
    assert len(fake.requests) == 1
    assert len(server.wait_for_messages(2)) == 2
