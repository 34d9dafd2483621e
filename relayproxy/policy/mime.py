"""What a message body holds, learned as it streams by: its MIME parts and their decoded text.

Rules read `body` (a regex over the decoded text of the text parts) and `attachment_name` /
`attachment_type` (regexes over part file names and content types). The proxy forwards the
message as it arrives, so MimeScanner gets the body in chunks split anywhere (message bytes,
dot-stuffing removed) and keeps only what the next chunk may still need:

- Multipart bodies (RFC 2046 5.1) are searched for delimiter lines ("--" boundary, "--" for
  the close delimiter, transport padding, CRLF or a bare LF; at most a line long) with one
  compiled regex of the boundaries in force, so a part costs little more than that search
  unless its text is wanted, and lines that merely start with "--" cost no Python code. Only
  a line that could still become a delimiter is held back. The delimiters of every enclosing
  multipart count, the innermost first, as in Python's email parser: an inner multipart left
  unclosed ends there. Preamble and epilogue are ignored. A multipart without a boundary
  parameter (RFC 2046 5.1.1 requires one) reads as text/plain, as RFC 2045 5.2 advises for an
  unusable Content-Type: that is what a client can show of it.
- Part header sections are read whole (a line that is no field ends one, as in Postfix and
  Python) up to MAX_HEADER_SECTION; a larger one makes its part opaque.
- message/rfc822 (and message/global, RFC 6532 3.7) parts are recorded, then their header
  section and body are read as a message of their own. One in base64 or quoted-printable
  (RFC 2046 5.2.1 allows neither) stays an opaque leaf.
- A part's file name is the Content-Disposition filename (RFC 2183 2.3), else the
  Content-Type name, RFC 2231 and RFC 2047 forms decoded.
- Only text/plain and text/html parts (html as is, attachments included, as SpamAssassin reads
  them) are transfer-decoded and charset-decoded, until `text_budget` octets of transfer-decoded
  text have been taken: the budget counts octets before charset decoding, so the codecs never
  see more than it, and `text` may hold fewer characters. A part cut at the budget loses its
  incomplete last character. Part texts are joined with "\\n" (not counted).
- The preamble of a multipart whose first delimiter never comes is kept as text: a client that
  finds no delimiter shows the body as text (Python's parser makes it the payload), and a
  spammer must not hide text behind a boundary parameter that is never used. Once the first
  delimiter shows, that text is dropped and its octets go back to the budget.

Nothing an attacker writes makes feed or close raise, nor keeps memory beyond the buffers
bounded here: the held-back line (_MAX_LINE), one part header section, a quoted-printable
line (_MAX_QP_LINE), the text budget, MAX_DEPTH nested multiparts, and MAX_PARTS MIME
entities, beyond which the body is not read (so the work per message is bounded as well).
Feeding a body in any split gives the same result as feeding it whole.
"""

from __future__ import annotations

import binascii
import codecs
import encodings
import encodings.aliases
import pkgutil
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header
from typing import Protocol

MAX_PARTS = 1000  # MIME entities read; `parts_truncated` tells when more came
MAX_HEADER_SECTION = 64 * 1024  # octets of one part's header section
MAX_DEPTH = 32  # nested multiparts; a deeper one is an opaque leaf

_MAX_LINE = 998  # RFC 5322 2.1.1: a delimiter line (RFC 2046 5.1.1) is a line
_MAX_QP_LINE = 8192  # RFC 2045 6.7 (5) says 76; a longer line is decoded in pieces
_MAX_STRAY_PADS = 1024  # base64 "=" that end nothing: beyond, the part is garbage
_MAX_NAME = 255  # characters kept of a file name (head and tail)
_MAX_ENCODED_NAME = 2048  # longer names are not searched for RFC 2047 words

_TEXT_TYPES = frozenset({"text/plain", "text/html"})
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})

