"""What the content scanners share: the check, its per-message observer, failures and results.

A scanner is a Check whose body observer sends the message to the scanner daemon as it arrives
(the header section it saw at on_headers first) and whose end() awaits the daemon's verdict,
while the mail server still waits for the final dot. Every wait on a daemon (connecting, each
write, the verdict) is bounded by the scanner's `timeout`; a failure or a timeout ends in
`on_error`: "tempfail" (451 4.7.1, Postfix's milter_default_action) or "accept" (the message
goes on unscanned, logged and counted). feed() never raises: a failed scanner stops taking
data and the failure is decided once, at the end of data, after the client's data was read.

A message larger than `max_bytes` is not (or, for clamd, only partly) scanned: that is logged
(warning), counted (relayproxy_scanner_errors_total{kind="too_big"}) and on the transaction
line (`NAME=skipped NAME_error=too_big`), never a silent pass.

Results go to Envelope.facts[result_key(name)] (a ScanResult) for the rules engine
(relayproxy.policy.rules: rspamd_score_over, rspamd_symbol, spamd_score_over) and to
Envelope.log_fields for the transaction line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Literal

from .. import metrics
from ..checks.base import BodyObserver, Check, Envelope, MessageInfo, Need, SessionInfo
from ..config import ConfigError, HostPort, parse_hostport
from ..headers import HeaderSection
from ..policy.verdict import Verdict

log = logging.getLogger("relayproxy.scanners")

ErrorKind = Literal["connect", "timeout", "protocol", "too_big"]


class ScanError(Exception):
    """A scanner failed; kind is a relayproxy_scanner_errors_total label."""

    def __init__(self, kind: ErrorKind, text: str) -> None:
        super().__init__(text)
        self.kind: ErrorKind = kind


@dataclass(frozen=True, slots=True)
class ScanResult:
    """One scanner's answer about one message."""

    scanner: str
    # a relayproxy_scanner_verdicts_total label: clean, infected, spam, reject, tempfail,
    # add_header, rewrite_subject, skipped; "error" when it failed (on_error = "tempfail")
    verdict: str
    score: float | None = None  # rspamd, spamd
    required: float | None = None  # the score the scanner calls spam at
    symbols: tuple[str, ...] = ()  # rspamd, spamd
    virus: str = ""  # clamd
    error: str = ""  # the ErrorKind when not (wholly) scanned


def result_key(scanner: str) -> str:
    """Where a scanner's ScanResult is kept in Envelope.facts."""
    return f"scanner.{scanner}"


def address_of(address: str, key: str) -> HostPort | str:
    """A unix socket path (kept as str) or host:port."""
    return address if address.startswith("/") else parse_hostport(address, key)


# Octets buffered towards a scanner before a write waits for it (asyncio's default, 64 KiB, is
# one body batch: every batch would wait for the scanner to read it before going downstream)
WRITE_HIGH_WATER = 256 * 1024


