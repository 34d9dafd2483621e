"""ClamAV's clamd: the message streamed with INSTREAM as it arrives.

    zINSTREAM\0, then each part as a 4-byte big-endian length and the bytes, then a zero
    length; the answer: "stream: OK\0" or "stream: NAME FOUND\0" (or "... ERROR\0").

The parts go to clamd while they go to the mail server: at the end of data only the last part
and clamd's scan remain. A write waits while clamd has not taken the previous ones (memory
stays a few parts; a slow clamd slows the client). clamd refuses a stream past its
StreamMaxLength, so scanners.clamd.max_bytes must not exceed it: past max_bytes the first
max_bytes are still scanned (a virus in them refuses the message) and the rest is not.
A connection per message, not a pool of IDSESSION sessions: the stream cannot be replayed, so a
kept session that clamd closed meanwhile (IdleTimeout, an error in the previous stream) would
become a spurious tempfail; a loopback connect costs far less.
"""

from __future__ import annotations

import asyncio
import struct

from ..checks.base import Envelope, MessageInfo, SessionInfo
from ..config import ClamdConfig, HostPort
from ..policy.verdict import Verdict
from .base import (
    ScanError,
    ScannerCheck,
    ScanObserver,
    ScanResult,
    address_of,
    close_writer,
    open_stream,
)

PART = 256 * 1024  # the largest part announced at once
_REPLY_LIMIT = 4096


class Clamd(ScannerCheck):
    scans_prefix = True

    def __init__(self, config: ClamdConfig) -> None:
        super().__init__("clamd", config.timeout, config.on_error, config.max_bytes)
        self.address: HostPort | str = address_of(config.address, "scanners.clamd.address")

    def observer(self, session: SessionInfo, envelope: Envelope, head: bytes) -> ScanObserver:
        return _Stream(self, session, envelope, head)

    def decide(self, result: ScanResult, message: MessageInfo, session: SessionInfo
               ) -> Verdict | None:
        if result.verdict != "infected":
            return None
        return Verdict.reject(f"Virus found: {result.virus}", 554, "5.7.1", source="scanner",
                              check=self.name)


def parse_reply(reply: bytes) -> ScanResult:
    text = reply.rstrip(b"\0").decode("utf-8", "replace").strip()
    answer = text.removeprefix("stream:").strip()
    if answer == "OK":
        return ScanResult("clamd", "clean")
    if answer.endswith(" FOUND"):
        name = answer.removesuffix(" FOUND").strip()
        # the name goes into a reply and a log line: printable, bounded
        name = "".join(c if c.isprintable() and c != " " else "_" for c in name)[:100]
        return ScanResult("clamd", "infected", virus=name or "unknown")
    raise ScanError("protocol", f"clamd answered {text[:200]!r}")


class _Stream(ScanObserver):
    check: Clamd

    def __init__(self, check: Clamd, session: SessionInfo, envelope: Envelope,
                 head: bytes) -> None:
        super().__init__(check, session, envelope, head)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _send(self, data: bytes) -> None:
        if self.writer is None:
            self.reader, self.writer = await open_stream(self.check.address)
            self.writer.write(b"zINSTREAM\0")
        writer = self.writer
        view = memoryview(data)
        for offset in range(0, len(data), PART):
            part = view[offset : offset + PART]
            writer.writelines((struct.pack(">I", len(part)), part))
        await writer.drain()

    async def _verdict(self) -> ScanResult:
        assert self.reader is not None and self.writer is not None
        self.writer.write(b"\0\0\0\0")
        await self.writer.drain()
        try:
            reply = await self.reader.readuntil(b"\0")
        except asyncio.IncompleteReadError as exc:
            raise ScanError("protocol", f"clamd closed the connection: {exc.partial[:200]!r}"
                            ) from None
        except asyncio.LimitOverrunError:
            raise ScanError("protocol", "clamd's answer is too long") from None
        if len(reply) > _REPLY_LIMIT:
            raise ScanError("protocol", "clamd's answer is too long")
        return parse_reply(reply)

    def _close(self) -> None:
        close_writer(self.writer)
