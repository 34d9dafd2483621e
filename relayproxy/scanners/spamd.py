"""SpamAssassin's spamd: the SPAMC/1.5 protocol, SYMBOLS with Content-length.

    SYMBOLS SPAMC/1.5\r\nContent-length: N\r\n\r\n<message>
    -> SPAMD/1.1 0 EX_OK\r\nContent-length: M\r\nSpam: True ; 15.2 / 5.0\r\n\r\nSYM1,SYM2

The length must come first, so the message is copied as it arrives, up to
scanners.spamd.max_bytes (spamc's own default: 500 KB), and sent at the end of data; a larger
message is not scanned by spamd (logged and counted). spamd answers one request per
connection: there is nothing to pool. Spam refuses the message (550 5.7.1), or with
action = "tag" adds X-Spam-Flag/X-Spam-Score/X-Spam-Status where the header section is still
held (server.hold_bytes).
"""

from __future__ import annotations

import asyncio
import logging

from ..checks.base import Envelope, MessageInfo, SessionInfo
from ..config import HostPort, SpamdConfig
from ..policy.verdict import Verdict
from .base import (
    ScanError,
    ScannerCheck,
    ScanObserver,
    ScanResult,
    address_of,
    close_writer,
    header_field,
    open_stream,
)

log = logging.getLogger("relayproxy.scanners")
_REPLY_LIMIT = 256 * 1024  # the symbol list of a message: a few KB


class Spamd(ScannerCheck):
    def __init__(self, config: SpamdConfig) -> None:
        super().__init__("spamd", config.timeout, config.on_error, config.max_bytes,
                         adds_headers=config.action == "tag")
        self.address: HostPort | str = address_of(config.address, "scanners.spamd.address")
        self.action = config.action

    def observer(self, session: SessionInfo, envelope: Envelope, head: bytes) -> ScanObserver:
        return _Copy(self, session, envelope, head)

    def decide(self, result: ScanResult, message: MessageInfo, session: SessionInfo
               ) -> Verdict | None:
        spam = result.verdict == "spam"
        if self.action == "reject":
            if not spam:
                return None
            return Verdict.reject(f"Message considered spam (spamd score {result.score:g})",
                                  550, "5.7.1", source="scanner", check=self.name)
        headers = message.headers
        if headers is None:
            return None
        if message.headers_sent:
            log.info("session %s: spamd's X-Spam fields not written: the message was larger "
                     "than server.hold_bytes", session.session_id)
            return None
        status = (f"{'Yes' if spam else 'No'}, score={result.score:g} "
                  f"required={result.required:g} tests={','.join(result.symbols) or 'none'}")
        for field in (header_field("X-Spam-Status", status),
                      header_field("X-Spam-Score", f"{result.score:g}"),
                      header_field("X-Spam-Flag", "YES" if spam else "NO")):
            headers.prepend_raw(field)
        return None


def parse_reply(reply: bytes) -> ScanResult:
    head, sep, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("ascii", "replace").split("\r\n")
    status = lines[0].split(None, 2)
    if not sep or len(status) < 2 or not status[0].startswith("SPAMD/"):
        raise ScanError("protocol", f"spamd answered {reply[:200]!r}")
    if status[1] != "0":
        raise ScanError("protocol", f"spamd answered {lines[0][:200]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() != "spam":
            continue
        # "True ; 15.2 / 5.0"
        flag, _, scores = value.partition(";")
        score, _, required = scores.partition("/")
        try:
            score_value, required_value = float(score), float(required)
        except ValueError:
            break
        symbols = tuple(s.strip() for s in body.decode("ascii", "replace").split(",")
                        if s.strip() and s.strip().replace("_", "").isalnum())
        spam = flag.strip().lower() in ("true", "yes")
        return ScanResult("spamd", "spam" if spam else "clean", score_value, required_value,
                          symbols)
    raise ScanError("protocol", f"spamd's answer has no Spam line: {reply[:200]!r}")


class _Copy(ScanObserver):
    check: Spamd

    def __init__(self, check: Spamd, session: SessionInfo, envelope: Envelope,
                 head: bytes) -> None:
        super().__init__(check, session, envelope, head)
        self.parts: list[bytes] = []
        self.writer: asyncio.StreamWriter | None = None

    async def _send(self, data: bytes) -> None:
        self.parts.append(data)  # bounded by max_bytes: over it, the copy is dropped

    async def _verdict(self) -> ScanResult:
        message = b"".join(self.parts)
        self.parts = []
        reader, self.writer = await open_stream(self.check.address)
        self.writer.write(b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(message))
        self.writer.write(message)
        await self.writer.drain()
        del message
        if self.writer.can_write_eof():
            self.writer.write_eof()
        reply = await reader.read(_REPLY_LIMIT)
        while reply and len(reply) < _REPLY_LIMIT and (more := await reader.read(
                _REPLY_LIMIT - len(reply))):
            reply += more
        return parse_reply(reply)

    def _close(self) -> None:
        self.parts = []
        close_writer(self.writer)
