"""A session's downstream leg: a pool connection held only while a transaction needs it.

The connection is taken at the transaction's first recipient that passed the local checks (as
Postfix's before-queue proxy does), so relay probes and locally refused sessions never cost the
mail server a connection; XCLIENT (in the pool) and MAIL go down first, then that RCPT. It goes
back to the pool when the transaction ends: a client idling between messages holds nothing that
another transaction needs, and the same client usually takes the same connection back without
a round trip (the pool remembers whom each connection was introduced as).

MAIL parameters meet the downstream here, so this is where an extension the downstream lacks is
refused openly instead of dropped (RFC 3461 for DSN, RFC 6531 for SMTPUTF8), or, for 8BITMIME,
where the message is marked 7-bit only and checked as it streams (RFC 6152 3).
"""

from __future__ import annotations

from . import replies
from .downstream import ClientIdentity, Connection, DownstreamError, Pool
from .replies import Reply

# Which extension each forwarded parameter needs.
_NEEDS = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8", "RET": "dsn",
          "ENVID": "dsn", "NOTIFY": "dsn", "ORCPT": "dsn"}


def _params(params: dict[str, str | None]) -> str:
    return "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params.items())


class DownstreamLeg:
    __slots__ = ("conn", "pool", "seven_bit")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.conn: Connection | None = None
        self.seven_bit = False  # the downstream takes 7-bit data only (no 8BITMIME)

    @property
    def where(self) -> str:
        return self.conn.where if self.conn is not None else ""

    @property
    def open(self) -> bool:
        return self.conn is not None

    def _adapt(self, conn: Connection, params: dict[str, str | None]) -> Reply | str:
        """The parameters as this downstream can take them, or the refusal."""
        if "SMTPUTF8" in params and not conn.supports("smtputf8"):
            return replies.downstream_no_smtputf8(conn.where)
        if any(_NEEDS[k] == "dsn" for k in params) and not conn.supports("dsn"):
            return replies.downstream_no_dsn(conn.where)
        forwarded = dict(params)
        self.seven_bit = not conn.supports("8bitmime")
        if self.seven_bit:
            # a 7-bit message may go as it is; 8-bit content is refused at its end of data
            forwarded.pop("BODY", None)
        if not conn.supports("size"):
            forwarded.pop("SIZE", None)
        return _params(forwarded)

    async def begin(
        self, client: ClientIdentity, sender: str, params: dict[str, str | None]
    ) -> Reply:
        """Take a connection and send MAIL; the reply is relayable. A refusal ends the leg.

        Raises DownstreamError (never fatal to the inbound session: the transaction just gets
        the reply) when no connection can be had or MAIL fails.
        """
        for attempt in (1, 2):
            conn = await self.pool.acquire(client)
            self.conn = conn
            adapted = self._adapt(conn, params)
            if isinstance(adapted, Reply):
                self.release()
                return adapted
            line = f"MAIL FROM:<{sender}>{adapted}".encode("utf-8", "surrogateescape")
            try:
                reply = await conn.command("mail", line)
            except DownstreamError as exc:
                self.conn = None
                # A kept connection may have been closed by the downstream while idle; one
                # fresh try costs little and the client never sees the first.
                if attempt == 1 and conn.reused:
                    continue
                raise DownstreamError(exc.reply, False, exc.kind, exc.where) from exc
            conn.in_transaction = True
            if reply.code != 250:
                # RSET even so: Postfix keeps a refused MAIL's SIZE and refuses the next MAIL
                # of that session with it (seen with 3.7); the next user must get a clean one
                await self.reset()
            return reply
        raise AssertionError("unreachable")

    async def rcpt(self, recipient: str, params: dict[str, str | None]) -> Reply:
        assert self.conn is not None
        if params and not self.conn.supports("dsn"):  # NOTIFY and ORCPT are DSN's
            return replies.downstream_no_dsn(self.conn.where)
        line = f"RCPT TO:<{recipient}>{_params(params)}"
        return await self.conn.command("rcpt", line.encode("utf-8", "surrogateescape"))

    async def data(self) -> Reply:
        assert self.conn is not None
        return await self.conn.command("data", b"DATA")

    async def finish(self, rest: bytes = b"") -> Reply:
        """The rest of the body and the final dot; the transaction is over either way, so the
        leg goes back."""
        assert self.conn is not None
        try:
            return await self.conn.finish(rest)
        finally:
            self.release()

    async def reset(self) -> None:
        """End the downstream transaction (RSET) and give the connection back."""
        conn = self.conn
        if conn is None:
            return
        if conn.in_transaction and conn.alive:
            try:
                reply = await conn.command("rset", b"RSET")
            except DownstreamError:
                self.conn = None
                return
            if reply.code != 250:
                self.abort()
                return
            conn.in_transaction = False
        self.release()

    def release(self) -> None:
        """Back to the pool (kept idle if clean, else closed)."""
        if self.conn is not None:
            self.pool.release(self.conn)
            self.conn = None

    def abort(self) -> None:
        """Drop the connection. Mid-DATA this is the abort: without the dot, nothing is kept."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
