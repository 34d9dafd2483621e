"""One inbound SMTP session: the command loop and the stage handlers.

Stages in order: connect, HELO/EHLO, MAIL, RCPT, DATA. Each handler runs the local checks
(relayproxy.checks) and returns its reply; `send` is the one writer, which counts every reply
and ends the session on 221 and 421. MAIL is answered here; the downstream leg (relayproxy.leg)
opens at the first recipient that passed the local checks and closes with the transaction. DATA
runs through relayproxy.message (header section, observers, held window, withheld dot).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import dns as rdns
from . import metrics, replies
from .address import PathError, parse_path
from .checks import Envelope, SessionInfo
from .connection import ClientConnection, LineTooLong
from .downstream import ClientIdentity, DownstreamError
from .leg import DownstreamLeg
from .message import MessageStream
from .replies import Reply
from .runtime import Runtime
from .transaction import Transaction

log = logging.getLogger("relayproxy.session")

COMMAND_LINE_LIMIT = 512  # RFC 5321 4.5.3.1.4, CRLF included
HELO_NAME_LIMIT = 255  # RFC 5321 4.5.3.1.2 (a domain); Postfix's XCLIENT refuses longer HELOs
BURST = 32  # buffered commands a session handles before yielding to the others

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_XTEXT = re.compile(r"^([\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"}
_RCPT_PARAMS = {"NOTIFY", "ORCPT"}
# Stages whose refusals are counted in relayproxy_rejections_total.
_COUNTED = {"connect", "helo", "mail", "rcpt", "data", "dot"}
_STAGE = {"EHLO": "helo", "HELO": "helo", "MAIL": "mail", "RCPT": "rcpt", "DATA": "data"}
_NOT_OFFERED = {"EXPN", "BDAT", "AUTH", "ETRN", "TURN", "ATRN"}


class SessionEnd(Exception):
    """Close the inbound session now (the reply, if any, is already written)."""


def _parse_params(text: str, allowed: set[str]) -> dict[str, str | None] | Reply:
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not key or (eq and not value):
            return replies.PARAM_SYNTAX
        if not (key.isascii() and value.isascii()):
            # RFC 5321 4.1.2: esmtp-keyword and esmtp-value are ASCII (a "²" is no digit)
            return replies.PARAM_NOT_ASCII
        key = key.upper()
        if key not in allowed or not _valid_param(key, value if eq else None):
            return replies.PARAM_UNKNOWN.with_text(f"Unsupported parameter {key}")
        params[key] = value if eq else None
    return params


def _valid_param(key: str, value: str | None) -> bool:
    if key == "SIZE":
        return value is not None and value.isdigit() and len(value) < 20
    if key == "BODY":
        return value is not None and value.upper() in ("7BIT", "8BITMIME")
    if key == "SMTPUTF8":
        return value is None
    if key == "RET":
        return value is not None and value.upper() in ("FULL", "HDRS")
    if key == "NOTIFY":
        return value is not None and all(
            v in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for v in value.upper().split(","))
    return value is not None and bool(_XTEXT.match(value))  # ENVID, ORCPT


_clock: list[Any] = [0, ""]  # the second and its RFC 5322 date, formatted once a second


def _date() -> str:
    now = int(time.time())
    if _clock[0] != now:
        _clock[:] = [now, email.utils.formatdate(now, localtime=True)]
    return str(_clock[1])


def _header_safe(text: str) -> str:
    # ASCII only: the field may go to a downstream without 8BITMIME (RFC 6152)
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text)[
        :HELO_NAME_LIMIT]


Handler = Callable[[str], Awaitable[Reply | None]]


class Session:
    def __init__(self, runtime: Runtime, client: ClientConnection):
        self.rt = runtime
        self.config = runtime.config
        self.client = client
        self.info = SessionInfo(os.urandom(6).hex(), client.peer[0], client.peer[1])
        if runtime.config.server.reverse_dns:  # else the name is unknown to rules, not missing
            self.info.name_lookup = self.client_name
        self.leg = DownstreamLeg(runtime.pool)
        self.tx: Transaction | None = None
        self.errors = 0
        self.stage = ""  # of the command being answered, for the reply counters
        self._burst = 0
        self.in_dot_window = False  # the dot went downstream; its reply must reach the client
        self.stopping = False
        self._name: asyncio.Future[tuple[str, str]] | None = None
        self._commands: dict[str, Handler] = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
            "VRFY": self._vrfy,
            "HELP": self._help,
            "STARTTLS": self._starttls,
        }

    @property
    def in_transaction(self) -> bool:
        return self.tx is not None

    # the one writer

    def _emit(self, reply: Reply) -> None:
        self.client.write(reply.encode())
        if reply.code >= 400 and self.stage in _COUNTED:
            metrics.REJECTIONS.labels(self.stage, f"{reply.code // 100}xx", reply.source).inc()

    def send(self, reply: Reply) -> None:
        """Write a reply; 221 and 421 end the session, and so does the error limit."""
        self._emit(reply)
        if reply.code in (221, 421):
            raise SessionEnd
        if reply.code >= 400:
            self.errors += 1
            if self.errors >= self.config.server.max_errors:
                self.stage = ""
                self.send(replies.TOO_MANY_ERRORS)

    # main loop

    async def run(self) -> None:
        try:
            self._start_name_lookup()
            self.stage = "connect"
            verdict = await self.rt.pipeline.connect(self.info)
            if verdict is not None:
                self._emit(replies.for_verdict(verdict))
                raise SessionEnd
            delay = self.config.server.greet_delay
            if delay and await self.client.talks_within(delay):
                # a client that talks before the banner is a bot that does not wait for
                # replies (postscreen's pregreet test, RFC 5321 4.3.1)
                metrics.PROTOCOL_ERRORS.labels("pregreet").inc()
                self._emit(replies.PREGREET)
                raise SessionEnd
            self.send(replies.greeting(self.config.server.hostname))
            while True:
                if self.stopping and self.tx is None:
                    self.stage = ""
                    self.send(replies.SHUTTING_DOWN)
                line = await self._read_command()
                if line is None:
                    continue
                reply = await self._dispatch(line)
                if reply is not None:
                    self.send(reply)
        except SessionEnd:
            pass
        except (ConnectionError, ssl.SSLError) as exc:
            log.debug("session %s: client connection lost: %s", self.info.session_id, exc)
        except asyncio.CancelledError:
            # server shutdown: tell the client; the downstream may be mid-command, so it is
            # dropped, never pooled (and mid-DATA it never gets the dot)
            self.leg.abort()
            self._emit(replies.SHUTTING_DOWN)
            raise
        except Exception:
            log.exception("session %s failed", self.info.session_id)
            self.leg.abort()
            self._emit(replies.INTERNAL_ERROR)
        finally:
            self._end_session()
            self.client.close()

    async def _read_command(self) -> bytes | None:
        server = self.config.server
        # idle_timeout between transactions, command_timeout inside one (RFC 5321 4.5.3.2.7)
        timeout = server.command_timeout if self.tx else server.idle_timeout
        self.stage = ""
        try:
            # Pipelined commands are already buffered: take them without arming a timer, but
            # let other sessions run now and then, or one flood would hold the whole loop.
            line = self.client.take_line(COMMAND_LINE_LIMIT)
            if line is not None and not self.client.writing_paused:
                self._burst += 1
                if self._burst % BURST == 0:
                    await asyncio.sleep(0)
                return line
            async with asyncio.timeout(timeout):
                # A client that pipelines commands but never reads the replies must not make
                # them pile up in memory: wait until it has taken what was written.
                await self.client.drain()
                return line if line is not None else await self.client.readline(
                    COMMAND_LINE_LIMIT)
        except TimeoutError:
            self.send(replies.TIMEOUT)
        except LineTooLong:
            metrics.PROTOCOL_ERRORS.labels("line_too_long").inc()
            self.send(replies.LINE_TOO_LONG)
        return None

    async def _dispatch(self, raw: bytes) -> Reply | None:
        if raw.endswith(b"\r\n"):
            line = raw[:-2]
        else:
            line = raw[:-1]
            if self.config.server.bare_newline == "reject":
                # a bare LF ends no line in SMTP (RFC 5321 2.3.8); servers that take it are
                # the other half of a smuggling attack (Postfix: smtpd_forbid_bare_newline)
                metrics.PROTOCOL_ERRORS.labels("bare_newline_command").inc()
                return replies.BARE_LF_COMMAND
        verb, _, arg = line.partition(b" ")
        text = verb.decode("ascii", "replace").upper()
        if _CONTROL.search(line):
            # Never let CR, LF, NUL or any other control character reach a downstream command
            # line (command injection, GHSA-v3q9-hj7j-63hq); SMTP separates with spaces only.
            metrics.PROTOCOL_ERRORS.labels("bad_characters").inc()
            return replies.BAD_CHARACTERS
        handler = self._commands.get(text)
        if handler is None:
            metrics.PROTOCOL_ERRORS.labels("unknown_command").inc()
            return replies.NOT_IMPLEMENTED if text in _NOT_OFFERED else replies.SYNTAX_ERROR
        self.stage = _STAGE.get(text, "")
        try:
            return await handler(arg.decode("utf-8", "surrogateescape").strip())
        except DownstreamError as exc:
            return self._downstream_lost(exc)

    # reverse DNS: started at connect, beside the greeting

    def _start_name_lookup(self) -> None:
        if not self.config.server.reverse_dns:
            self.info.client_name = ""
            return
        self._name = self.rt.names.lookup(self.info.client_ip)
        self._name.add_done_callback(self._name_known)

    def _name_known(self, future: asyncio.Future[tuple[str, str]]) -> None:
        if self.info.client_name is None:
            name = rdns.TEMPUNAVAIL if future.cancelled() or future.exception() else (
                future.result()[0])
            self.info.client_name = "" if name.startswith("[") else name

    async def client_name(self) -> str:
        """The verified name, or [UNAVAILABLE] / [TEMPUNAVAIL] (XCLIENT's words)."""
        if self._name is None:
            return rdns.UNAVAILABLE
        try:
            name, _ = await asyncio.shield(self._name)
        except Exception:
            name = rdns.TEMPUNAVAIL
        self.info.client_name = "" if name.startswith("[") else name
        return name

    # HELO / EHLO

    async def _greet(self, arg: str, esmtp: bool) -> Reply | None:
        if not arg or " " in arg:
            return replies.PARAM_SYNTAX.with_text(f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        if len(arg.encode("utf-8", "surrogateescape")) > HELO_NAME_LIMIT:
            return replies.HELO_TOO_LONG
        await self._abort_transaction()
        self.info.helo, self.info.esmtp = arg, esmtp
        verdict = await self.rt.pipeline.helo(self.info)
        if verdict is not None:
            self.info.helo = ""
            return replies.for_verdict(verdict)
        return None

    async def _ehlo(self, arg: str) -> Reply:
        if refused := await self._greet(arg, True):
            return refused
        pool = self.rt.pool
        server = self.config.server
        lines = [server.hostname, "PIPELINING", f"SIZE {server.max_message_size}",
                 "8BITMIME", "ENHANCEDSTATUSCODES"]
        # offered only while the downstream does: the proxy cannot honour them itself (it
        # sends no DSNs, converts no addresses)
        if pool.offers("smtputf8"):
            lines.append("SMTPUTF8")
        if pool.offers("dsn"):
            lines.append("DSN")
        if self.rt.tls_context is not None and not self.info.tls:
            lines.append("STARTTLS")
        return Reply.multiline(250, lines)

    async def _helo(self, arg: str) -> Reply:
        return await self._greet(arg, False) or replies.helo_ok(self.config.server.hostname)

    async def _starttls(self, arg: str) -> Reply | None:
        if self.rt.tls_context is None:
            return replies.NOT_IMPLEMENTED
        if self.info.tls:
            return replies.TLS_ALREADY
        if arg:
            return replies.STARTTLS_NO_ARGS
        await self._abort_transaction()
        self.send(replies.START_TLS)
        # RFC 3207 4.2: whatever the client pipelined after STARTTLS is discarded, and the
        # session starts over (no HELO, no transaction) once TLS is up.
        try:
            await self.client.start_tls(self.rt.tls_context, self.config.server.command_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.info("session %s: TLS handshake failed: %s", self.info.session_id, exc)
            raise SessionEnd from None
        self.info.tls = True
        self.info.helo, self.info.esmtp = "", False
        return None

    # MAIL: answered here; the downstream hears of it at the first accepted recipient

    def _parse(
        self, arg: str, keyword: str, allowed: set[str], smtputf8: bool
    ) -> tuple[str, dict[str, str | None]] | Reply:
        try:
            path, rest = parse_path(arg, keyword, smtputf8=True)
        except PathError as exc:
            return replies.path_error(keyword, str(exc))
        params = _parse_params(rest, allowed)
        if isinstance(params, Reply):
            return params
        if not path.address.isascii() and not (smtputf8 or "SMTPUTF8" in params):
            # RFC 6531 3.4: a UTF-8 address needs the SMTPUTF8 parameter on MAIL
            return replies.path_error(keyword, "UTF-8 address without SMTPUTF8")
        return path.address, params

    async def _mail(self, arg: str) -> Reply:
        if not self.info.helo:
            return replies.NEED_HELO
        if self.tx is not None:
            return replies.NESTED_MAIL
        parsed = self._parse(arg, "FROM", _MAIL_PARAMS, False)
        if isinstance(parsed, Reply):
            return parsed
        sender, params = parsed
        envelope = Envelope(sender, params)
        verdict = await self.rt.pipeline.mail(self.info, envelope)
        if verdict is not None:
            reply = replies.for_verdict(verdict)
            Transaction(envelope).end(self.info, reply)
            return reply
        self.tx = Transaction(envelope)
        return replies.sender_ok(sender)

    # RCPT

    async def _rcpt(self, arg: str) -> Reply:
        tx = self.tx
        if tx is None:
            return replies.NEED_MAIL
        parsed = self._parse(arg, "TO", _RCPT_PARAMS, "SMTPUTF8" in tx.envelope.mail_params)
        if isinstance(parsed, Reply):
            return parsed
        rcpt, params = parsed
        verdict = await self.rt.pipeline.rcpt(self.info, tx.envelope, rcpt)
        if verdict is not None:
            reply = replies.for_verdict(verdict)
        elif tx.refusal is not None:
            reply = tx.refusal
        elif not self.leg.open and (refusal := await self._open_leg(tx)):
            reply = tx.refusal = refusal
        else:
            reply = await self.leg.rcpt(rcpt, params)
            verdict = await self.rt.pipeline.rcpt_reply(self.info, tx.envelope, rcpt, reply)
            if verdict is not None:
                accepted_downstream = reply.code in (250, 251)
                reply = replies.for_verdict(verdict)
                if accepted_downstream and reply.code != 421:
                    await self._replay(tx)
            elif reply.code in (250, 251):
                tx.envelope.recipients.append(rcpt)
                tx.rcpt_params.append(params)
        tx.recipient(rcpt, reply)
        return reply

    async def _replay(self, tx: Transaction) -> None:
        """A check refused a recipient the downstream had accepted (greylisting): start the
        downstream transaction over without it, so it can never receive the message."""
        await self.leg.reset()
        if refusal := await self._open_leg(tx):
            tx.refusal = refusal
            tx.envelope.recipients.clear()
            return
        for address, params in zip(tx.envelope.recipients, tx.rcpt_params, strict=True):
            again = await self.leg.rcpt(address, params)
            if again.code not in (250, 251):  # it changed its mind: nothing half-delivered
                tx.refusal = again
                tx.envelope.recipients.clear()
                await self.leg.reset()
                return

    async def _open_leg(self, tx: Transaction) -> Reply | None:
        """Take a downstream connection and send MAIL; the refusal, if any, for every RCPT."""
        info = self.info
        client = ClientIdentity(info.client_ip, info.client_port, await self.client_name(),
                                info.helo, "ESMTP" if info.esmtp else "SMTP")
        try:
            reply = await self.leg.begin(client, tx.envelope.sender, tx.envelope.mail_params)
        except DownstreamError as exc:
            return exc.reply
        if reply.code != 250:
            return reply
        tx.downstream = self.leg.where
        return None

    # DATA

    async def _data(self, arg: str) -> Reply:
        tx = self.tx
        if tx is None:
            return replies.NEED_MAIL
        if arg:
            return replies.PARAM_SYNTAX
        if not tx.envelope.recipients:
            return replies.NO_VALID_RCPT if tx.rcpt_log else replies.NEED_RCPT
        reply = await self.leg.data()
        if reply.code != 354:
            await self._abort_transaction(reply)
            return reply
        tx.data_started = True
        self.send(replies.START_DATA)
        self.stage = "dot"
        server = self.config.server
        stream = MessageStream(server, self.rt.pipeline, self.info, tx.envelope, self.leg,
                               await self._received_field(tx))
        try:
            received = await stream.receive(self.client)
        except TimeoutError:
            self.leg.abort()
            return replies.TIMEOUT
        tx.size = received.message.size
        metrics.MESSAGE_SIZE.observe(tx.size)
        if received.failure is not None:
            raise received.failure
        if received.verdict is not None:
            # refused before the dot: dropping the connection makes the downstream discard it
            self.leg.abort()
            reply = replies.for_verdict(received.verdict)
        else:
            self.in_dot_window = True
            try:
                reply = await stream.deliver()
            finally:
                self.in_dot_window = False
            if reply.code == 250:
                self.errors = 0  # as Postfix: the error limit counts errors without delivering
        tx.end(self.info, reply)  # logged before a reply can end the session
        self.tx = None
        return reply

    async def _received_field(self, tx: Transaction) -> bytes:
        name = await self.client_name()
        info = self.info
        ip = f"IPv6:{info.client_ip}" if ":" in info.client_ip else info.client_ip
        proto = ("ESMTP" if info.esmtp else "SMTP") + ("S" if info.tls else "")
        if "SMTPUTF8" in tx.envelope.mail_params:
            proto = "UTF8" + proto.replace("ESMTP", "SMTP")
        rdns_name = name if not name.startswith("[") else "unknown"
        recipients = tx.envelope.recipients
        # "for" only with a single recipient: more would disclose the Bcc list (RFC 5321 7.2)
        for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
        field = (
            f"Received: from {_header_safe(info.helo)} ({rdns_name} [{ip}])\r\n"
            f"\tby {self.config.server.hostname} (relayproxy) with {proto} id {info.session_id}"
            f"{for_clause};\r\n\t{_date()}\r\n"
        )
        return field.encode("utf-8", "surrogateescape")

    # RSET, NOOP, QUIT, VRFY, HELP

    async def _rset(self, arg: str) -> Reply:
        await self._abort_transaction()
        return replies.RESET_OK

    async def _noop(self, arg: str) -> Reply:
        return replies.NOOP_OK

    async def _quit(self, arg: str) -> Reply:
        return replies.BYE

    async def _vrfy(self, arg: str) -> Reply:
        return replies.VRFY if arg else replies.PARAM_SYNTAX

    async def _help(self, arg: str) -> Reply:
        return replies.HELP

    # transaction and downstream bookkeeping

    def _downstream_lost(self, exc: DownstreamError) -> Reply:
        """The downstream failed mid-transaction: answer the command, then 421 and close."""
        tx, self.tx = self.tx, None
        if tx is not None:
            tx.end(self.info, exc.reply, "tempfailed")
        if not exc.fatal:
            return exc.reply
        self.leg.abort()
        self._emit(exc.reply)
        self.stage = ""
        return replies.downstream_closing(exc.where)

    async def _abort_transaction(self, reply: Reply | None = None) -> None:
        """End the open transaction on both sides (RSET, EHLO, STARTTLS, DATA refused)."""
        tx, self.tx = self.tx, None
        if tx is not None and reply is not None:
            tx.end(self.info, reply)
        await self.leg.reset()

    def _end_session(self) -> None:
        """The session ends: a message cut off mid-DATA is aborted, never delivered."""
        tx, self.tx = self.tx, None
        if tx is not None and tx.data_started:
            tx.end(self.info, None, "aborted")
        if self.leg.conn is not None and self.leg.conn.in_transaction:
            self.leg.abort()  # the downstream must not deliver anything
        self.leg.release()
