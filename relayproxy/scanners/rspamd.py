"""rspamd: its HTTP protocol (POST /checkv2), the message streamed as a chunked request body.

The envelope and the client go as request headers (IP, Helo, Hostname, From, Rcpt per
recipient, Queue-Id, User-Agent); the message follows as it arrives (rspamd 3.4 takes a chunked
body), through a queue of two parts that a slow rspamd fills: the client then waits.
Connections are kept alive and reused (aiohttp's pool) where the server allows it: rspamd 3.4's
normal worker answers "Connection: close" every time, whatever the request asks for, so there
each message connects. aiohttp rather than httpx: a request costs the proxy about a quarter of
the CPU (0.9 against 3.7 million instructions; tests/bench/RESULTS.md, issue 8). Past
scanners.rspamd.max_bytes the request is abandoned and the message is not scanned (logged and
counted; rspamd's own max_message, 50 MiB by default, must not be lower).

Actions become replies: reject -> 550 5.7.1 with rspamd's SMTP message; soft reject and
greylist -> 451 4.7.1; add header -> X-Spam: Yes and X-Spam-Score; rewrite subject -> the
Subject rspamd wrote; no action -> nothing. Header fields rspamd asks for (its milter_headers
module: milter.add_headers / remove_headers) are applied too. Fields go only where the header
section is still held (server.hold_bytes); for a larger message that has left, the action is
logged and the score stays for the rules (rspamd_score_over) at the withheld dot.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.header
import json
import re
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .. import __version__
from ..checks.base import Envelope, MessageInfo, SessionInfo
from ..config import RspamdConfig
from ..headers import HeaderSection, HeadersSent
from ..policy.verdict import Verdict
from .base import ScanError, ScannerCheck, ScanObserver, ScanResult, header_field, log

_VERDICTS = {"no action": "clean", "reject": "reject", "soft reject": "tempfail",
             "greylist": "tempfail", "add header": "add_header",
             "rewrite subject": "rewrite_subject"}
_FIELD_NAME = re.compile(r"\A[!-9;-~]+\Z")
_QUEUE = 2  # parts waiting for rspamd: the memory a slow rspamd may hold per message


class Rspamd(ScannerCheck):
    def __init__(self, config: RspamdConfig) -> None:
        super().__init__("rspamd", config.timeout, config.on_error, config.max_bytes,
                         adds_headers=True)
        self.url = config.url.rstrip("/") + "/checkv2"
        # the observer bounds each wait itself (each part taken, the answer); a request lasts
        # as long as the client takes to send the message, so there is no total or read limit
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.timeout)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """Keep-alive connections, reused by the messages that follow; made at the first
        message, in the running loop (aiohttp binds a session to its loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                headers={"User-Agent": f"relayproxy/{__version__}"}, timeout=self._timeout,
                skip_auto_headers=("Accept", "Accept-Encoding"), auto_decompress=False)
            # the check goes with a reload (or the end): its connections go too
            weakref.finalize(self, _release, self._session)
        return self._session

    def observer(self, session: SessionInfo, envelope: Envelope, head: bytes) -> ScanObserver:
        return _Request(self, session, envelope, head)

    def request_headers(self, session: SessionInfo, envelope: Envelope) -> list[
            tuple[str, str]]:
        def value(text: str) -> str:
            # UTF-8 on the wire; an 8-bit byte that was not UTF-8 (kept as a surrogate) is "?"
            return text if text.isascii() else text.encode("utf-8", "replace").decode()

        headers = [("IP", session.client_ip), ("Queue-Id", session.session_id)]
        if session.helo:
            headers.append(("Helo", value(session.helo)))
        if session.client_name is not None:
            # "unknown": looked up, no name (as Postfix tells milters); absent: not looked up
            headers.append(("Hostname", value(session.client_name or "unknown")))
        headers.append(("From", value(envelope.sender)))
        headers += [("Rcpt", value(r)) for r in envelope.recipients]
        return headers


def _release(session: aiohttp.ClientSession) -> None:
    """Close a dropped check's kept connections (an unclosed session would be reported)."""
    connector = session.connector
    session.detach()
    if connector is not None:
        with contextlib.suppress(RuntimeError):  # the loop has ended: so does the process
            connector.close()


def _smtp_message(answer: dict[str, Any], default: str) -> str:
    messages = answer.get("messages")
    text = messages.get("smtp_message") if isinstance(messages, dict) else None
    if not isinstance(text, str) or not text.strip():
        return default
    # one line of printable text: it becomes the reply's text
    text = " ".join(text.split())
    return "".join(c for c in text if c.isprintable())[:300] or default


def _field(name: str, value: str) -> bytes | None:
    """A field rspamd asked for, as CRLF-folded bytes; None if it cannot be one."""
    if not _FIELD_NAME.match(name):
        return None
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [lines[0].strip()] + ["\t" + line.strip() for line in lines[1:] if line.strip()]
    text = "\r\n".join(lines)
    if not text.isascii():  # RFC 2047: the section may go to a downstream without SMTPUTF8
        text = email.header.Header(" ".join(text.split()), "utf-8").encode()
    return f"{name}: {text}\r\n".encode("ascii", "replace")


