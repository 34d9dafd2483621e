"""The DATA phase scanner: finds the end of data and checks line endings, chunk by chunk.

Between the 354 and the end of data the client sends the message in wire form: CRLF-ended,
dot-stuffed lines (RFC 5321 4.5.2). That is also what the downstream expects after its own 354,
so clean bytes are forwarded unchanged; nothing is unstuffed and re-stuffed.

The end of data is only ever <CRLF>.<CRLF> (RFC 5321 4.1.1.4). A bare LF or CR must never reach
the downstream, because a server that accepts `<LF>.<LF>` or `<LF>.<CRLF>` as an end of data
would read the rest as a second, smuggled message (CVE-2023-51764, "SMTP smuggling"). With
bare_newline = "reject" the message is refused; with "normalize" every bare CR or LF becomes a
CRLF, and a line that then reads as a lone "." is sent as ".." so the downstream cannot take it
for the end of data.

Any pattern can be split across two reads at any offset, so the scanner withholds the few
trailing bytes that could still turn into CRLF, "." or ".CRLF", and feeds them again in front of
the next chunk. Fast path: for a clean chunk the work is a handful of C-level bytes methods.
"""

from __future__ import annotations

import re
from typing import Literal

_NEWLINE = re.compile(rb"\r\n|\r|\n")
_DOT_LINE = re.compile(rb"\n\.")
_LINE_BREAKS = (b"\r", b"\n")


