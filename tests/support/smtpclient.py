"""A blocking, byte-exact SMTP test client.

Unlike smtplib/aiosmtplib it never rewrites what the test sends (no dot-stuffing, no line
ending fixes, no address validation) unless asked, so tests can send malformed or hostile
input and see exactly what the server answers.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TIMEOUT = 10.0

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


class SMTPProtocolError(Exception):
    """The server sent something that is not a well-formed SMTP reply."""


class ConnectionClosed(ConnectionError):
    """The server closed the connection before a complete reply arrived."""

    def __init__(self, message: str, partial: bytes = b"") -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: list[str]  # text of each line, without the "250-" / "250 " prefix
    raw: bytes = field(repr=False)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code (e.g. "5.1.1") of the first line, if any."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        return match.group(1) if match else None

    @property
    def extensions(self) -> dict[str, str]:
        """EHLO keywords (upper case) mapped to their parameters; meaningful for EHLO only."""
        result: dict[str, str] = {}
        for line in self.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                result[keyword.upper()] = params
        return result

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return "\n".join(f"{self.code} {line}" for line in self.lines)


class RawSMTP:
    """A blocking SMTP client over a plain socket with a per-operation timeout."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.greeting: Reply | None = None
        self.extensions: dict[str, str] = {}
        self._buffer = b""

    # ------------------------------------------------------------------ connection

    def connect(self, host: str, port: int, read_greeting: bool = True) -> Reply | None:
        """Connect and (by default) read the greeting."""
        self.sock = socket.create_connection((host, port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        if read_greeting:
            self.greeting = self.read_reply()
            return self.greeting
        return None

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise RuntimeError("RawSMTP is not connected")
        return self.sock

    # ------------------------------------------------------------------ sending

    def send(self, data: bytes | str) -> None:
        """Send bytes exactly as given, without reading anything."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._socket().sendall(data)

    def cmd(self, line: str | bytes) -> Reply:
        """Send one command line (CRLF appended) and read its reply."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.read_reply()

    def ehlo(self, name: str = "client.test") -> Reply:
        """EHLO; the parsed extensions are also kept in ``self.extensions``."""
        reply = self.cmd(f"EHLO {name}")
        self.extensions = reply.extensions if reply.code == 250 else {}
        return reply

    # ------------------------------------------------------------------ receiving

    def _read_line(self) -> bytes:
        sock = self._socket()
        while b"\n" not in self._buffer:
            chunk = sock.recv(65536)  # raises TimeoutError after self.timeout
            if not chunk:
                partial, self._buffer = self._buffer, b""
                raise ConnectionClosed("server closed the connection", partial)
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def read_reply(self) -> Reply:
        """Read one complete reply (all continuation lines)."""
        raw = b""
        lines: list[str] = []
        code: int | None = None
        while True:
            try:
                line = self._read_line()
            except ConnectionClosed as exc:
                raise ConnectionClosed(
                    f"server closed the connection (reply so far: {raw + exc.partial!r})",
                    raw + exc.partial,
                ) from None
            raw += line
            text = line.rstrip(b"\r\n").decode("utf-8", errors="replace")
            if len(text) < 3 or not text[:3].isdigit() or (len(text) > 3 and text[3] not in "- "):
                raise SMTPProtocolError(f"malformed reply line {line!r} (reply so far {raw!r})")
            line_code = int(text[:3])
            if code is None:
                code = line_code
            elif line_code != code:
                raise SMTPProtocolError(f"reply code changed mid-reply: {raw!r}")
            lines.append(text[4:])
            if len(text) == 3 or text[3] == " ":
                return Reply(code=code, lines=lines, raw=raw)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection; False if still open at timeout.

        Anything the server sends first (e.g. a 421 before closing) is kept in the buffer
        for read_reply().
        """
        sock = self._socket()
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    return False
                except (ConnectionResetError, BrokenPipeError):
                    return True
                if not chunk:
                    return True
                self._buffer += chunk
        finally:
            sock.settimeout(self.timeout)


def dot_stuff(body: bytes) -> bytes:
    """RFC 5321 section 4.5.2 transparency: double a leading dot on every CRLF line."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


def data_payload(body: bytes, stuff: bool = True) -> bytes:
    """The bytes to send after a 354: the (stuffed) body, a CRLF if missing, and the dot."""
    payload = dot_stuff(body) if stuff else body
    if payload and not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return payload + b".\r\n"


def send_message(
    host: str,
    port: int,
    mail_from: str,
    rcpts: list[str],
    body: bytes,
    *,
    helo: str = "client.test",
    mail_params: str = "",
    stuff: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """One complete SMTP session; returns every reply.

    ``mail_from`` / ``rcpts`` are bare addresses ("" is the null sender). Keys of the result:
    greeting, ehlo, mail, rcpt (list), data, dot, quit. The session stops early (straight to
    QUIT) when MAIL fails or DATA is not answered with 354; skipped steps are absent.
    A server that closes the connection ends the session; ``closed`` is then True.
    """
    result: dict[str, Any] = {"rcpt": [], "closed": False}
    client = RawSMTP(timeout=timeout)
    try:
        result["greeting"] = client.connect(host, port)
        result["ehlo"] = client.ehlo(helo)
        params = f" {mail_params}" if mail_params else ""
        result["mail"] = client.cmd(f"MAIL FROM:<{mail_from}>{params}")
        if result["mail"].code == 250:
            for rcpt in rcpts:
                result["rcpt"].append(client.cmd(f"RCPT TO:<{rcpt}>"))
            result["data"] = client.cmd("DATA")
            if result["data"].code == 354:
                client.send(data_payload(body, stuff=stuff))
                result["dot"] = client.read_reply()
        result["quit"] = client.cmd("QUIT")
    except ConnectionClosed:
        result["closed"] = True
    finally:
        client.close()
    return result