def _milter_fields(answer: dict[str, Any]) -> tuple[list[bytes], list[str]]:
    milter = answer.get("milter")
    if not isinstance(milter, dict):
        return [], []
    added: list[bytes] = []
    for name, spec in (milter.get("add_headers") or {}).items():
        for item in spec if isinstance(spec, list) else [spec]:
            text = item.get("value") if isinstance(item, dict) else item
            if isinstance(text, str) and (field := _field(str(name), text)) is not None:
                added.append(field)
    removed = [str(n) for n in (milter.get("remove_headers") or {})]
    return added, removed


class _Request(ScanObserver):
    check: Rspamd

    def __init__(self, check: Rspamd, session: SessionInfo, envelope: Envelope,
                 head: bytes) -> None:
        super().__init__(check, session, envelope, head)
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE)
        self.task: asyncio.Task[dict[str, Any]] | None = None
        self.answer: dict[str, Any] = {}

    async def _body(self) -> AsyncIterator[bytes]:
        while (part := await self.queue.get()) is not None:
            yield part

    async def _post(self) -> dict[str, Any]:
        check = self.check
        try:
            # a chunked request body: the parts as they come
            async with check.session().post(
                    check.url, data=self._body(),
                    headers=check.request_headers(self.session, self.envelope)) as response:
                status = response.status
                content = await response.read()
        except TimeoutError:
            raise ScanError("timeout", f"rspamd timed out ({check.timeout:g}s)") from None
        except aiohttp.ClientConnectorError as exc:
            raise ScanError("connect", f"cannot connect to {check.url}: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ScanError("protocol", f"rspamd request failed: {exc!r}") from None
        if status != 200:
            raise ScanError("protocol", f"rspamd answered HTTP {status}: {content[:200]!r}")
        try:
            answer = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            answer = None
        if not isinstance(answer, dict):
            raise ScanError("protocol", f"rspamd answered {content[:200]!r}")
        return answer

    def _started_task(self) -> asyncio.Task[dict[str, Any]]:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._post())
            # a failed request takes no more parts: let a waiting feed see it
            self.task.add_done_callback(self._drain_queue)
        return self.task

    def _drain_queue(self, task: asyncio.Task[dict[str, Any]]) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        if not task.cancelled():
            task.exception()  # seen here: a failure is reported once, by end()

    def _raise_if_done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        if task.done():
            exc = None if task.cancelled() else task.exception()
            if isinstance(exc, ScanError):
                raise exc
            raise ScanError("protocol", f"rspamd request ended early: {exc!r}")

    async def _send(self, data: bytes) -> None:
        task = self._started_task()
        self._raise_if_done(task)
        if data:
            await self.queue.put(data)  # waits while rspamd has not taken the last parts
            self._raise_if_done(task)

    async def _verdict(self) -> ScanResult:
        task = self._started_task()
        if not task.done():
            await self.queue.put(None)
        answer = await asyncio.shield(task)
        self.answer = answer
        action = answer.get("action")
        verdict = _VERDICTS.get(action) if isinstance(action, str) else None
        if verdict is None:
            raise ScanError("protocol", f"rspamd answered action {action!r}")
        try:
            score = float(answer.get("score", 0.0))
            required = float(answer.get("required_score", 0.0))
        except (TypeError, ValueError):
            raise ScanError("protocol", "rspamd's score is not a number") from None
        symbols = answer.get("symbols")
        names = tuple(str(n) for n in symbols) if isinstance(symbols, dict) else ()
        return ScanResult("rspamd", verdict, score, required, names)

    def decide(self, result: ScanResult, message: MessageInfo) -> Verdict | None:
        # here rather than in the check: it needs the whole answer (message, fields, subject)
        check = self.check
        if result.verdict == "reject":
            return Verdict.reject(_smtp_message(self.answer, "Message considered spam"),
                                  550, "5.7.1", source="scanner", check=check.name)
        if result.verdict == "tempfail":
            return Verdict.tempfail(_smtp_message(self.answer, "Try again later"), 451,
                                    "4.7.1", source="scanner", check=check.name)
        headers = message.headers
        if result.error or headers is None:
            return None
        added, removed = _milter_fields(self.answer)
        if result.verdict == "add_header":
            added += [header_field("X-Spam", "Yes"),
                      header_field("X-Spam-Score", f"{result.score:g} / {result.required:g}")]
        subject = self.answer.get("subject")
        rewrite = result.verdict == "rewrite_subject" and isinstance(subject, str)
        if not (added or removed or rewrite):
            return None
        if message.headers_sent:
            log.info("session %s: rspamd's header fields not written (%s): the message was "
                     "larger than server.hold_bytes", self.session.session_id,
                     result.verdict)
            self.envelope.log_fields["rspamd_headers"] = "too_late"
            return None
        with contextlib.suppress(HeadersSent):
            self._edit(headers, added, removed, subject if rewrite else None)
        return None

    @staticmethod
    def _edit(headers: HeaderSection, added: list[bytes], removed: list[str],
              subject: str | None) -> None:
        for name in removed:
            headers.remove(name)
        if subject is not None:
            field = _field("Subject", " ".join(subject.split()))
            if field is not None:
                headers.remove("Subject")
                headers.prepend_raw(field)
        for field in reversed(added):
            headers.prepend_raw(field)

    def _close(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