class DotReader:
    """Feed DATA-phase bytes; get back what may be forwarded, until the end of data is seen."""

    __slots__ = (
        "_any_bol",
        "_held",
        "_line_dot",
        "_line_len",
        "_max_line",
        "_normalize",
        "_strict_bol",
        "bare_newline",
        "done",
        "line_too_long",
        "size",
    )

    def __init__(self, max_line_length: int, bare_newline: Literal["reject", "normalize"]):
        self._max_line = max_line_length
        self._normalize = bare_newline == "normalize"
        self._held = b""
        # Is the next byte at the start of a line? "strict": after CRLF (or the DATA command);
        # "any": after CRLF, CR or LF (what a lenient reader would take for a line start).
        self._strict_bol = True
        self._any_bol = True
        self._line_len = 0  # octets of the unfinished current line seen so far
        self._line_dot = False  # ... and whether it began with a dot
        self.size = 0  # octets of message content received, as sent (dot-stuffed)
        self.bare_newline = False
        self.line_too_long = False
        self.done = False

    @property
    def failed(self) -> bool:
        return self.line_too_long or (self.bare_newline and not self._normalize)

    def feed(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Scan the next chunk.

        Returns (forward, rest): the bytes to send downstream now, and, once the end of data is
        found (self.done), the bytes that followed it (pipelined commands). The final ".CRLF"
        is never part of forward: the caller sends it when the end-of-data verdict allows.
        """
        buf = self._held + chunk if self._held else chunk
        self._held = b""
        rest = b""
        # A chunk that begins right after a bare newline begins a line only for a lenient
        # reader; in normalize mode that line becomes a real one downstream.
        after_bare = self._any_bol and not self._strict_bol
        if self._strict_bol and buf.startswith(b".\r\n"):
            content, rest, self.done = b"", buf[3:], True
        else:
            end = buf.find(b"\r\n.\r\n")
            if end >= 0:
                content, rest, self.done = buf[: end + 2], buf[end + 5 :], True
            else:
                content = self._hold_back(buf)
        forward = self._check(content, after_bare)
        if self.done:
            self._held = b""
        return forward, rest

    def _hold_back(self, buf: bytes) -> bytes:
        """Keep the tail that could still become part of CRLF or of a "." line; return the rest."""
        n = len(buf)
        hold = 0
        if buf.endswith(b".\r") and self._is_bol(buf, n - 2):
            hold = 2
        elif buf.endswith(b"\r") or (buf.endswith(b".") and self._is_bol(buf, n - 1)):
            hold = 1
        start = n - hold
        strict, anyb = self._bol_at(buf, start)
        self._strict_bol, self._any_bol = strict, anyb
        if hold:
            self._held = buf[start:]
            return buf[:start]
        return buf

    def _is_bol(self, buf: bytes, pos: int) -> bool:
        return self._any_bol if pos == 0 else buf[pos - 1 : pos] in _LINE_BREAKS

    def _bol_at(self, buf: bytes, pos: int) -> tuple[bool, bool]:
        if pos == 0:
            return self._strict_bol, self._any_bol
        strict = buf[pos - 2 : pos] == b"\r\n" if pos >= 2 else False
        return strict, buf[pos - 1 : pos] in _LINE_BREAKS

    def _check(self, content: bytes, after_bare: bool) -> bytes:
        self.size += len(content)
        if not content:
            return b""
        if self.failed:
            # a bare newline still counts after an overlong line: it decides the reply (a
            # smuggling attempt is named as one) whichever chunk the long line came in
            if not (self.bare_newline or self._normalize):
                crlf = content.count(b"\r\n")
                self.bare_newline = crlf != content.count(b"\n") or crlf != content.count(b"\r")
            return b""
        # A bare CR or LF is one left once every CRLF is taken out. The lines come with that
        # for free, and the line-length check needs them: one split and two memchr scans of
        # the rest, where three counts of the chunk took three times as long.
        lines = content.split(b"\r\n")
        rest = b"".join(lines) if len(lines) > 1 else content
        if b"\n" in rest or b"\r" in rest:
            self.bare_newline = True
            if not self._normalize:
                return b""
            content = _normalized(content, after_bare or self._line_len == 0)
            lines = content.split(b"\r\n")
        elif after_bare and self._normalize and content.startswith(b"."):
            content = _normalized(content, True)
            lines = content.split(b"\r\n")
        self._check_lines(content, lines)
        return b"" if self.line_too_long else content

    def _check_lines(self, content: bytes, lines: list[bytes]) -> None:
        """Track line lengths across chunks; content here has CRLF line ends only, lines is
        content.split(CRLF).

        A line's leading dot is not counted: it is the dot doubled for transparency
        (RFC 5321 4.5.3.1.6), or a lone "." that the limit cannot be about.
        """
        n = len(content)
        last = content.rfind(b"\n")
        if self._line_len == 0:
            self._line_dot = content.startswith(b".")
        if self._line_len + n <= self._max_line:
            # no line here can be over the limit: just carry the unfinished one
            if last < 0:
                self._line_len += n
            else:
                self._line_len = n - last - 1
                self._line_dot = content[last + 1 : last + 2] == b"."
            return
        if last < 0:
            self._line_len += n
        else:
            first = self._line_len + len(lines[0]) - self._line_dot
            limit = self._max_line
            # max(map(len)) runs in C over every line; the Python loop only over a chunk
            # that has a long one (a MiB holds some 14,000 lines)
            middle = lines[1:-1]
            if first > limit or (max(map(len, middle), default=0) > limit and any(
                len(line) - line.startswith(b".") > limit for line in middle
            )):
                self.line_too_long = True
            self._line_len = len(lines[-1])
            self._line_dot = lines[-1].startswith(b".")
        if self._line_len - self._line_dot > self._max_line:
            self.line_too_long = True


def _normalized(content: bytes, bol: bool) -> bytes:
    """Rewrite bare CR and LF as CRLF, and stuff any lone "." line that results (slow path).

    A client that ends lines with bare LF does not dot-stuff "lines" that start after one, so
    such a line holding just "." would become an end of data once its LF is made a CRLF.
    """
    out = bytearray()
    pos = 0
    for m in _NEWLINE.finditer(content):
        line = content[pos : m.start()]
        out += b".." if bol and line == b"." else line
        out += b"\r\n"
        pos, bol = m.end(), True
    out += content[pos:]
    return bytes(out)


class Unstuffer:
    """Wire form to message bytes: drop the dot a line starts with (RFC 5321 4.5.2).

    Observers (header parsing, DKIM body hashes, scanners) need the message as it was written,
    not as it travels. Fed what DotReader forwards: CRLF lines only, never a chunk that ends
    in a lone CR, so a line start is either the chunk's start after a CRLF or "\r\n" inside it.
    """

    __slots__ = ("bol",)

    def __init__(self, bol: bool = True) -> None:
        self.bol = bol

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        out = chunk[1:] if self.bol and chunk[:1] == b"." else chunk
        # no dot at all is the common case for big bodies (base64 has none): memchr over the
        # chunk settles it; otherwise sre finds each "\n" with memchr, faster than "in"
        if b"." in out and _DOT_LINE.search(out):
            out = out.replace(b"\r\n.", b"\r\n")
        self.bol = chunk.endswith(b"\n")
        return out


def stuff(data: bytes, bol: bool = True) -> bytes:
    """Message bytes (CRLF lines) to wire form: a line starting with "." gets another."""
    if bol and data[:1] == b".":
        data = b"." + data
    return data.replace(b"\n.", b"\n..") if b"\n." in data else data
