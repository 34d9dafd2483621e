"""Hypothesis sends random message bodies (dots, bare CR and LF, long lines) through the proxy.

Whatever the body, the conversation must stay in step (the reply after the end of data is for
the message, and the next command is read as a command), and the downstream must get either the
body exactly as sent, or, for a refused message, no end of data at all. This is the end-to-end
form of the DotReader properties in test_dotreader.py.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.smtpclient import RawSMTP

MAX_LINE = 40  # small, so random bodies cross it often
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")

_body = st.lists(
    st.sampled_from([b"a", b"b", b" ", b".", b"..", b"\r", b"\n", b"\r\n", b"\xc3\xa9", b"x" * 25]),
    max_size=60,
).map(b"".join)
_splits = st.lists(st.integers(min_value=0, max_value=1000), max_size=3)


def _ends_only_at_the_end(body: bytes) -> bool:
    # The DATA command's own CRLF counts as the line end before a leading ".".
    wire = b"\r\n" + body + b"\r\n.\r\n"
    return wire.find(b"\r\n.\r\n") == len(body) + 2


def _too_long(body: bytes) -> bool:
    # lines as the downstream will count them: CRLF-separated, the transparency dot excluded
    return any(len(line) - line.startswith(b".") > MAX_LINE for line in body.split(b"\r\n"))


@pytest.fixture(scope="module")
def downstream() -> Iterator[ScriptedDownstream]:
    server = ScriptedDownstream().start()
    yield server
    server.stop()


def _proxy(
    mode: str, downstream: ScriptedDownstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    config = base_config(downstream.port, server={
        "bare_newline": mode, "max_line_length": MAX_LINE, "max_errors": 10_000,
        "max_connections_per_ip": 1000,
    })
    process = ProxyProcess(config, workdir=tmp_path_factory.mktemp(f"fuzz-{mode}")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def reject_proxy(
    downstream: ScriptedDownstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    yield from _proxy("reject", downstream, tmp_path_factory)


@pytest.fixture(scope="module")
def normalize_proxy(
    downstream: ScriptedDownstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    yield from _proxy("normalize", downstream, tmp_path_factory)


def _send(proxy: ProxyProcess, body: bytes, splits: list[int]) -> tuple[int, str | None]:
    client = RawSMTP(timeout=10)
    client.connect(proxy.host, proxy.port)
    try:
        assert client.ehlo().code == 250
        assert client.cmd("MAIL FROM:<s@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        wire = body + b"\r\n.\r\n"
        cuts = sorted({min(c, len(wire)) for c in splits} | {0, len(wire)})
        for start, end in itertools.pairwise(cuts):
            client.send(wire[start:end])
        reply = client.read_reply()
        # in step: the next line is read as a command, not as message content
        assert client.cmd("NOOP").code == 250
        assert client.cmd("QUIT").code == 221
        return reply.code, reply.enhanced
    finally:
        client.close()


_PROXY_RECEIVED = re.compile(
    rb"Received: from [^\r\n]*\r\n\tby [^\r\n]*\(relayproxy\)[^\r\n]*"
    rb"(?:\r\n\tfor [^\r\n]*)?\r\n\t[^\r\n]*\r\n"
)


def _received_stripped(raw: bytes) -> bytes:
    """The content after the proxy's own Received: field (its known three or four lines)."""
    m = _PROXY_RECEIVED.match(raw)
    assert m is not None, raw[:200]
    return raw[m.end() :]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body, splits=_splits)
def test_reject_mode(
    reject_proxy: ProxyProcess, downstream: ScriptedDownstream, body: bytes, splits: list[int]
) -> None:
    assume(_ends_only_at_the_end(body))
    before = len(downstream.messages)
    code = _send(reject_proxy, body, splits)
    if _BARE.search(body):
        assert code == (550, "5.6.0")
    elif _too_long(body):
        assert code == (500, "5.5.2")
    else:
        assert code == (250, "2.0.0")
        (raw,) = downstream.wait_for_messages(before + 1)[before:]
        assert _received_stripped(raw) == body + b"\r\n"
        return
    assert len(downstream.messages) == before, "a refused message reached its end of data"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body, splits=_splits)
def test_normalize_mode(
    normalize_proxy: ProxyProcess, downstream: ScriptedDownstream, body: bytes,
    splits: list[int],
) -> None:
    assume(_ends_only_at_the_end(body))
    before = len(downstream.messages)
    code, enhanced = _send(normalize_proxy, body, splits)
    if code != 250:
        assert (code, enhanced) == (500, "5.5.2")
        assert len(downstream.messages) == before
        return
    (raw,) = downstream.wait_for_messages(before + 1)[before:]
    assert not _BARE.search(raw), raw
    # one message, whole: the downstream saw no end of data before ours
    assert len(downstream.messages) == before + 1
    content = _received_stripped(raw)
    assert content.replace(b"\r\n", b"") .replace(b"..", b".") .count(b"a") == body.count(b"a")