# RFC 5322 2.2: a field line starts with a name (printable ASCII but ":") and ":", a
# continuation line with WSP. A name of more than a line's length, or one starting with "--"
# (a delimiter line, RFC 2046 5.1.1), makes a line that ends the section instead.
_FIELD_START = rb"(?:(?!--)[!-9;-~]{1,998}:|[ \t])"
_HEADER_LINES = re.compile(rb"(?:%s[^\n]*\n)*" % _FIELD_START)
_HEADER_START = re.compile(_FIELD_START)
_UNDECIDED = re.compile(rb"\r|(?!--)[!-9;-~]{0,998}")  # a line start that may become either
_REST_OF_LINE = rb"[^\n]*(?:\n|\Z)"
_CONTINUATIONS = re.compile(rb"(?:[ \t]%s)*" % _REST_OF_LINE)
_FIELD = re.compile(
    rb"^(content-(?:type|transfer-encoding|disposition)):(%s(?:[ \t]%s)*)"
    % (_REST_OF_LINE, _REST_OF_LINE),
    re.IGNORECASE | re.MULTILINE,
)
_LINE_BREAK = re.compile(rb"\r?\n")

# RFC 2045 5.1 type/subtype tokens; RFC 822 comments are dropped from the type.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")
_COMMENT = re.compile(r"\([^()]*\)")
# RFC 2045 5.1 parameters, leniently: a quoted string may be unterminated, a token may hold
# spaces (as some mailers write file names).
_PARAM = re.compile(r';\s*([^\s;=]+)\s*=\s*(?:"((?:\\.|[^"\\])*)"?|([^;]*))', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_SECTION = re.compile(r"([^*]+)(?:\*([0-9]{1,3}))?(\*)?")  # RFC 2231 3, 4: name*N*

_BASE64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(_BASE64_CHARS)))
_PADS = re.compile(rb"=+")
_BARE_CR = re.compile(rb"\r(?!\n)")

# Charsets are looked up only by names Python ships: codecs.lookup remembers every name it is
# asked (encodings._cache), and attackers choose these.
_KNOWN_CHARSETS = frozenset(
    {*encodings.aliases.aliases, *encodings.aliases.aliases.values()}
    | {module.name for module in pkgutil.iter_modules(encodings.__path__)}
)
# A text codec unfit for mail: punycode decodes in quadratic time.
_UNFIT_CODECS = frozenset({"punycode"})


@dataclass(frozen=True, slots=True)
class Part:
    """A leaf MIME entity (RFC 2045 2.4) as its header fields describe it."""

    content_type: str  # lower-case "type/subtype"
    filename: str  # decoded; "" if none
    disposition: str  # "inline", "attachment" or ""
    # every name the part gives itself (filename, filename*, name, name*): a sender can put a
    # harmless one where one client looks and ".exe" where another does; rules check them all
    names: tuple[str, ...] = field(default=(), compare=False)


# the Part of an entity without Content-Type and Content-Disposition, by its default type
# (a handful: text/plain, message/rfc822 in a digest, application/octet-stream when opaque)
_PLAIN = Part("text/plain", "", "")  # the usual one, as a part without fields reads
_UNNAMED: dict[str, Part] = {"text/plain": _PLAIN}


