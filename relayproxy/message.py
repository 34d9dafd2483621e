"""The DATA pipeline: from the client's 354 to the withheld final dot.

    client bytes -> DotReader (end of data, line checks) -> header section, held and parsed
      -> on_headers checks (may remove and prepend fields) -> body observers (message bytes)
      -> held window -> downstream; at the end: observers' and end-of-data verdicts, then the dot

1. The header section is held until it ends (or server.max_header_size: refused 552 after the
   data), parsed once and offered to the checks; the Received field goes on top of it. Nothing
   goes downstream before that, so a check can still remove a forged field.
2. With a check that adds fields at the end of data (Need.END_HEADERS), the message is held up
   to server.hold_bytes: one that ends within it is forwarded whole after the end-of-data checks
   ran, so results computed over the whole message go on top, truthfully. A larger one starts
   streaming when the window is full, with the fields known by then (the observers are told
   first: BodyObserver.headers_leaving); its end-of-data verdict still decides at the withheld
   dot.
3. Body observers get message bytes (dot-stuffing removed) as the data arrives, and are awaited
   before the next read: a slow observer slows the client (backpressure, not buffering).

Whatever goes wrong, the client's data is read to its terminator (streaming notes 3): an early
reply would make the rest of the message be read as commands. Memory per session is bounded:
the header section, the window, and a read and a write buffer.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from .checks import Envelope, MessageInfo, Pipeline, SessionInfo
from .checks.base import BodyObserver, Observing, check_failed, guarded
from .config import ServerConfig
from .connection import ClientConnection
from .dotreader import DotReader, Unstuffer
from .downstream import DownstreamError
from .headers import HeaderSection, complete_lines, find_end
from .leg import DownstreamLeg
from .policy.verdict import Verdict
from .replies import Reply

_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
OBSERVE_BATCH = 64 * 1024  # body octets gathered before the observers are fed


@dataclass(slots=True)
class Received:
    """The end of the DATA phase as the session needs it."""

    message: MessageInfo
    verdict: Verdict | None  # refusal: the downstream must never get the dot
    failure: DownstreamError | None  # the downstream failed while the data came in


class MessageStream:
    def __init__(
        self,
        server: ServerConfig,
        pipeline: Pipeline,
        session: SessionInfo,
        envelope: Envelope,
        leg: DownstreamLeg,
        received_field: bytes,
    ) -> None:
        self.server = server
        self.pipeline = pipeline
        self.session = session
        self.envelope = envelope
        self.leg = leg
        self.received_field = received_field
        self.reader = DotReader(server.max_line_length, server.bare_newline)
        self.info = MessageInfo(0, normalized=server.bare_newline == "normalize")
        self.verdict: Verdict | None = None  # decided before the end (a header check)
        self.failure: DownstreamError | None = None
        self._unstuff = Unstuffer()
        self._head: bytearray | None = bytearray()  # the header section so far (wire form)
        self._scanned = 0
        self.headers: HeaderSection | None = None
        self._observers: list[Observing] = []
        self._awaited = False  # an observer gives a verdict at the end (a scanner)
        self._batch: list[bytes] = []  # body not yet fed to the observers
        self._batch_size = 0
        # the held window: None once streaming
        self._window: list[bytes] | None = None
        self._window_size = 0
        self._out: list[bytes] = []  # to write downstream at the next drain (or with the dot)
        self._hold = server.hold_bytes if pipeline.adds_end_headers else 0

    @property
    def _failed(self) -> bool:
        info = self.info
        return (self.verdict is not None or self.reader.failed or info.header_too_big
                or info.eight_bit or self.reader.size > self.server.max_message_size)

    async def receive(self, client: ClientConnection) -> Received:
        """Read the message to its terminator, forwarding and observing it.

        Raises TimeoutError when the client stalls longer than server.data_timeout (the caller
        aborts the downstream: nothing is delivered).
        """
        reader = self.reader
        try:
            while not reader.done:
                async with asyncio.timeout(self.server.data_timeout):
                    # with a scanner, what piled up while the last piece was handled goes on
                    # in OBSERVE_BATCH pieces: each reaches the scanner and the downstream at
                    # once, and the end of data finds at most one piece not yet sent to it
                    chunk = await client.read_chunk(OBSERVE_BATCH if self._awaited else 0)
                forward, rest = reader.feed(chunk)
                if forward and not self._failed:
                    await self._take(forward)
            client.unread(rest)
            if self._batch and not self._failed:
                await self._observe()  # the last piece, when the terminator came alone
            if self._head is not None and not self._failed:
                await self._headers_done(bytes(self._head), b"", b"")  # it was all header
            self.info.size = reader.size
            self.info.bare_newline = reader.bare_newline
            self.info.line_too_long = reader.line_too_long
            self.info.headers = self.headers
            if self.verdict is None and self.failure is None:
                self.verdict = await self._end_verdict()
        finally:
            if self.verdict is not None or self.failure is not None or not reader.done:
                self._abort_observers()
        return Received(self.info, self.verdict, self.failure)

    async def deliver(self) -> Reply:
        """The end-of-data checks passed: send what is still held, then the dot, at once."""
        if self._window is not None:
            self._seal()
            self._write(self._window)
            self._window = None
        if self.failure is not None:
            raise self.failure
        rest = b"".join(self._out)
        self._out.clear()
        return await self.leg.finish(rest)

    # the stream, in order

    async def _take(self, forward: bytes) -> None:
        if self.leg.seven_bit and _EIGHT_BIT.search(forward):
            self.info.eight_bit = True  # refused at the end; not one 8-bit byte goes down
            return
        if self._head is None:
            if self._observers or self._window is not None or self.failure is not None:
                await self._body(forward)
                return
            # the plain stream, once the header section is gone: nothing observes, nothing
            # is held (this runs for every chunk of a large message: kept short)
            self._out.append(forward)
            if not self.reader.done:
                await self._drain()
            return
        head = self._head
        head += forward
        found = find_end(head, self._scanned)
        if found is None:
            self._scanned = complete_lines(head, self._scanned)
            if len(head) > self.server.max_header_size:
                self.info.header_too_big = True
                self._head = None
            return
        end, body_start = found
        if end > self.server.max_header_size:
            self.info.header_too_big = True
            self._head = None
            return
        await self._headers_done(bytes(head[:end]), bytes(head[end:body_start]),
                                 bytes(head[body_start:]))

    async def _headers_done(self, section: bytes, separator: bytes, body: bytes) -> None:
        self._head = None
        headers = self.headers = HeaderSection.parse(section, separator)
        if self.pipeline.wants_headers:
            self.verdict = await self.pipeline.headers(self.session, self.envelope, headers)
            if self.verdict is not None:
                return
        self._observers = self.pipeline.observers(self.session, self.envelope)
        self._awaited = any(_awaited(w.observer) for w in self._observers)
        if self._hold:
            self._window = []
        else:
            self._seal()
        if body:
            await self._body(body)  # what arrived with the header section

    async def _body(self, forward: bytes) -> None:
        self._forward(forward)
        if self._observers:
            self._batch.append(self._unstuff(forward))
            self._batch_size += len(forward)
            done = self.reader.done
            if self._batch_size >= OBSERVE_BATCH or done:
                if not done or (self._awaited and self.reader.size >= OBSERVE_BATCH):
                    # the downstream's part leaves before the observers get theirs: it travels
                    # while a scanner takes its copy, and neither waits on the other; at the
                    # end the mail server gets the rest while the scanners decide, the dot
                    # alone after them (a small message still goes with its dot, in one write)
                    self._send()
                await self._observe()
                if self.verdict is not None:
                    return
        if not self.reader.done:
            await self._drain()
        # else the last part goes down with the dot, in one write (one segment, no Nagle)

    async def _observe(self) -> None:
        """Feed the gathered body to every observer (clients write in small pieces: one call
        per piece would cost more than most observers' work)."""
        batch = self._batch
        body = batch[0] if len(batch) == 1 else b"".join(batch)
        batch.clear()
        self._batch_size = 0
        for watch in self._observers:
            try:
                if watch.deadline is None:
                    await watch.observer.feed(body)
                else:
                    async with asyncio.timeout(watch.deadline):
                        await watch.observer.feed(body)
            except Exception as exc:
                # its failure policy decides (a tempfail here); the data is still read to its end
                self.verdict = check_failed(watch.name, "body", exc)
                return

    def _forward(self, data: bytes) -> None:
        window = self._window
        if window is None:
            self._write((data,))
            return
        window.append(data)
        self._window_size += len(data)
        if self._window_size > self._hold:
            # too large to hold whole: the fields known now go down, the rest streams
            self._seal()
            self._write(window)
            self._window = None

    def _seal(self) -> None:
        headers = self.headers
        assert headers is not None
        # observers are still watching only when the section leaves before the end of data
        # (_end_verdict took them): what they know by now may still go in their fields
        for watch in self._observers:
            try:
                watch.observer.headers_leaving(headers)
            except Exception as exc:
                self.verdict = self.verdict or check_failed(watch.name, "headers", exc)
        headers.prepend_raw(self.received_field)
        self._write((headers.wire(),))
        headers.sealed = True
        self.info.headers_sent = True

    def _write(self, parts: list[bytes] | tuple[bytes, ...]) -> None:
        # gathered, and written once per chunk read: the header section, the body part that
        # came with it (and, at the end, the dot) travel in one write
        if self.failure is None:
            self._out.extend(parts)

    def _send(self) -> None:
        """Write what is gathered, without waiting."""
        if self.failure is not None or self.leg.conn is None or not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        try:
            self.leg.conn.write(data)
        except DownstreamError as exc:
            self.failure = exc

    async def _drain(self) -> None:
        """Write what is gathered; wait while the downstream has not taken enough of it."""
        self._send()
        if self.failure is not None or self.leg.conn is None:
            return
        try:
            await self.leg.conn.drain()
        except DownstreamError as exc:
            self.failure = exc

    # the end

    async def _end_verdict(self) -> Verdict | None:
        if self._failed:
            # the limits refuse it; nobody else needs to be asked
            return await self.pipeline.data_end(self.session, self.envelope, self.info)
        observers, self._observers = self._observers, []
        # an observer that keeps BodyObserver's end has no verdict to give: not called (the
        # rules engine reads the body through one and decides at on_data_end)
        observers = [w for w in observers if _awaited(w.observer)]
        verdicts: list[Verdict | None] = []
        if len(observers) == 1:  # no tasks to spawn for one (the usual case)
            (w,) = observers
            verdicts = [await guarded(w.name, "data", w.observer.end(self.info), w.deadline)]
        elif observers:
            # in parallel: a scanner's verdict may take a while, and each has its deadline
            verdicts = await asyncio.gather(*(
                guarded(w.name, "data", w.observer.end(self.info), w.deadline)
                for w in observers))
        for verdict in verdicts:
            if verdict is not None:
                return verdict
        return await self.pipeline.data_end(self.session, self.envelope, self.info)

    def _abort_observers(self) -> None:
        observers, self._observers = self._observers, []
        for watch in observers:
            watch.observer.abort()


def _awaited(observer: BodyObserver) -> bool:
    """It has a verdict to give at the end of data (it overrides BodyObserver.end)."""
    return type(observer).end is not BodyObserver.end
