"""A scripted SMTP server for downstream fault tests.

It runs its own asyncio loop in a background thread and answers each stage of the SMTP
dialogue as scripted: with a reply, by stalling (reading on, never answering) or by dropping
the connection. Everything it receives is recorded so tests can assert on exactly what the
proxy sent downstream.

Script keys (stages): "connect" (instead of the banner), any command verb such as "EHLO",
"HELO", "XCLIENT", "MAIL", "RCPT", "DATA" (reply to the DATA command), "RSET", "QUIT",
"NOOP", plus "BODY" (while message bytes arrive) and "DOT" (reply to the final dot).

Behaviour values:
  "250 2.1.0 Ok"               one reply line
  ["250 a", "250 b"]            one multi-line reply (sent as "250-a" / "250 b")
  b"raw bytes"                  sent verbatim (for malformed replies)
  STALL ("stall")               never answer; keep reading; connection open until stop()
  DROP ("drop")                 close the connection (FIN) without answering
  RESET ("reset")               abort the connection with a TCP RST
  (b1, b2, ...)  a tuple        one behaviour per occurrence of the stage, in order, the
                                last repeated; counted across all connections of the server
For "BODY", DROP/RESET act after the first body bytes arrive; a reply value is sent after the
first body bytes and the connection is then closed; STALL keeps reading but never recognises
the end of data. Without a script the server is well behaved, with Postfix-like sequencing
errors (503 / 554) for out-of-order commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .ports import LOOPBACK

STALL = "stall"
DROP = "drop"
RESET = "reset"

DEFAULT_BANNER = "220 scripted.test ESMTP"
DEFAULT_HOSTNAME = "scripted.test"
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    "PIPELINING",
    "SIZE 100000000",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
)

Behaviour = str | list[str] | bytes
StageScript = Behaviour | tuple[Behaviour, ...]

_ACTIONS = (STALL, DROP, RESET)
_DEFAULT_REPLIES: dict[str, Behaviour] = {
    "MAIL": "250 2.1.0 Ok",
    "RCPT": "250 2.1.5 Ok",
    "DATA": "354 End data with <CR><LF>.<CR><LF>",
    "RSET": "250 2.0.0 Ok",
    "NOOP": "250 2.0.0 Ok",
    "QUIT": "221 2.0.0 Bye",
    "VRFY": "502 5.5.1 VRFY command is disabled",
}
_UNKNOWN_COMMAND = "502 5.5.2 Error: command not recognized"
_END_OF_DATA = b"\r\n.\r\n"


@dataclass
class Transaction:
    """A completed message (final dot received)."""

    connection: int
    mail_from: str  # the MAIL command line as received
    rcpts: list[str]  # the accepted RCPT command lines as received
    raw: bytes  # wire bytes between the 354 and the final ".\r\n", still dot-stuffed

    @property
    def content(self) -> bytes:
        """The message with dot-stuffing undone."""
        return dot_unstuff(self.raw)


@dataclass
class ConnectionRecord:
    index: int
    commands: list[str] = field(default_factory=list)
    closed: bool = False
    closed_by: str | None = None  # "peer", "server" or "stop"


class _Close(Exception):
    """Internal: the scripted behaviour ended the connection."""


def dot_unstuff(data: bytes) -> bytes:
    """Undo RFC 5321 transparency (a leading ".." on a CRLF line becomes ".")."""
    if data.startswith(b".."):
        data = data[1:]
    return data.replace(b"\r\n..", b"\r\n.")


def _validate(stage: str, value: StageScript) -> None:
    items = value if isinstance(value, tuple) else (value,)
    if not items:
        raise ValueError(f"script for {stage!r}: empty sequence")
    for item in items:
        if isinstance(item, bytes) or item in _ACTIONS:
            continue
        lines = item if isinstance(item, list) else str(item).split("\n")
        for line in lines:
            if len(line) < 3 or not line[:3].isdigit():
                raise ValueError(f"script for {stage!r}: {line!r} is not a reply line")


def _encode_reply(reply: str | list[str]) -> bytes:
    lines = reply if isinstance(reply, list) else reply.split("\n")
    out: list[bytes] = []
    for i, line in enumerate(lines):
        separator = " " if i == len(lines) - 1 else "-"
        text = line[4:] if len(line) > 3 else ""
        out.append(f"{line[:3]}{separator}{text}\r\n".encode())
    return b"".join(out)


def _reply_code(behaviour: Behaviour) -> int | None:
    if isinstance(behaviour, bytes):
        head = behaviour[:3]
        return int(head) if head.isdigit() else None
    first = behaviour[0] if isinstance(behaviour, list) else behaviour
    return int(first[:3]) if first[:3].isdigit() else None


class _Session:
    """Per-connection protocol state (lives on the server's event loop only)."""

    def __init__(self, record: ConnectionRecord, writer: asyncio.StreamWriter) -> None:
        self.record = record
        self.writer = writer
        self.stalled = False
        self.in_data = False
        self.body_started = False
        self.body_stalled = False
        self.data = bytearray()
        self.mail_from: str | None = None
        self.rcpts: list[str] = []


class ScriptedDownstream:
    """Scripted SMTP server on 127.0.0.1:<free port>; see the module docstring."""

    def __init__(
        self,
        script: Mapping[str, StageScript] | None = None,
        *,
        banner: str = DEFAULT_BANNER,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        hostname: str = DEFAULT_HOSTNAME,
        host: str = LOOPBACK,
        port: int = 0,
    ) -> None:
        self.script: dict[str, StageScript] = {}
        for stage, value in (script or {}).items():
            key = stage if stage == "connect" else stage.upper()
            _validate(key, value)
            self.script[key] = value
        self.banner = banner
        self.extensions = list(extensions)
        self.hostname = hostname
        self.host = host
        self.port = port
        self._cond = threading.Condition(threading.RLock())
        self._records: list[ConnectionRecord] = []
        self._transactions: list[Transaction] = []
        self._partial: list[bytes] = []
        self._dot_received = False
        self._stage_counts: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 10) -> ScriptedDownstream:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self.port)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"scripted-smtp-{id(self)}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"scripted SMTP server did not start within {timeout}s")
        if failure:
            raise RuntimeError("scripted SMTP server failed to start") from failure[0]
        return self

    def stop(self, timeout: float = 10) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        future.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"scripted SMTP server thread did not stop within {timeout}s")
        self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            self._finish(session, "stop")
            session.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> ScriptedDownstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ recorded state

    @property
    def connections(self) -> int:
        with self._cond:
            return len(self._records)

    @property
    def open_connections(self) -> int:
        with self._cond:
            return sum(1 for r in self._records if not r.closed)

    @property
    def closed_connections(self) -> int:
        with self._cond:
            return sum(1 for r in self._records if r.closed)

    @property
    def commands(self) -> list[list[str]]:
        """Command lines as received, one list per connection (in connection order)."""
        with self._cond:
            return [list(r.commands) for r in self._records]

    @property
    def all_commands(self) -> list[str]:
        with self._cond:
            return [c for r in self._records for c in r.commands]

    @property
    def connection_records(self) -> list[ConnectionRecord]:
        with self._cond:
            return [
                ConnectionRecord(r.index, list(r.commands), r.closed, r.closed_by)
                for r in self._records
            ]

    @property
    def transactions(self) -> list[Transaction]:
        with self._cond:
            return list(self._transactions)

    @property
    def messages(self) -> list[bytes]:
        """Raw (still dot-stuffed) bytes of each completed message."""
        with self._cond:
            return [t.raw for t in self._transactions]

    @property
    def partial_bodies(self) -> list[bytes]:
        """DATA bytes of connections that closed before a final dot."""
        with self._cond:
            return list(self._partial)

    @property
    def dot_received(self) -> bool:
        with self._cond:
            return self._dot_received

    def describe(self) -> str:
        with self._cond:
            return (
                f"connections={len(self._records)} open={self.open_connections} "
                f"messages={len(self._transactions)} partial={len(self._partial)} "
                f"dot_received={self._dot_received} commands={self.commands!r}"
            )

    # ------------------------------------------------------------------ waiting

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 10, what: str = "condition"
    ) -> None:
        """Block until ``predicate()`` holds (re-checked on every recorded event)."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"scripted server: timed out after {timeout}s waiting for {what}; "
                    f"{self.describe()}"
                )

    def wait_for_connections(self, n: int, timeout: float = 10) -> None:
        self.wait_for(lambda: self.connections >= n, timeout, f"{n} connection(s)")

    def wait_for_closed(self, n: int, timeout: float = 10) -> None:
        self.wait_for(lambda: self.closed_connections >= n, timeout, f"{n} closed connection(s)")

    def wait_for_messages(self, n: int, timeout: float = 10) -> list[bytes]:
        self.wait_for(lambda: len(self._transactions) >= n, timeout, f"{n} message(s)")
        return self.messages

    def wait_for_partial(self, n: int = 1, timeout: float = 10) -> list[bytes]:
        self.wait_for(lambda: len(self._partial) >= n, timeout, f"{n} partial body/bodies")
        return self.partial_bodies

    def wait_for_command(self, prefix: str, count: int = 1, timeout: float = 10) -> None:
        """Wait until ``count`` received command lines start with ``prefix`` (any case)."""
        wanted = prefix.upper()

        def seen() -> bool:
            return sum(1 for c in self.all_commands if c.upper().startswith(wanted)) >= count

        self.wait_for(seen, timeout, f"{count} command(s) starting with {prefix!r}")

    # ------------------------------------------------------------------ protocol

    def _behaviour(self, stage: str, default: Behaviour) -> tuple[Behaviour, bool]:
        """The behaviour for this occurrence of ``stage``; the flag says it was scripted."""
        if stage not in self.script:
            return default, False
        value = self.script[stage]
        if not isinstance(value, tuple):
            return value, True
        with self._cond:
            index = self._stage_counts.get(stage, 0)
            self._stage_counts[stage] = index + 1
        return value[min(index, len(value) - 1)], True

    def _finish(self, session: _Session, closed_by: str) -> None:
        with self._cond:
            if session.record.closed:
                return
            if session.in_data:
                self._partial.append(bytes(session.data))
            session.record.closed = True
            session.record.closed_by = closed_by
            self._cond.notify_all()
        self._sessions.discard(session)

    async def _act(self, session: _Session, behaviour: Behaviour) -> None:
        """Carry out a behaviour; raises _Close when it ends the connection."""
        if behaviour == STALL:
            session.stalled = True
            return
        if behaviour in (DROP, RESET):
            if behaviour == RESET:
                sock = session.writer.get_extra_info("socket")
                if sock is not None:
                    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
            raise _Close
        data = behaviour if isinstance(behaviour, bytes) else _encode_reply(behaviour)
        session.writer.write(data)
        await session.writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._cond:
            record = ConnectionRecord(index=len(self._records))
            self._records.append(record)
            self._cond.notify_all()
        session = _Session(record, writer)
        self._sessions.add(session)
        closed_by = "peer"
        try:
            behaviour, _ = self._behaviour("connect", self.banner)
            await self._act(session, behaviour)
            buffer = bytearray()
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buffer += chunk
                await self._process(session, buffer)
        except _Close:
            closed_by = "server"
        except (ConnectionError, asyncio.IncompleteReadError):
            closed_by = "peer"
        except asyncio.CancelledError:
            closed_by = "stop"
        finally:
            self._finish(session, closed_by)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def _process(self, session: _Session, buffer: bytearray) -> None:
        while buffer:
            if session.in_data:
                await self._process_data(session, buffer)
                if session.in_data:
                    return
                continue
            end = buffer.find(b"\n")
            if end < 0:
                return
            raw_line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            line = raw_line.rstrip(b"\r\n").decode("utf-8", errors="surrogateescape")
            with self._cond:
                session.record.commands.append(line)
                self._cond.notify_all()
            if not session.stalled:
                await self._command(session, line)

    async def _process_data(self, session: _Session, buffer: bytearray) -> None:
        # Search only the new bytes (plus 4 bytes of overlap) so large bodies stay linear.
        search_from = max(0, len(session.data) - 4)
        session.data += buffer
        buffer.clear()
        if not session.body_started and session.data:
            session.body_started = True
            behaviour, scripted = self._behaviour("BODY", "")
            if scripted:
                if behaviour == STALL:
                    session.body_stalled = True
                else:
                    await self._act(session, behaviour)
                    raise _Close
        if session.body_stalled:
            return
        # The CRLF that ended the DATA command counts as the CRLF before the final dot.
        if session.data.startswith(b".\r\n"):
            body_end, rest_start = 0, 3
        else:
            index = session.data.find(_END_OF_DATA, search_from)
            if index < 0:
                return
            body_end, rest_start = index + 2, index + len(_END_OF_DATA)
        body = bytes(session.data[:body_end])
        buffer += session.data[rest_start:]
        session.data = bytearray()
        session.in_data = False
        session.body_started = False
        with self._cond:
            self._dot_received = True
            self._transactions.append(
                Transaction(
                    connection=session.record.index,
                    mail_from=session.mail_from or "",
                    rcpts=list(session.rcpts),
                    raw=body,
                )
            )
            count = len(self._transactions)
            self._cond.notify_all()
        session.mail_from = None
        session.rcpts = []
        behaviour, _ = self._behaviour("DOT", f"250 2.0.0 Ok: queued as SCRIPTED{count}")
        await self._act(session, behaviour)

    async def _command(self, session: _Session, line: str) -> None:
        verb = line.split(" ", 1)[0].upper()
        if verb in ("EHLO", "HELO", "XCLIENT"):
            session.mail_from, session.rcpts = None, []
        default = self._default_reply(session, verb)
        behaviour, _ = self._behaviour(verb, default)
        await self._act(session, behaviour)
        if session.stalled or (isinstance(behaviour, str) and behaviour in _ACTIONS):
            return
        code = _reply_code(behaviour)
        positive = code is not None and 200 <= code < 300
        if verb == "MAIL" and positive:
            session.mail_from, session.rcpts = line, []
        elif verb == "RCPT" and positive:
            session.rcpts.append(line)
        elif verb == "DATA" and code == 354:
            session.in_data = True
        elif verb == "RSET":
            session.mail_from, session.rcpts = None, []
        elif verb == "QUIT":
            raise _Close

    def _default_reply(self, session: _Session, verb: str) -> Behaviour:
        if verb == "EHLO":
            lines = [self.hostname, *self.extensions]
            return [f"250 {text}" for text in lines]
        if verb == "HELO":
            return f"250 {self.hostname}"
        if verb == "XCLIENT":
            # Postfix answers a successful XCLIENT with a fresh greeting.
            return self.banner
        if verb == "MAIL" and session.mail_from is not None:
            return "503 5.5.1 Error: nested MAIL command"
        if verb == "RCPT" and session.mail_from is None:
            return "503 5.5.1 Error: need MAIL command"
        if verb == "DATA" and session.mail_from is None:
            return "503 5.5.1 Error: need RCPT command"
        if verb == "DATA" and not session.rcpts:
            return "554 5.5.1 Error: no valid recipients"
        return _DEFAULT_REPLIES.get(verb, _UNKNOWN_COMMAND)