class MimeScanner:
    """Learns the parts and the text of one message body, fed in chunks.

    content_type and transfer_encoding are the message's own Content-Type and
    Content-Transfer-Encoding values (None when absent); text_budget caps `text` (see module).
    """

    __slots__ = ("_bol", "_buf", "_closed", "_default", "_entities", "_fields", "_frames",
                 "_hsize", "_in_headers", "_joined", "_on_text", "_open", "_partial", "_parts",
                 "_parts_truncated", "_room", "_text", "_texts")

    def __init__(self, content_type: str | None, transfer_encoding: str | None,
                 text_budget: int, on_text: Callable[[str], None] | None = None) -> None:
        # on_text: given the decoded text as it comes, a "\n" between parts as in `text` (a
        # part found later to be no text, a preamble, was given all the same)
        self._on_text = on_text
        self._buf = bytearray()
        self._frames: list[_Frame] = []  # enclosing multiparts, outermost first
        self._parts: list[Part] = []
        self._parts_truncated = False
        self._entities = 0
        self._texts: list[list[str]] = []  # one list of pieces per text part
        self._room = max(0, text_budget)
        self._text: _Text | None = None  # the text part being decoded, while there is room
        self._bol = True  # the body octets next read begin a line
        self._in_headers = False
        self._fields: dict[str, list[bytes]] = {}
        self._open: str | None = None  # field whose continuation lines may still come
        self._hsize = 0
        self._partial = 0  # buffer octets known to hold no line end (header section)
        self._default = "text/plain"
        self._closed = False
        self._joined: str | None = None  # the text, once closed
        self._start(content_type, transfer_encoding, None, "text/plain")

    @property
    def text(self) -> str:
        if self._joined is not None:
            return self._joined
        texts = self._texts
        if len(texts) == 1 and len(texts[0]) == 1:
            return texts[0][0]  # one part, decoded in one piece: most small messages
        return "\n".join("".join(pieces) for pieces in texts)

    @property
    def parts(self) -> list[Part]:
        return list(self._parts)

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self._parts if p.filename or p.disposition == "attachment"]

    @property
    def settled(self) -> bool:
        """Nothing the body holds can change `parts` or `text`: one part, no multipart or
        message inside to look for, and no text wanted from it (an attachment rule on a plain
        message needs no body at all)."""
        return self._text is None and not (self._in_headers or self._frames or self._buf)

    @property
    def parts_truncated(self) -> bool:
        """The body held more than MAX_PARTS MIME entities (multiparts and messages count);
        the scanner stopped reading there, so neither `parts` nor `text` has what followed."""
        return self._parts_truncated

    def feed(self, chunk: bytes) -> None:
        if self._closed or not chunk:
            return
        if not (self._in_headers or self._frames or self._buf):
            self._emit(chunk, 0, len(chunk))  # a single part: no delimiter to look for
            return
        self._buf += chunk
        self._run(final=False)

    def close(self) -> None:
        """The body ended: what was held back is read as it stands, decoders are flushed."""
        if self._closed:
            return
        self._closed = True
        if self._in_headers or self._frames or self._buf:
            self._run(final=True)  # else nothing was held back: a single part, all emitted
        self._end_text()
        self._buf = bytearray()
        # one copy of the text from here on, not the pieces and their join both (a body of
        # rules.body_scan_bytes per message in flight)
        self._joined = self.text
        self._texts = []

    # ------------------------------------------------------------------ structure

    def _run(self, final: bool) -> None:
        buf, pos, more = self._buf, 0, True
        while more:
            pos, more = self._headers(buf, pos, final) if self._in_headers else \
                self._body(buf, pos, final)
        del buf[:pos]

    def _body(self, buf: bytearray, pos: int, final: bool) -> tuple[int, bool]:
        """Pass body octets on up to the next delimiter line; (new pos, delimiter found)."""
        n = len(buf)
        if not self._frames:
            self._emit(buf, pos, n)
            return n, False
        frame = self._frames[-1]
        while True:
            if self._bol:  # a delimiter may open the body: its CRLF was the header section's
                found = frame.at.match(buf, pos)
                if found is None:
                    if not final and _may_become_delimiter(buf, pos, n):
                        return pos, False
                    self._bol = False
                    continue
                start = end = pos
            else:
                found = frame.search.search(buf, pos)
                if found is None:
                    hold = n if final else _held_tail(buf, pos, n)
                    self._emit(buf, pos, hold)
                    return hold, False
                start = found.start() + 1
                # RFC 2046 5.1.1: the CRLF before "--boundary" belongs to the delimiter
                end = start - 2 if start - 1 > pos and buf[start - 2] == 0x0D else start - 1
            stop = found.end()
            complete = buf[stop - 1] == 0x0A
            if stop - start - complete > _MAX_LINE + 1:  # no delimiter line is that long
                self._emit(buf, pos, start)
                pos, self._bol = start, False
                continue
            if not (complete or final):  # the line may still turn out otherwise: hold it
                self._emit(buf, pos, end)
                return end, False
            self._emit(buf, pos, end)
            self._bol = True
            self._delimiter(found.group(1), found.group(2) is not None)
            return stop, True

    def _delimiter(self, boundary: bytes, close: bool) -> None:
        k = len(self._frames) - 1  # the innermost multipart of that boundary
        while self._frames[k].boundary != boundary:
            k -= 1
        frame = self._frames[k]
        if self._text is not frame.preamble:
            self._end_text()
        self._text = None
        if frame.preamble is not None:  # its first delimiter: the preamble was no text
            self._drop(frame.preamble)
            frame.preamble = None
        if close:  # the epilogue is ignored (RFC 2046 5.1.1), up to an outer delimiter
            del self._frames[k:]
        else:
            del self._frames[k + 1:]
            # RFC 2046 5.1.5: in a digest a part is a message unless it says otherwise
            self._enter_headers("message/rfc822" if frame.digest else "text/plain")

    def _enter_headers(self, default: str) -> None:
        self._in_headers = True
        self._fields, self._open, self._hsize, self._partial = {}, None, 0, 0
        self._default = default

    def _headers(self, buf: bytearray, pos: int, final: bool) -> tuple[int, bool]:
        """Read header lines; (new pos, section ended)."""
        n = len(buf)
        end = pos
        # still the same unfinished line (pos is where it starts): spare it a rescan
        if not (self._partial and buf.find(b"\n", pos + self._partial) < 0):
            lines = _HEADER_LINES.match(buf, pos)
            end = lines.end() if lines else pos
            room = MAX_HEADER_SECTION - self._hsize
            if end - pos > room:  # the line crossing the limit makes the part opaque
                cross = buf.rfind(b"\n", pos, pos + room) + 1 or pos
                self._collect(buf, pos, cross)
                self._finish_headers(opaque=True)
                return cross, True
            self._collect(buf, pos, end)
            self._hsize += end - pos
            eol = buf.find(b"\n", end)
            if eol >= 0:  # the empty line, or the first line of the body
                blank = eol == end or (eol == end + 1 and buf[end] == 0x0D)
                self._finish_headers()
                return (eol + 1 if blank else end), True
        self._partial = 0
        if _HEADER_START.match(buf, end):  # an unfinished field or continuation line
            if n - end > MAX_HEADER_SECTION - self._hsize:
                self._finish_headers(opaque=True)
                return end, True
            if not final:
                self._partial = n - end
                return end, False
            self._collect(buf, end, n)
            self._finish_headers()
            return n, True
        if not final and _UNDECIDED.fullmatch(buf, end, n):
            self._partial = n - end
            return end, False
        self._finish_headers()
        return end, True

    def _collect(self, buf: bytearray, start: int, stop: int) -> None:
        """Keep the fields MIME needs from the complete header lines in buf[start:stop]."""
        if start >= stop:
            return
        if self._open is not None:
            more = _CONTINUATIONS.match(buf, start, stop)
            if more:
                self._fields[self._open].append(bytes(buf[start:more.end()]))
                start = more.end()
        if start < stop:
            self._open = None
            for m in _FIELD.finditer(buf, start, stop):
                name = m.group(1).decode("ascii").lower()
                fresh = name not in self._fields  # the first one counts, as in Python
                if fresh:
                    self._fields[name] = [m.group(2)]
                self._open = name if fresh and m.end() == stop else None

    def _finish_headers(self, opaque: bool = False) -> None:
        def value(name: str) -> str | None:
            raw = self._fields.get(name)
            if raw is None:
                return None
            return _LINE_BREAK.sub(b"", b"".join(raw)).decode("utf-8", "surrogateescape").strip()

        fields = value("content-type"), value("content-transfer-encoding"), \
            value("content-disposition")
        self._fields = {}
        self._start(*fields, self._default, opaque)

    def _start(self, content_type: str | None, transfer_encoding: str | None,
               disposition: str | None, default: str, opaque: bool = False) -> None:
        """Begin a part's body, its header fields read."""
        self._entities += 1
        if self._entities > MAX_PARTS:  # stop here: the work per message stays bounded too
            self._parts_truncated = True
            self._in_headers, self._text = False, None
            self._frames.clear()
            return
        if content_type is None and disposition is None and not transfer_encoding \
                and default == "text/plain" and not opaque:
            # a part that names nothing (most plain messages): what the lines below make of
            # it, text/plain read as is (RFC 2045 5.2, 6.1), without their parsing
            self._in_headers, self._bol = False, True
            self._parts.append(_PLAIN)
            self._text = self._new_text(_IDENTITY, None)
            return
        # (absent fields need no parsing call)
        mtype, params = (default, {}) if content_type is None else \
            _content_type(content_type, default)
        disp, dparams = ("", {}) if disposition is None else _content_disposition(disposition)
        cte = transfer_encoding.strip().lower() if transfer_encoding else ""
        self._in_headers, self._bol = False, True
        if opaque:
            mtype = "application/octet-stream"
        elif mtype.startswith("multipart/"):
            # Python reads the boundary so (RFC 2046 5.1.1: it cannot end in a space)
            boundary = _raw(params.get("boundary", "").rstrip())
            if not boundary:  # no delimiter to find: the body reads as text (RFC 2045 5.2)
                mtype = "text/plain"
            elif len(boundary) > _MAX_LINE - 4 or len(self._frames) >= MAX_DEPTH:
                mtype = "application/octet-stream"
            else:
                frame = _Frame.open(boundary, mtype == "multipart/digest", self._frames)
                self._frames.append(frame)
                frame.preamble = self._text = self._new_text(_IDENTITY, None)
                return
        if content_type is None and disposition is None:
            # no field to name the part (a plain message body): one shared frozen Part
            part = _UNNAMED.get(mtype) or _UNNAMED.setdefault(mtype, Part(mtype, "", ""))
        else:
            name = dparams.get("filename") or params.get("name") or ""
            others = (*_plain_values(disposition, "filename"), params.get("name", ""),
                      *_plain_values(content_type, "name"))
            names = tuple(dict.fromkeys(
                n for n in (_display_name(v) for v in (name, *others)) if n))
            part = Part(mtype, _display_name(name), disp, names)
        self._parts.append(part)
        if mtype in _MESSAGE_TYPES and cte not in ("base64", "quoted-printable"):
            self._enter_headers("text/plain")
        elif mtype in _TEXT_TYPES:
            self._text = self._new_text(_transfer_decoder(cte), params.get("charset"))

    # ------------------------------------------------------------------ text

    def _new_text(self, transfer: _Transfer, charset: str | None) -> _Text | None:
        if self._room <= 0:
            return None
        if self._on_text is not None and self._texts:
            self._on_text("\n")
        text = _Text(transfer, charset, self._on_text)
        self._texts.append(text.pieces)
        return text

    def _emit(self, data: bytes | bytearray, start: int, stop: int) -> None:
        text = self._text
        if text is not None and stop > start and not self._take(
                text, text.transfer.feed(bytes(data[start:stop]))):
            self._text = None

    def _take(self, text: _Text, raw: bytes) -> bool:
        """Decode raw into text within the budget; False once the budget is spent."""
        if raw:
            raw = raw[:self._room]
            self._room -= len(raw)
            text.octets += len(raw)
            text.decode(raw)
        return self._room > 0

    def _end_text(self) -> None:
        text, self._text = self._text, None
        if text is not None and self._take(text, text.transfer.flush()):
            text.decode(b"", final=True)

    def _drop(self, text: _Text) -> None:
        for i in range(len(self._texts) - 1, -1, -1):
            if self._texts[i] is text.pieces:
                del self._texts[i]
                break
        self._room += text.octets