async def open_stream(address: HostPort | str
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(address.host, address.port)
    except OSError as exc:
        raise ScanError("connect", f"cannot connect to {address}: {exc}") from None
    transport = writer.transport
    if isinstance(transport, asyncio.WriteTransport):
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    return reader, writer


def close_writer(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None and not writer.is_closing():
        writer.close()


_MAX_SYMBOLS_LOGGED = 40


class ScannerCheck(Check):
    """The check of one configured scanner; subclasses make its observer."""

    # past max_bytes, the part sent so far is still scanned (clamd: a virus found in it
    # refuses the message); otherwise nothing is
    scans_prefix = False
    instant = True  # it bounds its own waits with its `timeout`, and decides on_error itself

    def __init__(self, name: str, timeout: float, on_error: str, max_bytes: int,
                 adds_headers: bool = False) -> None:
        if name not in metrics.SCANNERS:
            raise ConfigError(f"scanners.{name}: unknown scanner")
        self.name = name
        self.timeout = timeout
        self.on_error = on_error
        self.max_bytes = max_bytes
        # END_HEADERS: small messages are held (server.hold_bytes) so its fields can go on top
        self.needs = frozenset({Need.HEADERS, Need.BODY,
                                *((Need.END_HEADERS,) if adds_headers else ())})
        self._head_key = f"{result_key(name)}.headers"
        self.verdicts = {v: metrics.SCANNER_VERDICTS.labels(name, v)
                         for v in metrics.SCANNER_VERDICTS_SEEN}
        self.errors = {k: metrics.SCANNER_ERRORS.labels(name, k)
                       for k in metrics.SCANNER_ERROR_KINDS}
        self.latency = metrics.SCANNER_LATENCY.labels(name)

    async def on_headers(self, session: SessionInfo, envelope: Envelope,
                         headers: HeaderSection) -> Verdict | None:
        # the observer is made next, without the headers: they are handed over here
        envelope.facts[self._head_key] = headers
        return None

    def body_observer(self, session: SessionInfo, envelope: Envelope) -> BodyObserver | None:
        headers = envelope.facts.pop(self._head_key, None)
        head = headers.message_bytes() if isinstance(headers, HeaderSection) else b""
        return self.observer(session, envelope, head)

    def observer(self, session: SessionInfo, envelope: Envelope, head: bytes) -> ScanObserver:
        raise NotImplementedError

    def decide(self, result: ScanResult, message: MessageInfo, session: SessionInfo
               ) -> Verdict | None:
        """The verdict for a scanner's answer (fields may be added while not headers_sent)."""
        return None

    def failed(self, error: ScanError) -> Verdict | None:
        if self.on_error == "accept":
            return None
        return Verdict.tempfail(f"Temporary failure in content scanning ({self.name}), "
                                "try again later", 451, "4.7.1", source="scanner",
                                check=self.name)


class ScanObserver(BodyObserver):
    """One message on its way to a scanner. Subclasses implement _send (the next part, head
    first), _verdict (the answer after the last part) and _close."""

    def __init__(self, check: ScannerCheck, session: SessionInfo, envelope: Envelope,
                 head: bytes) -> None:
        self.check = check
        self.session = session
        self.envelope = envelope
        self.head = head
        self.size = len(head)
        self.error: ScanError | None = None
        self.too_big = self.size > check.max_bytes
        self._started = False

    async def feed(self, chunk: bytes) -> None:
        if self.error is not None or self.too_big:
            return
        limit = self.check.max_bytes
        if self.size + len(chunk) > limit:
            self.too_big = True
            if not self.check.scans_prefix:
                self._close()  # abandoned: nothing of it is scanned
                return
            chunk = chunk[: limit - self.size]
        self.size += len(chunk)
        try:
            async with asyncio.timeout(self.check.timeout):
                await self._send(self._with_head(chunk))
        except TimeoutError:
            self._fail(ScanError("timeout", f"no progress within {self.check.timeout:g}s"))
        except ScanError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(ScanError("protocol", f"connection failed: {exc}"))

    def _with_head(self, chunk: bytes) -> bytes:
        if self._started:
            return chunk
        self._started = True
        return self.head + chunk

    def _fail(self, error: ScanError) -> None:
        self.error = error
        self._close()

    async def end(self, message: MessageInfo) -> Verdict | None:
        check = self.check
        started = time.monotonic()
        result: ScanResult | None = None
        try:
            if not self._started and not self.too_big:
                await self.feed(b"")  # a message without a body: the head alone
            if self.too_big and not (check.scans_prefix and self._started):
                result = ScanResult(check.name, "skipped", error="too_big")
            elif self.error is None:
                async with asyncio.timeout(check.timeout):
                    result = await self._verdict()
        except TimeoutError:
            self.error = ScanError("timeout", f"no verdict within {check.timeout:g}s")
        except ScanError as exc:
            self.error = exc
        except OSError as exc:
            self.error = ScanError("protocol", f"connection failed: {exc}")
        finally:
            self._close()
        check.latency.observe(time.monotonic() - started)
        if result is None:
            return self._error_verdict(self.error or ScanError("protocol", "no answer"))
        if self.too_big and not result.error:  # clamd saw the first max_bytes only
            verdict = "skipped" if result.verdict == "clean" else result.verdict
            result = dataclasses.replace(result, verdict=verdict, error="too_big")
        return self._record(result, message)

    def _error_verdict(self, error: ScanError) -> Verdict | None:
        check = self.check
        check.errors[error.kind].inc()
        log.warning("session %s: %s failed (%s): %s; on_error = %s", self.session.session_id,
                    check.name, error.kind, error, check.on_error)
        verdict = check.failed(error)
        label = "skipped" if verdict is None else "error"
        if verdict is None:
            check.verdicts["skipped"].inc()
        self._store(ScanResult(check.name, label, error=error.kind))
        return verdict

    def _record(self, result: ScanResult, message: MessageInfo) -> Verdict | None:
        check = self.check
        check.verdicts[result.verdict].inc()
        if result.error == "too_big":
            check.errors["too_big"].inc()
            log.warning("session %s: message over scanners.%s.max_bytes (%d): not scanned%s",
                        self.session.session_id, check.name, check.max_bytes,
                        " whole" if check.name == "clamd" else "")
        self._store(result)
        return self.decide(result, message)

    def decide(self, result: ScanResult, message: MessageInfo) -> Verdict | None:
        return self.check.decide(result, message, self.session)

    def _store(self, result: ScanResult) -> None:
        name = self.check.name
        self.envelope.facts[result_key(name)] = result
        fields = self.envelope.log_fields
        fields[name] = result.verdict
        if result.error:
            fields[f"{name}_error"] = result.error
        if result.virus:
            fields[f"{name}_virus"] = result.virus
        if result.score is not None:
            fields[f"{name}_score"] = f"{result.score:g}"
        if result.symbols:
            fields[f"{name}_symbols"] = ",".join(result.symbols[:_MAX_SYMBOLS_LOGGED])

    def abort(self) -> None:
        self._close()

    # the protocol

    async def _send(self, data: bytes) -> None:
        raise NotImplementedError

    async def _verdict(self) -> ScanResult:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


def header_field(name: str, value: str) -> bytes:
    """ "Name: value" with CRLF, folded after commas (RFC 5322 2.2.3) where a line would pass
    78 octets: symbol lists are long."""
    lines = [f"{name}: "]
    pieces = value.split(",")
    for i, piece in enumerate(pieces):
        piece += "," if i < len(pieces) - 1 else ""
        if len(lines[-1]) + len(piece) > 78 and lines[-1].strip():
            lines.append("\t")
        lines[-1] += piece
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")
