"""The downstream side: live SMTP sessions to the mail server the proxy fronts.

A transaction takes a Connection from the Pool at its first recipient that passed the local
checks (relayproxy.leg) and gives it back when the transaction ends, so a client idling between
messages holds nothing. The Pool enforces downstream.max_connections (mail servers cap
connections too: a spent budget is answered 451 4.3.2 at once instead of queueing), fails over
along downstream.servers, marks a server that failed down for downstream.down_time, and keeps
clean connections idle for reuse. A connection remembers which client it was introduced as
(XCLIENT); the same client gets it back without a round trip, another client re-introduces it.

Commands go through aiosmtplib. Its DATA API takes a whole message (aiosmtplib#20), so the
streamed body is written to its transport directly, with its flow control for backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import cast

import aiosmtplib
from aiosmtplib.esmtp import parse_esmtp_extensions

from . import metrics, replies
from .config import DownstreamConfig, HostPort
from .replies import Reply

log = logging.getLogger("relayproxy.downstream")

# Body bytes buffered towards the downstream before the client is read again.
WRITE_HIGH_WATER = 256 * 1024


class DownstreamError(Exception):
    """The downstream failed; reply is what the client gets for the pending command.

    fatal: the connection is gone mid-session (timeout, disconnect), so the inbound session
    ends with 421 after the reply; otherwise (not reachable at MAIL, busy) the session goes on.
    """

    def __init__(self, reply: Reply, fatal: bool, kind: str, where: str = ""):
        super().__init__(str(reply))
        self.reply = reply
        self.fatal = fatal
        self.kind = kind
        self.where = where


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """The real client, as XCLIENT passes it on (Postfix XCLIENT_README)."""

    addr: str
    port: int
    name: str
    helo: str
    proto: str  # "SMTP" or "ESMTP"


def _xtext(value: str) -> str:
    # RFC 3461 4: xtext; "+", "=" and characters outside 0x21-0x7e are hex-escaped.
    return "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in "+=" else "".join(
            f"+{b:02X}" for b in c.encode("utf-8")
        )
        for c in value
    )


def xclient_command(client: ClientIdentity, offered: Collection[str]) -> bytes:
    addr = f"IPV6:{client.addr}" if ":" in client.addr else client.addr
    attributes = {
        "ADDR": addr,
        "PORT": str(client.port),
        "NAME": client.name,
        "HELO": client.helo or "[UNAVAILABLE]",
        "PROTO": client.proto,
    }
    parts = [f"{k}={_xtext(v)}" for k, v in attributes.items() if not offered or k in offered]
    return ("XCLIENT " + " ".join(parts)).encode("ascii")


class Connection:
    """One live downstream SMTP session."""

    def __init__(self, pool: Pool, server: HostPort, smtp: aiosmtplib.SMTP):
        self.pool = pool
        self.server = server
        self.where = str(server)
        self.smtp = smtp
        self.extensions: dict[str, str] = {}
        self.in_transaction = False
        self.reused = False
        self.introduced: bytes | None = None  # the XCLIENT line it was last introduced with
        # XCLIENT attributes offered to the proxy itself (None: no XCLIENT); later EHLOs, made
        # as the client, may say less, and must not turn XCLIENT off for the next client
        self.xclient: frozenset[str] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def supports(self, keyword: str) -> bool:
        return keyword.lower() in self.extensions

    def _fail(self, stage: str, exc: BaseException) -> DownstreamError:
        self.close()
        if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
            what, kind = "timed out", "timeout"
        else:
            what, kind = "disconnected", "disconnect"
        metrics.DOWNSTREAM_ERRORS.labels(kind).inc()
        log.warning("downstream %s %s during %s: %s", self.where, what, stage, exc)
        return DownstreamError(
            replies.downstream_failed(self.where, stage, what), True, kind, self.where
        )

    async def command(self, stage: str, line: bytes, timeout: float | None = None) -> Reply:
        """Send one command line and return the downstream's reply, relayable as it is."""
        response = await self._execute(stage, line, timeout)
        return Reply.from_downstream(response.code, response.message)

    async def _execute(
        self, stage: str, line: bytes, timeout: float | None = None
    ) -> aiosmtplib.SMTPResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            response = await self.smtp.execute_command(
                line, timeout=self.pool.config.command_timeout if timeout is None else timeout
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise self._fail(stage, exc) from exc
        metrics.LATENCY[stage].observe(loop.time() - started)
        return response

    async def ehlo(self, name: str) -> aiosmtplib.SMTPResponse:
        response = await self._execute("ehlo", b"EHLO " + name.encode("utf-8", "surrogateescape"))
        if response.code == 250:
            extensions, _ = parse_esmtp_extensions(response.message)
            self.extensions = {k.lower(): v for k, v in extensions.items()}
        return response

    # streamed DATA

    def write(self, data: bytes) -> None:
        protocol = self.smtp.protocol
        if protocol is None:
            raise self._fail("DATA", ConnectionResetError("connection lost"))
        try:
            protocol.write(data)
        except aiosmtplib.SMTPException as exc:
            raise self._fail("DATA", exc) from exc

    async def drain(self) -> None:
        """Wait until the downstream has taken the body so far (backpressure to the client)."""
        protocol = self.smtp.protocol
        transport = self.smtp.transport
        if protocol is None or transport is None:
            raise self._fail("DATA", ConnectionResetError("connection lost"))
        if cast(asyncio.WriteTransport, transport).get_write_buffer_size() <= WRITE_HIGH_WATER:
            return
        try:
            async with asyncio.timeout(self.pool.config.data_timeout):
                await protocol._drain_helper()
        except (OSError, TimeoutError) as exc:
            raise self._fail("DATA", exc) from exc

    async def finish(self, rest: bytes = b"") -> Reply:
        """Send what is left of the body and the final dot (withheld until now), in one write,
        and return the downstream's verdict."""
        protocol = self.smtp.protocol
        if protocol is None:
            raise self._fail("end of data", ConnectionResetError("connection lost"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            protocol.write(rest + b".\r\n")
            response = await protocol.read_response(timeout=self.pool.config.data_timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise self._fail("end of data", exc) from exc
        metrics.LATENCY["dot"].observe(loop.time() - started)
        self.in_transaction = False
        return Reply.from_downstream(response.code, response.message)

    def park(self, idle_timeout: float) -> None:
        """Kept idle in the pool: say goodbye if nobody takes it within idle_timeout."""
        self._idle_handle = asyncio.get_running_loop().call_later(idle_timeout, self.quit)

    def unpark(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def close(self) -> None:
        """Drop the connection. Mid-DATA this is the abort: without the dot, nothing is kept."""
        self.in_transaction = False
        self.unpark()
        self.smtp.close()
        self.pool._forget(self)

    def quit(self) -> None:
        """Say goodbye without waiting for the reply: nobody needs it."""
        protocol = self.smtp.protocol
        if protocol is not None and self.alive:
            with contextlib.suppress(aiosmtplib.SMTPException):
                protocol.write(b"QUIT\r\n")
        self.close()


@dataclass(slots=True)
class _ServerState:
    address: HostPort
    down_until: float = 0.0


class Pool:
    def __init__(self, config: DownstreamConfig, helo_name: str):
        self.config = config
        self.helo_name = helo_name
        self._servers = [_ServerState(hp) for hp in config.servers]
        self._open: set[Connection] = set()
        self._idle: deque[Connection] = deque()
        self._connecting = 0
        self._tls_context: ssl.SSLContext | None = None
        self.extensions: dict[str, str] | None = None  # as last offered; None: not known yet

    def _forget(self, conn: Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            metrics.DOWNSTREAM_CONNECTIONS.dec()
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def offers(self, keyword: str) -> bool:
        """Did the downstream offer this extension when last greeted?

        Until a first connection says (no connection is opened just to ask: a relay probe must
        cost the mail server nothing), assume it does; a parameter it then lacks is refused
        openly where it meets the downstream (relayproxy.leg).
        """
        return self.extensions is None or keyword.lower() in self.extensions

    async def acquire(self, client: ClientIdentity) -> Connection:
        """A connection introduced as client: from the pool, or newly opened."""
        conn = self._take_idle(client)
        while conn is not None:
            conn.unpark()
            if conn.alive:
                if conn.introduced == self._introduction(conn, client):
                    return conn  # introduced as this client already: nothing to send
                try:
                    await self._introduce(conn, client)
                    return conn
                except DownstreamError as exc:
                    if exc.kind in ("xclient", "helo_refused"):
                        raise  # the client's problem, not the connection's
            conn.close()  # it went away while idle: try another, or open a fresh one
            conn = self._take_idle(client)
        # connections still being opened count too, or a burst of MAILs would overshoot
        if len(self._open) + self._connecting >= self.config.max_connections:
            metrics.DOWNSTREAM_ERRORS.labels("busy").inc()
            raise DownstreamError(replies.DOWNSTREAM_BUSY, False, "busy")
        self._connecting += 1
        try:
            conn = await self._connect()
        finally:
            self._connecting -= 1
        await self._introduce(conn, client)
        return conn

    def _take_idle(self, client: ClientIdentity) -> Connection | None:
        """The newest idle connection, preferring one already introduced as this client."""
        for conn in reversed(self._idle):
            if conn.introduced == self._introduction(conn, client):
                self._idle.remove(conn)
                break
        else:
            if not self._idle:
                return None
            conn = self._idle.pop()
        conn.reused = True
        return conn

    def release(self, conn: Connection) -> None:
        """The inbound session is done with conn; keep it for reuse if it is clean."""
        if conn.in_transaction or not (self.config.reuse_connections and conn.alive):
            conn.quit()
            return
        conn.park(self.config.idle_timeout)
        self._idle.append(conn)

    def probed(self, server: HostPort, ok: bool) -> None:
        """An active probe's result (relayproxy.probe): a failure marks the server down as a
        failed connection does; an answer marks it up at once, before its down_time is over."""
        for state in self._servers:
            if state.address == server:
                state.down_until = (
                    0.0 if ok else asyncio.get_running_loop().time() + self.config.down_time)

    def close_idle(self) -> None:
        for conn in list(self._idle):
            conn.quit()

    def close_all(self) -> None:
        for conn in list(self._open):
            conn.quit()

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        now = loop.time()
        candidates = [s for s in self._servers if s.down_until <= now]
        if not candidates:
            # every server is marked down: try them all anyway rather than refuse blindly
            candidates = sorted(self._servers, key=lambda s: s.down_until)
        failures = []
        for state in candidates:
            try:
                conn = await self._open_connection(state.address)
            except DownstreamError as exc:
                failures.append(exc)
                if exc.kind != "tls":  # missing TLS is configuration, not an outage
                    state.down_until = loop.time() + self.config.down_time
                continue
            state.down_until = 0.0
            return conn
        if len(failures) == 1:
            raise failures[0]
        where = ", ".join(str(s.address) for s in candidates)
        raise DownstreamError(replies.downstream_unreachable(where), False, "connect", where)

    async def _open_connection(self, server: HostPort) -> Connection:
        use_tls = self.config.tls != "none"
        try:
            return await self._try_open(server, use_tls)
        except _TLSFailed:
            if self.config.tls == "required":
                metrics.DOWNSTREAM_ERRORS.labels("tls").inc()
                reply = replies.downstream_tls_required(str(server))
                raise DownstreamError(reply, False, "tls", str(server)) from None
            # opportunistic: as Postfix's "may" level, fall back to plaintext
            return await self._try_open(server, False)

    async def _try_open(self, server: HostPort, tls: bool) -> Connection:
        """Connect, EHLO, STARTTLS: whatever fails here is the server's fault (mark-down)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        smtp = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            local_hostname=self.helo_name,
            timeout=self.config.command_timeout,
            start_tls=False,
            use_tls=False,
        )
        try:
            await smtp.connect(timeout=self.config.connect_timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            metrics.DOWNSTREAM_ERRORS.labels("connect").inc()
            log.warning("downstream %s unreachable: %s", server, exc)
            raise DownstreamError(
                replies.downstream_unreachable(str(server)), False, "connect", str(server)
            ) from exc
        metrics.LATENCY["connect"].observe(loop.time() - started)
        conn = Connection(self, server, smtp)
        self._open.add(conn)
        metrics.DOWNSTREAM_CONNECTIONS.inc()
        try:
            _set_nodelay(smtp)
            await self._greet(conn)
            if tls:
                await self._starttls(conn)
        except _TLSFailed:
            conn.close()
            raise
        except DownstreamError as exc:
            conn.close()
            # a fault while opening is this server's fault: report it as unreachable so the
            # caller fails over (the cause is in the log already)
            raise DownstreamError(
                replies.downstream_unreachable(str(server)), False, "connect", str(server)
            ) from exc
        return conn

    async def _greet(self, conn: Connection) -> None:
        name = self.helo_name
        if (await conn.ehlo(name)).code == 250:
            self.extensions = conn.extensions
            offered = conn.extensions.get("xclient")
            conn.xclient = None if offered is None else frozenset(offered.upper().split())
        else:
            conn.extensions = {}
            reply = await conn.command("ehlo", b"HELO " + name.encode("ascii", "replace"))
            if reply.code != 250:
                metrics.DOWNSTREAM_ERRORS.labels("connect").inc()
                log.warning("downstream %s refused EHLO and HELO: %s", conn.where, reply)
                raise DownstreamError(
                    replies.downstream_unreachable(conn.where), False, "connect", conn.where
                )
            self.extensions = {}

    async def _starttls(self, conn: Connection) -> None:
        if not conn.supports("starttls"):
            if self.config.tls == "required":
                raise _TLSFailed
            return
        if self._tls_context is None:
            self._tls_context = _client_tls_context(self.config.tls_verify)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await conn.smtp.starttls(
                tls_context=self._tls_context,
                server_hostname=conn.server.host,
                timeout=self.config.command_timeout,
            )
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            log.warning("downstream %s STARTTLS failed: %s", conn.where, exc)
            conn.close()
            raise _TLSFailed from exc
        metrics.LATENCY["starttls"].observe(loop.time() - started)
        await self._greet(conn)

    async def _introduce(self, conn: Connection, client: ClientIdentity) -> None:
        """Tell the downstream who the real client is (XCLIENT), when it lets us.

        Fails closed: a downstream that offers XCLIENT trusts whatever comes through a
        connection introduced by us, so a refused XCLIENT must never carry the message under
        the proxy's identity. Refusals here are about this client (its HELO name, its address),
        not the server: the connection is dropped but the server is not marked down.
        """
        conn.introduced = None
        line = self._introduction(conn, client)
        if not line:
            conn.introduced = line
            return
        reply = await conn.command("xclient", line)
        if reply.code >= 300:
            conn.close()
            metrics.DOWNSTREAM_ERRORS.labels("xclient").inc()
            log.warning("downstream %s refused XCLIENT for %s: %s", conn.where, client.addr, reply)
            raise DownstreamError(
                replies.downstream_refused_identity(conn.where), False, "xclient", conn.where
            )
        if reply.code == 220:
            # XCLIENT resets the downstream to its greeting state (XCLIENT_README); greeting it
            # with the client's own HELO name keeps that name in its logs and Received header
            # always EHLO: the extensions are needed whatever the client spoke (PROTO says that)
            response = await conn.ehlo(client.helo)
            if response.code != 250:
                greeted = Reply.from_downstream(response.code, response.message)
                conn.close()
                metrics.DOWNSTREAM_ERRORS.labels("helo_refused").inc()
                log.info("downstream %s refused HELO %r of %s: %s", conn.where, client.helo,
                         client.addr, greeted)
                # its own words are the client's answer (e.g. an invalid HELO name)
                raise DownstreamError(greeted, False, "helo_refused", conn.where)
        conn.introduced = line

    def _introduction(self, conn: Connection, client: ClientIdentity) -> bytes:
        """The XCLIENT line that introduces client on conn (b"" when it takes none).

        Two clients with the same line look the same to the downstream, so a connection
        introduced with it needs no new XCLIENT (and no EHLO after it).
        """
        if not self.config.xclient or conn.xclient is None:
            return b""
        return xclient_command(client, conn.xclient)


class _TLSFailed(Exception):
    pass


def _client_tls_context(verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        # Mail servers behind a proxy rarely have certificates for the name we dial;
        # encryption without verification is what "opportunistic" means in SMTP (RFC 7435).
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _set_nodelay(smtp: aiosmtplib.SMTP) -> None:
    sock = smtp.transport.get_extra_info("socket") if smtp.transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