@dataclass(slots=True)
class _Frame:
    boundary: bytes
    digest: bool
    # a delimiter line of this multipart or an enclosing one (innermost first, as Python's
    # parser tries them), after a line end and at a line start; "\\Z" lets one be held back
    search: re.Pattern[bytes]
    at: re.Pattern[bytes]
    preamble: _Text | None = None  # until the first delimiter (see module)

    @classmethod
    def open(cls, boundary: bytes, digest: bool, enclosing: list[_Frame]) -> _Frame:
        boundaries = [boundary, *(frame.boundary for frame in reversed(enclosing))]
        line = rb"--(%s)(--)?[ \t]*\r?(?:\n|\Z)" % b"|".join(map(re.escape, boundaries))
        return cls(boundary, digest, re.compile(b"\n" + line), re.compile(line))


def _may_become_delimiter(buf: bytearray, start: int, n: int) -> bool:
    """buf[start:n] is an unfinished line that more octets may make a delimiter line."""
    return (n - start <= _MAX_LINE + 1 and buf.startswith(b"--"[:n - start], start)
            and buf.find(b"\n", start, n) < 0)


def _held_tail(buf: bytearray, pos: int, n: int) -> int:
    """Where the octets at the end of buf that may still begin a delimiter start."""
    last = buf.rfind(b"\n", max(pos, n - _MAX_LINE - 2), n)
    if last >= 0 and _may_become_delimiter(buf, last + 1, n):
        return last - 1 if last > pos and buf[last - 1] == 0x0D else last
    return n - 1 if n > pos and buf[n - 1] == 0x0D else n


