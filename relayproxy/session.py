"""One inbound SMTP session, mirrored live to one downstream session.

Stages in order: connect, HELO/EHLO, MAIL, RCPT, DATA. At each, local checks run first
(relayproxy.checks; a refusal never touches the downstream), then the command goes to the
downstream and its reply is the client's reply. DATA streams through the DotReader; the final
dot is held until the end-of-data checks have passed.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import dns as rdns
from . import metrics, replies
from .checks import Envelope, MessageInfo, SessionInfo
from .connection import ClientConnection, LineTooLong
from .dotreader import DotReader
from .downstream import ClientIdentity, Connection, DownstreamError
from .policy.verdict import Action, Verdict
from .replies import Reply

if TYPE_CHECKING:
    from .server import Runtime

log = logging.getLogger("relayproxy.session")
txlog = logging.getLogger("relayproxy.transaction")

COMMAND_LINE_LIMIT = 512  # RFC 5321 4.5.3.1.4, CRLF included
BURST = 32  # buffered commands a session handles before yielding to the others

_PATH = re.compile(r"^(FROM|TO):\s*(<[^<>]*>|[^<>\s]+)(.*)$", re.IGNORECASE | re.DOTALL)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_XTEXT = re.compile(r"^([\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"}
_RCPT_PARAMS = {"NOTIFY", "ORCPT"}


class SessionEnd(Exception):
    """Close the inbound session now (the reply, if any, is already written)."""


@dataclass(slots=True)
class Transaction:
    started: float
    envelope: Envelope
    rcpt_log: list[str] = field(default_factory=list)
    size: int = 0
    data_started: bool = False


def outcome_of(reply: Reply) -> str:
    """The metrics/log word for a reply: accepted, tempfailed or rejected."""
    return "accepted" if reply.code < 400 else "tempfailed" if reply.code < 500 else "rejected"


def _parse_params(text: str) -> dict[str, str | None] | None:
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not key or (eq and not value):
            return None
        params[key.upper()] = value if eq else None
    return params


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


class Session:
    def __init__(self, runtime: Runtime, client: ClientConnection):
        self.rt = runtime
        self.config = runtime.config
        self.client = client
        self.info = SessionInfo(os.urandom(6).hex(), client.peer[0], client.peer[1])
        self.conn: Connection | None = None
        self.tx: Transaction | None = None
        self.errors = 0
        self._burst = 0
        self.in_dot_window = False  # the dot went downstream; its reply must reach the client
        self.stopping = False
        self._client_name: tuple[str, str] | None = None
        self._commands = {
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

    # main loop

    async def run(self) -> None:
        try:
            verdict = await self.rt.pipeline.connect(self.info)
            if verdict is not None:
                self._refuse("connect", verdict)
                raise SessionEnd
            self.client.write(replies.greeting(self.config.server.hostname))
            while True:
                if self.stopping and self.tx is None:
                    self.reply(replies.SHUTTING_DOWN)
                    raise SessionEnd
                line = await self._read_command()
                await self._dispatch(line)
        except SessionEnd:
            pass
        except (ConnectionError, ssl.SSLError) as exc:
            log.debug("session %s: client connection lost: %s", self.info.session_id, exc)
        except asyncio.CancelledError:
            # server shutdown: tell the client; the downstream may be mid-command, so it is
            # dropped, never pooled (and mid-DATA it never gets the dot)
            self._abort_downstream()
            self.reply(replies.SHUTTING_DOWN)
            raise
        except Exception:
            log.exception("session %s failed", self.info.session_id)
            self._abort_downstream()
            self.client.write(replies.INTERNAL_ERROR.encode())
        finally:
            self._end_session_transaction()
            self._release_downstream()
            self.client.close()

    async def _read_command(self) -> bytes:
        server = self.config.server
        timeout = server.command_timeout if self.tx else server.idle_timeout
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
            self.reply(replies.TIMEOUT)
            raise SessionEnd from None
        except LineTooLong:
            metrics.PROTOCOL_ERRORS.labels("line_too_long").inc()
            self.reply(replies.LINE_TOO_LONG)
            return b""

    async def _dispatch(self, raw: bytes) -> None:
        if not raw:
            return  # an overlong line, already answered
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        verb, _, arg = line.partition(b" ")
        text = verb.decode("ascii", "replace").upper()
        handler = self._commands.get(text)
        if _CONTROL.search(line):
            # Never let CR, LF, NUL or any other control character reach a downstream command
            # line (command injection, GHSA-v3q9-hj7j-63hq); SMTP separates with spaces only.
            metrics.PROTOCOL_ERRORS.labels("bad_characters").inc()
            self.reply(replies.BAD_CHARACTERS)
            return
        if handler is None:
            metrics.PROTOCOL_ERRORS.labels("unknown_command").inc()
            known = text in ("EXPN", "BDAT", "AUTH", "ETRN", "TURN", "ATRN")
            self.reply(replies.NOT_IMPLEMENTED if known else replies.SYNTAX_ERROR)
            return
        await handler(arg.decode("utf-8", "surrogateescape").strip())

    def reply(self, reply: Reply) -> None:
        self.client.write(reply.encode())
        if reply.code >= 400 and reply.code != 421:
            self.errors += 1
            if self.errors >= self.config.server.max_errors:
                self.client.write(replies.TOO_MANY_ERRORS.encode())
                raise SessionEnd

    def _refuse(self, stage: str, verdict: Verdict) -> Reply:
        reply = replies.for_verdict(verdict)
        metrics.REJECTIONS.labels(stage, f"{reply.code // 100}xx", verdict.source).inc()
        self.reply(reply)
        if verdict.action is Action.DISCONNECT:
            raise SessionEnd
        return reply

    # HELO / EHLO

    async def _greet(self, arg: str, esmtp: bool) -> bool:
        if not arg or " " in arg:
            self.reply(replies.PARAM_SYNTAX.with_text(
                f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
            return False
        await self._abort_transaction()
        self.info.helo, self.info.esmtp = arg, esmtp
        verdict = await self.rt.pipeline.helo(self.info)
        if verdict is not None:
            self.info.helo = ""
            self._refuse("helo", verdict)
            return False
        return True

    async def _ehlo(self, arg: str) -> None:
        if not await self._greet(arg, True):
            return
        server = self.config.server
        lines = [
            f"250-{server.hostname}",
            "250-PIPELINING",
            f"250-SIZE {server.max_message_size}",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-ENHANCEDSTATUSCODES",
            "250-DSN",
        ]
        if self.rt.tls_context is not None and not self.info.tls:
            lines.append("250-STARTTLS")
        lines[-1] = "250 " + lines[-1][4:]
        self.client.write(("\r\n".join(lines) + "\r\n").encode())

    async def _helo(self, arg: str) -> None:
        if await self._greet(arg, False):
            self.client.write(f"250 {self.config.server.hostname}\r\n".encode())

    async def _starttls(self, arg: str) -> None:
        if self.rt.tls_context is None:
            self.reply(replies.NOT_IMPLEMENTED)
            return
        if self.info.tls:
            self.reply(replies.TLS_ALREADY)
            return
        if arg:
            self.reply(replies.STARTTLS_NO_ARGS)
            return
        await self._abort_transaction()
        self.client.write(replies.START_TLS.encode())
        # RFC 3207 4.2: whatever the client pipelined after STARTTLS is discarded, and the
        # session starts over (no HELO, no transaction) once TLS is up.
        try:
            await self.client.start_tls(self.rt.tls_context, self.config.server.command_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.info("session %s: TLS handshake failed: %s", self.info.session_id, exc)
            raise SessionEnd from None
        self.info.tls = True
        self.info.helo, self.info.esmtp = "", False

    # MAIL

    async def _mail(self, arg: str) -> None:
        if not self.info.helo:
            self.reply(replies.NEED_HELO)
            return
        if self.tx is not None:
            self.reply(replies.NESTED_MAIL)
            return
        parsed = self._parse_path(arg, "FROM", _MAIL_PARAMS)
        if parsed is None:
            return
        sender, params = parsed
        size = params.get("SIZE")
        if size is not None and int(size) > self.config.server.max_message_size:
            self._count_rejection("mail", replies.SIZE_EXCEEDED, "local")
            self.reply(replies.SIZE_EXCEEDED)
            return
        envelope = Envelope(sender, params)
        verdict = await self.rt.pipeline.mail(self.info, envelope)
        if verdict is not None:
            reply = self._refuse("mail", verdict)
            self._log_transaction(Transaction(time.monotonic(), envelope), reply, outcome_of(reply))
            return
        tx = Transaction(time.monotonic(), envelope)
        try:
            reply = await self._mail_downstream(sender, params)
        except DownstreamError as exc:
            self._downstream_failed(exc, tx)
            return
        self.reply_relayed("mail", reply)
        if reply.code == 250:
            self.tx = tx
            assert self.conn is not None
            self.conn.in_transaction = True
        else:
            self._log_transaction(tx, reply, outcome_of(reply))

    async def _mail_downstream(self, sender: str, params: dict[str, str | None]) -> Reply:
        for attempt in (1, 2):
            kept = self.conn is not None and self.conn.alive
            conn = await self._downstream()
            if "SMTPUTF8" in params and not conn.supports("smtputf8"):
                return replies.downstream_no_smtputf8(conn.where)
            line = f"MAIL FROM:<{sender}>" + self._forwarded_params(conn, params, _MAIL_FORWARD)
            try:
                return await conn.command("mail", line.encode("utf-8", "surrogateescape"))
            except DownstreamError:
                # A kept connection may have been closed by the downstream while the client
                # was idle; one fresh try costs little and the client never sees the first.
                if attempt == 2 or not (kept or conn.reused):
                    raise
                self.conn = None
        raise AssertionError("unreachable")

    async def _downstream(self) -> Connection:
        if self.conn is not None and self.conn.alive:
            return self.conn
        self.conn = None
        name, _ = await self.client_name()
        identity = ClientIdentity(
            self.info.client_ip, self.info.client_port, name, self.info.helo,
            "ESMTP" if self.info.esmtp else "SMTP",
        )
        self.conn = await self.rt.pool.acquire(identity)
        return self.conn

    async def client_name(self) -> tuple[str, str]:
        if self._client_name is None:
            if self.config.server.reverse_dns:
                self._client_name = await rdns.client_name(self.rt.resolver, self.info.client_ip)
            else:
                self._client_name = (rdns.UNAVAILABLE, "")
            name = self._client_name[0]
            self.info.client_name = "" if name.startswith("[") else name
        return self._client_name

    def _parse_path(
        self, arg: str, keyword: str, allowed: set[str]
    ) -> tuple[str, dict[str, str | None]] | None:
        m = _PATH.match(arg)
        if m is None or m.group(1).upper() != keyword:
            self.reply(replies.PARAM_SYNTAX.with_text(
                f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>"))
            return None
        path = m.group(2)
        address = path[1:-1] if path.startswith("<") else path
        params = _parse_params(m.group(3))
        if params is None or (address == "" and keyword == "TO"):
            self.reply(replies.PARAM_SYNTAX)
            return None
        for key, value in params.items():
            if key not in allowed or not _valid_param(key, value):
                self.reply(replies.PARAM_UNKNOWN.with_text(f"Unsupported parameter {key}"))
                return None
        return address, params

    @staticmethod
    def _forwarded_params(
        conn: Connection, params: dict[str, str | None], rules: dict[str, str]
    ) -> str:
        out = []
        for key, value in params.items():
            if conn.supports(rules[key]):
                out.append(key if value is None else f"{key}={value}")
        return (" " + " ".join(out)) if out else ""

    # RCPT

    async def _rcpt(self, arg: str) -> None:
        tx = self.tx
        if tx is None:
            self.reply(replies.NEED_MAIL)
            return
        parsed = self._parse_path(arg, "TO", _RCPT_PARAMS)
        if parsed is None:
            return
        rcpt, params = parsed
        if len(tx.envelope.recipients) >= self.config.server.max_recipients:
            self._rcpt_result(tx, rcpt, replies.TOO_MANY_RCPTS, "local")
            return
        verdict = await self.rt.pipeline.rcpt(self.info, tx.envelope, rcpt)
        if verdict is not None:
            reply = replies.for_verdict(verdict)
            self._rcpt_result(tx, rcpt, reply, verdict.source)
            if verdict.action is Action.DISCONNECT:
                raise SessionEnd
            return
        assert self.conn is not None
        line = f"RCPT TO:<{rcpt}>" + self._forwarded_params(self.conn, params, _RCPT_FORWARD)
        try:
            reply = await self.conn.command("rcpt", line.encode("utf-8", "surrogateescape"))
        except DownstreamError as exc:
            self._downstream_failed(exc, tx)
            return
        if reply.code in (250, 251):
            tx.envelope.recipients.append(rcpt)
        self._rcpt_result(tx, rcpt, reply, "downstream")

    def _rcpt_result(self, tx: Transaction, rcpt: str, reply: Reply, source: str) -> None:
        metrics.RECIPIENTS.labels(outcome_of(reply), source).inc()
        tx.rcpt_log.append(f"<{rcpt}>={reply.code}")
        if source == "downstream":
            self.reply_relayed("rcpt", reply)
        else:
            self._count_rejection("rcpt", reply, source)
            self.reply(reply)

    # DATA

    async def _data(self, arg: str) -> None:
        tx = self.tx
        if tx is None:
            self.reply(replies.NEED_MAIL)
            return
        if arg:
            self.reply(replies.PARAM_SYNTAX)
            return
        if not tx.envelope.recipients:
            self.reply(replies.NO_VALID_RCPT if tx.rcpt_log else replies.NEED_RCPT)
            return
        conn = self.conn
        assert conn is not None
        try:
            reply = await conn.command("data", b"DATA")
        except DownstreamError as exc:
            self._downstream_failed(exc, tx)
            return
        if reply.code != 354:
            self.reply_relayed("data", reply)
            await self._abort_transaction(reply)
            return
        tx.data_started = True
        self.client.write(replies.START_DATA.encode())
        server = self.config.server
        reader = DotReader(server.max_line_length, server.bare_newline)
        failure: DownstreamError | None = None
        try:
            conn.write(await self._received_header(tx))
        except DownstreamError as exc:
            failure = exc
        # Read to the terminator whatever happens (streaming notes 3): an early reply would
        # make the rest of the message be read as commands.
        while not reader.done:
            try:
                async with asyncio.timeout(server.data_timeout):
                    chunk = await self.client.read_chunk()
            except TimeoutError:
                self._abort_downstream()
                self.reply(replies.TIMEOUT)
                raise SessionEnd from None
            forward, rest = reader.feed(chunk)
            if forward and failure is None and reader.size <= server.max_message_size:
                try:
                    conn.write(forward)
                    await conn.drain()
                except DownstreamError as exc:
                    failure = exc
        self.client.unread(rest)
        tx.size = reader.size
        metrics.MESSAGE_SIZE.observe(reader.size)
        if failure is not None:
            self._downstream_failed(failure, tx)
            return
        message = MessageInfo(reader.size, reader.bare_newline, reader.line_too_long,
                              server.bare_newline == "normalize")
        verdict = await self.rt.pipeline.data_end(self.info, tx.envelope, message)
        if verdict is not None:
            # Refused before the dot: closing the downstream makes it discard the message.
            self._abort_downstream()
            self._finish(tx, replies.for_verdict(verdict))  # logged before a reply can end us
            self._refuse("data", verdict)
            return
        self.in_dot_window = True
        try:
            reply = await conn.finish()
        except DownstreamError as exc:
            self._downstream_failed(exc, tx)
            return
        finally:
            self.in_dot_window = False
        self._finish(tx, reply)
        if reply.code == 250:
            self.errors = 0  # as Postfix: the error limit counts errors without delivering mail
        self.reply_relayed("dot", reply)

    async def _received_header(self, tx: Transaction) -> bytes:
        name, _ = await self.client_name()
        info = self.info
        ip = f"IPv6:{info.client_ip}" if ":" in info.client_ip else info.client_ip
        proto = ("ESMTP" if info.esmtp else "SMTP") + ("S" if info.tls else "")
        if "SMTPUTF8" in tx.envelope.mail_params:
            proto = "UTF8" + proto.replace("ESMTP", "SMTP")
        rdns_name = name if not name.startswith("[") else "unknown"
        recipients = tx.envelope.recipients
        # "for" only with a single recipient: more would disclose the Bcc list (RFC 5321 7.2)
        for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
        header = (
            f"Received: from {_header_safe(info.helo)} ({rdns_name} [{ip}])\r\n"
            f"\tby {self.config.server.hostname} (relayproxy) with {proto} id {info.session_id}"
            f"{for_clause};\r\n\t{email.utils.formatdate(localtime=True)}\r\n"
        )
        return header.encode("utf-8", "surrogateescape")

    def _finish(self, tx: Transaction, reply: Reply) -> None:
        self._log_transaction(tx, reply, outcome_of(reply))
        self.tx = None

    # RSET, NOOP, QUIT, VRFY, HELP

    async def _rset(self, arg: str) -> None:
        await self._abort_transaction()
        self.reply(replies.RESET_OK)

    async def _noop(self, arg: str) -> None:
        self.reply(replies.NOOP_OK)

    async def _quit(self, arg: str) -> None:
        self.reply(replies.BYE)
        raise SessionEnd

    async def _vrfy(self, arg: str) -> None:
        self.reply(replies.VRFY if arg else replies.PARAM_SYNTAX)

    async def _help(self, arg: str) -> None:
        self.reply(replies.HELP)

    # transaction and downstream bookkeeping

    def reply_relayed(self, stage: str, reply: Reply) -> None:
        if reply.code >= 400:
            self._count_rejection(stage, reply, "downstream")
        self.reply(reply)
        if reply.code == 421:
            # the downstream is closing the session; so do we, after relaying its words
            self._abort_downstream()
            raise SessionEnd

    def _count_rejection(self, stage: str, reply: Reply, source: str) -> None:
        metrics.REJECTIONS.labels(stage, f"{reply.code // 100}xx", source).inc()

    def _downstream_failed(self, exc: DownstreamError, tx: Transaction) -> None:
        """Answer the pending command for a downstream fault; a lost session ends with 421."""
        self._log_transaction(tx, exc.reply, "tempfailed")
        if self.tx is tx:
            self.tx = None
        self.reply(exc.reply)
        if exc.fatal:
            self._abort_downstream()
            self.client.write(replies.downstream_closing(exc.where).encode())
            raise SessionEnd

    async def _abort_transaction(self, reply: Reply | None = None) -> None:
        """End the open transaction on both sides (RSET, EHLO, STARTTLS, DATA refused)."""
        tx, self.tx = self.tx, None
        if tx is None:
            return
        if reply is not None:
            self._log_transaction(tx, reply, outcome_of(reply))
        conn = self.conn
        if conn is not None and conn.in_transaction and conn.alive:
            try:
                rset = await conn.command("rset", b"RSET")
            except DownstreamError:
                self.conn = None
                return
            if rset.code != 250:
                self._abort_downstream()
            else:
                conn.in_transaction = False

    def _abort_downstream(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _release_downstream(self) -> None:
        if self.conn is not None:
            self.rt.pool.release(self.conn)
            self.conn = None

    def _end_session_transaction(self) -> None:
        """The session ends with a transaction open: a message cut off mid-DATA is aborted."""
        tx, self.tx = self.tx, None
        if tx is not None and tx.data_started:
            metrics.MESSAGES_ABORTED.inc()
            self._log_transaction(tx, None, "aborted")
        if self.conn is not None and self.conn.in_transaction:
            # the client went away mid-transaction: the downstream must not deliver anything
            self._abort_downstream()

    def _log_transaction(self, tx: Transaction, reply: Reply | None, outcome: str) -> None:
        if outcome == "accepted":
            metrics.MESSAGES_ACCEPTED.inc()
        elif tx.data_started and outcome == "rejected":
            metrics.MESSAGES_REJECTED.inc()
        elif tx.data_started and outcome == "tempfailed" and reply is not None:
            metrics.MESSAGES_TEMPFAILED.inc()
        if not txlog.isEnabledFor(logging.INFO):
            return
        fields = {
            "event": "transaction",
            "session": self.info.session_id,
            "client": f"{self.info.client_ip}:{self.info.client_port}",
            "helo": self.info.helo,
            "from": f"<{tx.envelope.sender}>",
            "rcpts": ",".join(tx.rcpt_log),
            "size": tx.size,
            "downstream": self.conn.where if self.conn else "",
            "reply": str(reply) if reply else "",
            "outcome": outcome,
            "duration_ms": f"{(time.monotonic() - tx.started) * 1000:.1f}",
        }
        txlog.info(" ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items()))


_MAIL_FORWARD = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8", "RET": "dsn",
                 "ENVID": "dsn"}
_RCPT_FORWARD = {"NOTIFY": "dsn", "ORCPT": "dsn"}


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


def _header_safe(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:255]
