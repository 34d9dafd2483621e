"""SMTP dialogues kept as data files (tests/data/dialogue_*.txt), run against the proxy.

Format, one directive per line (blank lines and "#" comments are ignored):

  C: <line>        client line, sent with CRLF appended. Escapes: \\r \\n \\t \\0 \\xHH \\\\.
                   Consecutive C:/R: lines are sent in ONE write when the next S: comes, so
                   several C: lines before their S: lines are a pipelined group (RFC 2920).
  R: <bytes>       raw client bytes, nothing appended (same escapes).
  S: <prefix>      the next reply, rendered "<code> <first line text>", starts with prefix
                   (e.g. "250", "503 5.5.1", "220 proxy.test ESMTP" for the greeting).
  CLOSED           the server closes the connection now.

Header directives (anywhere in the file):

  @downstream: postfix | scripted    default postfix (the session's private Postfix)
  @script: STAGE=behaviour           scripted only; e.g. "@script: RCPT=451 4.3.0 Later"
  @delivered: alice=1 bob=0          Postfix only: exact count per user after the queue is
                                     empty; unlisted users must have received nothing
  @contains: <user> <text>           Postfix only: that user's message contains text
  @messages: N                       scripted only: messages that got the final dot
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.smtpclient import ConnectionClosed, RawSMTP

DATA_DIR = Path(__file__).parent / "data"
DIALOGUES = sorted(DATA_DIR.glob("dialogue_*.txt"))

_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[rnt0\\])")
_SIMPLE = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\x00", b"\\": b"\\"}


def unescape(text: str) -> bytes:
    def replace(match: re.Match[bytes]) -> bytes:
        token = match.group(1)
        return bytes([int(token[1:], 16)]) if token.startswith(b"x") else _SIMPLE[token]

    return _ESCAPE.sub(replace, text.encode("utf-8"))


@dataclass
class Step:
    kind: str  # "send", "expect" or "closed"
    lineno: int
    data: bytes = b""
    prefix: str = ""


@dataclass
class Dialogue:
    path: Path
    downstream: str = "postfix"
    script: dict[str, str] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)
    contains: list[tuple[str, bytes]] = field(default_factory=list)
    messages: int | None = None
    steps: list[Step] = field(default_factory=list)


def parse(path: Path) -> Dialogue:
    dialogue = Dialogue(path)
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip("\n")
        where = f"{path.name}:{lineno}"
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("@"):
            key, _, value = line[1:].partition(":")
            value = value.strip()
            if key == "downstream":
                assert value in ("postfix", "scripted"), where
                dialogue.downstream = value
            elif key == "script":
                stage, _, behaviour = value.partition("=")
                dialogue.script[stage.strip()] = behaviour.strip()
            elif key == "delivered":
                for item in value.split():
                    user, _, count = item.partition("=")
                    dialogue.delivered[user] = int(count)
            elif key == "contains":
                user, _, text = value.partition(" ")
                dialogue.contains.append((user, unescape(text)))
            elif key == "messages":
                dialogue.messages = int(value)
            else:
                raise ValueError(f"{where}: unknown header {key!r}")
        elif line.startswith("C:"):
            dialogue.steps.append(Step("send", lineno, unescape(line[3:]) + b"\r\n"))
        elif line.startswith("R:"):
            dialogue.steps.append(Step("send", lineno, unescape(line[3:])))
        elif line.startswith("S:"):
            dialogue.steps.append(Step("expect", lineno, prefix=line[3:].strip()))
        elif line.strip() == "CLOSED":
            dialogue.steps.append(Step("closed", lineno))
        else:
            raise ValueError(f"{where}: cannot parse {line!r}")
    return dialogue


def run_dialogue(dialogue: Dialogue, host: str, port: int) -> list[str]:
    """Play the client side; fail at the first reply that does not match. Returns the
    transcript (for the failure messages of later checks)."""
    transcript: list[str] = []
    pending = bytearray()
    client = RawSMTP()
    client.connect(host, port, read_greeting=False)

    def flush() -> None:
        if pending:
            transcript.append(f"C> {bytes(pending)!r}")
            client.send(bytes(pending))
            pending.clear()

    def fail(step: Step, what: str) -> None:
        log = "\n".join(transcript)
        pytest.fail(f"{dialogue.path.name}:{step.lineno}: {what}\n--- transcript ---\n{log}",
                    pytrace=False)

    with client:
        for step in dialogue.steps:
            if step.kind == "send":
                pending += step.data
                continue
            flush()
            if step.kind == "closed":
                if not client.closed_by_peer(timeout=5):
                    fail(step, "the server did not close the connection")
                transcript.append("S> (closed)")
                continue
            try:
                reply = client.read_reply()
            except (ConnectionClosed, TimeoutError) as exc:
                fail(step, f"expected {step.prefix!r}, got {exc!r}")
                raise  # unreachable: pytest.fail raises
            rendered = f"{reply.code} {reply.lines[0]}" if reply.lines else str(reply.code)
            transcript.append(f"S> {reply}")
            if not rendered.startswith(step.prefix):
                fail(step, f"expected a reply starting {step.prefix!r}, got {rendered!r}")
        flush()
    return transcript


@pytest.fixture(scope="module")
def postfix_proxy(
    postfix: PostfixInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("proxy")
    with ProxyProcess(base_config(postfix.port), workdir=workdir) as proxy:
        yield proxy


def test_dialogue_files_exist() -> None:
    # A renamed data directory must not turn the parametrized test into zero tests.
    assert len(DIALOGUES) >= 10, DIALOGUES


@pytest.mark.parametrize("path", DIALOGUES, ids=lambda p: p.stem.removeprefix("dialogue_"))
def test_dialogue(path: Path, request: pytest.FixtureRequest) -> None:
    dialogue = parse(path)
    if dialogue.downstream == "scripted":
        _run_scripted(dialogue, request)
    else:
        _run_postfix(dialogue, request)


def _run_postfix(dialogue: Dialogue, request: pytest.FixtureRequest) -> None:
    proxy: ProxyProcess = request.getfixturevalue("postfix_proxy")
    mailboxes: PostfixInstance = request.getfixturevalue("mailboxes")
    transcript = run_dialogue(dialogue, proxy.host, proxy.port)
    for user, count in dialogue.delivered.items():
        if count:
            mailboxes.wait_for_deliveries(count, user=user)
    # Only now is "nothing (more) was delivered" a final answer.
    mailboxes.wait_queue_empty()
    counts = {user: len(mailboxes.deliveries(user)) for user in mailboxes.users}
    expected = {user: dialogue.delivered.get(user, 0) for user in mailboxes.users}
    assert counts == expected, "\n".join(transcript)
    for user, text in dialogue.contains:
        messages = mailboxes.deliveries(user)
        assert any(text in m for m in messages), f"{text!r} not in {user}'s mail: {messages!r}"


def _run_scripted(dialogue: Dialogue, request: pytest.FixtureRequest) -> None:
    make_server: Callable[..., ScriptedDownstream] = request.getfixturevalue("scripted")
    make_proxy: Callable[..., ProxyProcess] = request.getfixturevalue("proxy_factory")
    server = make_server(dialogue.script)
    proxy = make_proxy(base_config(server.port))
    run_dialogue(dialogue, proxy.host, proxy.port)
    if dialogue.messages is not None:
        # Every reply has been read, so a dot the proxy sent has been answered already.
        assert len(server.messages) == dialogue.messages, server.describe()