# ---------------------------------------------------------------------- decoding


class _Transfer(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    """7bit, 8bit, binary, and unknown encodings: RFC 2045 6.4 would make a part in an unknown
    one opaque, but its octets are the best guess at what a client shows."""

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


_IDENTITY = _Identity()  # it holds nothing: one for every part


class _Base64:
    """RFC 2045 6.8, fed in pieces, as leniently as binascii (and Python's email) decode it.

    Octets outside the alphabet, line breaks included, are skipped; the data ends at the pad
    that completes a quantum, and a pad that completes none is skipped, up to _MAX_STRAY_PADS.
    An unpadded last quantum of 2 or 3 characters is decoded, a lone character dropped.
    """

    __slots__ = ("_done", "_pads", "_quantum", "_stray")

    def __init__(self) -> None:
        self._quantum = b""  # 0-3 characters waiting for the rest of their quantum
        self._pads = 0
        self._stray = 0
        self._done = False

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return b""
        data = data.translate(None, _NOT_BASE64)
        out: list[bytes] = []
        pos = 0
        for run in _PADS.finditer(data):
            self._decode(data[pos:run.start()], out)
            pos = run.end()
            if len(self._quantum) >= 2:
                self._pads += pos - run.start()
                if len(self._quantum) + self._pads >= 4:
                    out.append(self.flush())
                    return b"".join(out)
            self._stray += pos - run.start()
            if self._stray > _MAX_STRAY_PADS:
                self._done = True
                return b"".join(out)
        self._decode(data[pos:], out)
        return b"".join(out)

    def flush(self) -> bytes:
        quantum, self._quantum, done, self._done = self._quantum, b"", self._done, True
        return binascii.a2b_base64(quantum + b"==") if len(quantum) >= 2 and not done else b""

    def _decode(self, chars: bytes, out: list[bytes]) -> None:
        if chars:
            self._pads = 0
            chars = self._quantum + chars
            whole = len(chars) - len(chars) % 4
            out.append(binascii.a2b_base64(chars[:whole]))
            self._quantum = chars[whole:]


class _QuotedPrintable:
    """RFC 2045 6.7 through binascii.a2b_qp (as Python's email decodes it), fed whole lines
    so that no "=XY" or soft line break is split. A bare CR, which RFC 2045 6.7 (1) forbids,
    is dropped: a2b_qp would drop the rest of the line after "=\\r", whatever the split."""

    __slots__ = ("_line",)

    def __init__(self) -> None:
        self._line = b""

    def feed(self, data: bytes) -> bytes:
        data = self._line + data
        cut = data.rfind(b"\n") + 1
        out = [_qp(data[:cut])]
        # an overlong line goes in pieces ending where no "=" is within two octets
        while len(data) - cut > _MAX_QP_LINE:
            limit = stop = cut + _MAX_QP_LINE
            for _ in range(16):
                pad = data.rfind(b"=", stop - 2, stop)
                if pad < 0:
                    break
                stop = pad
            else:
                stop = limit  # "=" everywhere: garbage, cut anyway
            out.append(_qp(data[cut:stop]))
            cut = stop
        self._line = data[cut:]
        return b"".join(out)

    def flush(self) -> bytes:
        line, self._line = self._line, b""
        return _qp(line)


def _qp(data: bytes) -> bytes:
    return binascii.a2b_qp(_BARE_CR.sub(b"", data)) if data else b""


def _transfer_decoder(cte: str) -> _Transfer:
    if cte == "base64":
        return _Base64()
    if cte == "quoted-printable":
        return _QuotedPrintable()
    return _IDENTITY


class _Text:
    """One text part: its transfer decoder, charset decoder and decoded pieces."""

    __slots__ = ("codec", "decoder", "octets", "on_text", "pending", "pieces", "transfer")

    def __init__(self, transfer: _Transfer, charset: str | None,
                 on_text: Callable[[str], None] | None = None) -> None:
        self.on_text = on_text
        self.transfer = transfer
        self.codec = "utf-8" if charset is None else _codec(charset)  # None: no call
        # UTF-8, the usual codec, is decoded by the C function itself, its unfinished
        # sequence kept here: what codecs' Python-level incremental decoder does around it
        # cost as much as the decoding of a 4 KB part
        self.decoder: codecs.IncrementalDecoder | None = None if self.codec == "utf-8" else \
            codecs.getincrementaldecoder(self.codec)(errors="replace")
        self.pending = b""
        self.pieces: list[str] = []
        self.octets = 0  # taken from the budget

    def decode(self, data: bytes, final: bool = False) -> None:
        if self.decoder is None:  # UTF-8, which never raises with "replace"
            if self.pending:
                data = self.pending + data
            elif not data:
                return  # nothing held, nothing new (the final call, usually): no text
            text, used = codecs.utf_8_decode(data, "replace", final)
            self.pending = data[used:]
            self._append(text)
            return
        pending = self.decoder.getstate()[0]
        try:
            self._append(self.decoder.decode(data, final))
        except ValueError:
            # UTF-16 and UTF-32 raise, "replace" or not, on a missing byte order mark: read
            # those big-endian (RFC 2781 4.3), anything else that fails as UTF-8, from the
            # octets the failed decoder still held, so that the split points do not matter
            fallback = {"utf-16": "utf-16-be", "utf-32": "utf-32-be"}.get(self.codec, "utf-8")
            self.codec = fallback
            self.decoder = codecs.getincrementaldecoder(fallback)(errors="replace")
            self._append(self.decoder.decode(pending + data, final))

    def _append(self, piece: str) -> None:
        if piece:
            if self.on_text is not None:
                self.on_text(piece)
            self.pieces.append(piece)
            if len(self.pieces) >= 64:  # a body fed in tiny chunks: keep few objects
                self.pieces[-64:] = ["".join(self.pieces[-64:])]


def _codec(charset: str | None) -> str:
    """The codec for a charset parameter (RFC 2046 4.1.2).

    Absent, US-ASCII and unknown charsets decode as UTF-8 with replacement: it reads ASCII
    alike, and undeclared 8-bit text is UTF-8 far more often than anything else (RFC 6532).
    Codecs that are no text encodings (zlib, base64...) are never chosen by a message.
    """
    if charset is None:
        return "utf-8"  # most parts name no charset: no normalising, no lookup
    name = encodings.normalize_encoding(charset.strip().lower())
    if name not in _KNOWN_CHARSETS:
        return "utf-8"
    try:
        codec = codecs.lookup(name).name
        # LookupError for bytes-to-bytes codecs, UnicodeError for those refusing "replace"
        # (idna) or all input (undefined)
        b"a".decode(codec, "replace")
    except (LookupError, ValueError):
        return "utf-8"
    return "utf-8" if codec in _UNFIT_CODECS or codec == "ascii" else codec


# ---------------------------------------------------------------------- header values


def _content_type(value: str | None, default: str) -> tuple[str, dict[str, str]]:
    """(type/subtype, parameters); RFC 2045 5.2: the default when absent, text/plain when
    unreadable."""
    if value is None:
        return default, {}
    head, _, _ = value.partition(";")
    mtype = "".join(_COMMENT.sub("", head).split()).lower()
    if not _MEDIA_TYPE.fullmatch(mtype):
        mtype = "text/plain"
    return mtype, _params(value[len(head):])


def _content_disposition(value: str | None) -> tuple[str, dict[str, str]]:
    if value is None:
        return "", {}
    head, _, _ = value.partition(";")
    disp = "".join(_COMMENT.sub("", head).split()).lower()
    # RFC 2183 2.8: an unrecognised disposition type is treated as "attachment"
    if disp not in ("", "inline"):
        disp = "attachment"
    return disp, _params(value[len(head):])


def _params(text: str) -> dict[str, str]:
    """Parameters by lower-case name, the first of each; RFC 2231 forms decoded and preferred
    to a plain one of the same name (mailers send both, and clients show the RFC 2231 one)."""
    plain: dict[str, str] = {}
    sections: dict[str, dict[int, tuple[bool, str]]] = {}
    for m in _PARAM.finditer(text):
        key = m.group(1).lower()
        quoted, token = m.group(2), m.group(3)
        value = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else token.strip()
        section = _SECTION.fullmatch(key)
        if section and (section.group(2) or section.group(3)):
            number = int(section.group(2) or 0)
            sections.setdefault(section.group(1), {}).setdefault(
                number, (bool(section.group(3)), value))
        else:
            plain.setdefault(key, value)
    for name, parts in sections.items():
        plain[name] = _rfc2231(parts)
    return plain


def _plain_values(field: str | None, key: str) -> list[str]:
    """The plain (not RFC 2231) values of a parameter, which _params sets aside for the
    RFC 2231 form when both are given."""
    if not field or ";" not in field:
        return []
    out = []
    for m in _PARAM.finditer(field[field.index(";"):]):
        if m.group(1).lower() == key:
            quoted, token = m.group(2), m.group(3)
            out.append(_QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else token.strip())
    return out


def _rfc2231(sections: dict[int, tuple[bool, str]]) -> str:
    """Join continued sections (RFC 2231 3) and decode charset'language'%XX (RFC 2231 4)."""
    octets = bytearray()
    charset = ""
    for i, number in enumerate(sorted(sections)):
        encoded, value = sections[number]
        raw = _raw(value)
        if encoded:
            if i == 0 and raw.count(b"'") >= 2:
                name, _, raw = raw.partition(b"'")
                raw = raw.partition(b"'")[2]
                charset = name.decode("ascii", "replace")
            raw = urllib.parse.unquote_to_bytes(raw)
        octets += raw
    return octets.decode(_codec(charset), "replace")


def _display_name(name: str) -> str:
    """A file name as clients show it: RFC 2047 words decoded (RFC 2047 5 forbids them in a
    parameter, but mailers write them and clients decode them), whitespace stripped (as
    Python does), no undecodable octets, the middle of an overlong name left out."""
    if "=?" in name and len(name) <= _MAX_ENCODED_NAME:
        try:
            words = decode_header(name)
        except (HeaderParseError, ValueError):
            words = []
        if words and not isinstance(words[0][0], str):
            name = "".join(
                word.decode(_codec(charset.partition("*")[0]) if charset else
                            "raw-unicode-escape", "replace")
                for word, charset in words if isinstance(word, bytes))
    name = _clean(name).strip()
    if len(name) > _MAX_NAME:
        keep = (_MAX_NAME - 3) // 2
        name = f"{name[:keep]}...{name[-keep:]}"
    return name


def _raw(value: str) -> bytes:
    """A header value's octets back (headers are read as UTF-8 with surrogateescape)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def _clean(value: str) -> str:
    """value without lone surrogates (undecodable octets become U+FFFD)."""
    return _raw(value).decode("utf-8", "replace")
