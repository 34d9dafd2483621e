"""Hypothesis drives random command sequences at the proxy: generated ones, and the command
lines of the dialogue files in tests/data/ as seeds, as they are and mutated (the dialogues pin
known conversations; this looks for the ones nobody wrote down).

Whatever the client sends, every reply must be well formed with an enhanced status code of its
own class (RFC 2034; the EHLO/HELO replies excepted), the proxy must never fail internally, and
no CR or NUL may reach a downstream command line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.smtpclient import RawSMTP, Reply

_ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3} ")

# Arguments lean towards the edges: the characters the proxy must refuse, non-ASCII, brackets,
# parameters and lengths around the 512-octet command line limit.
_piece = st.sampled_from([
    "", " ", "<", ">", "<>", "@", ":", "=", "\r", "\x00", "\t", "é", "☃", "..", "relay.test",
    "alice@relay.test", "bob@elsewhere.example", "SIZE=10", "SIZE=999999999999", "BODY=8BITMIME",
    "BODY=BINARYMIME", "SMTPUTF8", "RET=HDRS", "ENVID=a+2Bb", "NOTIFY=NEVER", "ORCPT=rfc822;x@y",
    "AUTH=<>", "x" * 200, "y" * 520,
])
_argument = st.lists(st.one_of(_piece, st.text(
    alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)),
    max_size=20)), max_size=6).map("".join)
_verb = st.sampled_from([
    "EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "RSET", "NOOP", "VRFY", "HELP", "EXPN", "BDAT",
    "AUTH", "STARTTLS", "GET / HTTP/1.1", "mail from:", "Rcpt To:", "", "X" * 10,
])
_generated = st.tuples(_verb, st.sampled_from(["", " "]), _argument).map(lambda t: "".join(t))


def _dialogue_commands() -> list[str]:
    """The command lines of the dialogue files in tests/data/: real conversations as seeds."""
    verbs = ("EHLO", "HELO", "MAIL", "RCPT", "RSET", "NOOP", "VRFY", "HELP", "EXPN")
    lines = []
    for path in sorted((Path(__file__).parent / "data").glob("dialogue_*.txt")):
        for line in path.read_text().splitlines():
            if line.startswith("C: ") and line[3:].upper().startswith(verbs):
                lines.append(line[3:])
    return lines


_SEEDS = _dialogue_commands()


@st.composite
def _mutated_seed(draw: st.DrawFn) -> str:
    seed = draw(st.sampled_from(_SEEDS))
    at = draw(st.integers(min_value=0, max_value=len(seed)))
    cut = draw(st.integers(min_value=0, max_value=3))
    return seed[:at] + draw(_piece) + seed[at + cut :]


_command = st.one_of(_generated, st.sampled_from(_SEEDS), _mutated_seed())


@pytest.fixture(scope="module")
def downstream() -> Iterator[ScriptedDownstream]:
    server = ScriptedDownstream(extensions=(
        "PIPELINING", "SIZE 100000000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN",
    )).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(
    downstream: ScriptedDownstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    config = base_config(downstream.port, server={
        "max_errors": 10_000, "max_connections_per_ip": 1000, "max_recipients": 5,
    })
    process = ProxyProcess(config, workdir=tmp_path_factory.mktemp("fuzz-proxy")).start()
    yield process
    process.stop()


def _check_reply(command: bytes, reply: Reply) -> None:
    assert 200 <= reply.code < 600, (command, reply.raw)
    assert reply.code != 421, f"{command!r} ended the session: {reply.raw!r}"
    verb = command[:4].upper()
    if reply.code == 250 and verb in (b"EHLO", b"HELO"):
        return  # RFC 2034: no enhanced code on EHLO/HELO replies
    m = _ENHANCED.match(reply.lines[0]) if reply.lines else None
    assert m is not None, f"{command!r} -> {reply.raw!r} has no enhanced code"
    assert m.group(1) == str(reply.code)[0], f"{command!r} -> {reply.raw!r}: class mismatch"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=st.lists(_command, min_size=1, max_size=12))
# found by this test: aiosmtplib refuses any control character with an exception, so the proxy
# must refuse them itself (it answered 421 internal error)
@example(commands=["EHLO <", "MAIL FROM:\x1b"])
@example(commands=["HELO a\tb", "RCPT TO:<a\x7f@relay.test>"])
def test_random_commands_get_wellformed_replies(
    proxy: ProxyProcess, downstream: ScriptedDownstream, commands: list[str]
) -> None:
    client = RawSMTP(timeout=10)
    client.connect(proxy.host, proxy.port)
    try:
        for text in commands:
            line = text.encode("utf-8", "surrogatepass")
            reply = client.cmd(line)
            _check_reply(line, reply)
        assert client.cmd("QUIT").code == 221
    except (TimeoutError, ConnectionError) as exc:
        raise AssertionError(f"proxy dropped or stalled the session on {commands!r}: {exc}\n"
                             f"{proxy.log_tail()}") from exc
    finally:
        client.close()
    assert proxy.returncode is None, proxy.log_tail()
    for sent in downstream.all_commands:
        assert "\r" not in sent and "\x00" not in sent, f"downstream got {sent!r}"
    assert "Traceback" not in proxy.log_text(), proxy.log_tail()
