"""The message's header section, held before any of it goes downstream, parsed once.

Checks read it (field values, unfolded), remove fields (a forged Authentication-Results naming
our host) and prepend fields (Received, results). Fields keep their exact bytes, so what is not
touched leaves as it came: DKIM signatures over it stay valid.

Fields are kept as message bytes (dot-stuffing removed, RFC 5321 4.5.2); `wire()` stuffs them
again for the downstream. The body after the section is never unstuffed for forwarding: it
leaves in wire form as it came. Once the section has gone downstream it is sealed: a check
that learns something later must not claim to have written it (prepend raises HeadersSent).
"""

from __future__ import annotations

import contextlib
import email.header
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .dotreader import Unstuffer, stuff

# RFC 5322 2.2: a field name is printable ASCII except ":", then ":". Whitespace before the
# colon (RFC 822's obsolete syntax, RFC 5322 4.5.3) is read as Postfix's cleanup reads it: the
# section must end where the mail server's does, or checks would miss fields it delivers.
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


class HeadersSent(Exception):
    """The header section already left for the downstream; it can no longer change."""


@dataclass(slots=True)
class HeaderField:
    name: str  # as written
    raw: bytes  # the whole field, continuation lines and final CRLF included
    _decoded: str | None = field(default=None, repr=False, compare=False)

    @property
    def lname(self) -> str:
        return self.name.lower()

    @property
    def value(self) -> str:
        """The unfolded value (RFC 5322 2.2.3), undecoded; 8-bit bytes as UTF-8 where valid."""
        text = self.raw.decode("utf-8", "surrogateescape")
        value = text.split(":", 1)[1] if ":" in text else ""
        # a line break that _FOLD removes has a character after it: one-line fields skip it
        return (_FOLD.sub("", value) if "\n" in value[:-1] else value).strip()

    @property
    def decoded(self) -> str:
        """The value with RFC 2047 encoded-words decoded (what a mail client shows); computed
        once, as every rule on this field reads it."""
        if self._decoded is None:
            value = self.value
            if "=?" in value:
                # HeaderParseError and friends: attackers write these; the value stays as written
                with contextlib.suppress(Exception):
                    value = str(email.header.make_header(email.header.decode_header(value)))
            self._decoded = value
        return self._decoded


# The lines of a header section in wire form: a field's first line or a continuation line, each
# past the transparency dot a line may start with (RFC 5321 4.5.2), so that the wire form splits
# where the message does. A continuation line belongs to the section even first: downstream it
# continues our Received field, and what follows is still header to the mail server.
_SECTION_LINES = re.compile(rb"(?:\.?(?:[!-9;-~]+[ \t]*:|[ \t])[^\n]*\n)*")


def find_end(data: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """Where the header section in data (wire form, CRLF lines) ends.

    Returns (end, body_start): the section is data[:end]; the body begins at body_start (after
    the empty line, or at the first line that is no field, as Postfix's cleanup reads it). None
    when no line from start on has ended the section yet. start must be a line start.
    """
    m = _SECTION_LINES.match(data, start)
    pos = m.end() if m else start
    eol = data.find(b"\n", pos)
    if eol < 0:
        return None
    if eol - pos <= 2 and data[pos:eol + 1] in (b"\r\n", b".\r\n"):
        return pos, eol + 1  # the empty line
    return pos, pos


def complete_lines(data: bytes | bytearray, start: int) -> int:
    """The start of the last unfinished line (where find_end may resume)."""
    last = data.rfind(b"\n", start)
    return start if last < 0 else last + 1


def _name(head: bytes) -> tuple[str, str]:
    """A field's name (as written, and in lower case) from what its first line has before
    the colon (the whole line when it has none)."""
    name = head.decode("ascii", "replace").rstrip(" \t")
    return name, name.lower()


# what a first line has before its colon -> _name of it: messages repeat the same few dozen
# names, and their decoding cost a third of the parse
_NAMES: dict[bytes, tuple[str, str]] = {}
_NAMES_MAX = 4096


class HeaderSection:
    """The held header section; fields in order, with the ones checks prepend first.

    Parsed on first use: when no check reads or removes a field, the section leaves exactly as
    it came, with the prepended fields on top, and costs no parsing.
    """

    __slots__ = ("_fields", "_index", "_original", "_prepended", "_wire", "sealed",
                 "separator")

    def __init__(self, fields: list[HeaderField] | None, separator: bytes,
                 wire: bytes = b"") -> None:
        self._fields = fields
        self._index: dict[str, list[HeaderField]] | None = None  # by lower-case name
        self._wire = wire
        self._original: bytes | None = None  # the fields' raw bytes joined, while unedited
        self._prepended: list[bytes] = []
        self.separator = separator  # the empty line that ended the section, or b""
        self.sealed = False

    @classmethod
    def parse(cls, wire: bytes, separator: bytes = b"") -> HeaderSection:
        """wire: the section as it came (dot-stuffed), CRLF-ended field lines."""
        return cls(None, separator, wire)

    @property
    def fields(self) -> list[HeaderField]:
        if self._fields is None:
            wire = self._wire
            if wire[:1] == b"." or b"\n." in wire:
                wire = Unstuffer()(wire)
            fields: list[HeaderField] = []
            index: dict[str, list[HeaderField]] = {}
            last: HeaderField | None = None
            names = _NAMES
            for line in wire.splitlines(keepends=True):  # no empty line: each has an octet
                if line[0] in (0x20, 0x09) and last is not None:  # a continuation line
                    last.raw += line
                    continue
                colon = line.find(b":")
                head = line if colon < 0 else line[:colon]
                known = names.get(head)
                if known is None:
                    known = _name(head)
                    if len(names) < _NAMES_MAX:  # the usual few dozen; a flood is not kept
                        names[head] = known
                name, lname = known
                last = HeaderField(name, line)
                fields.append(last)
                # the index comes with the parse: every reader of fields looks names up
                found = index.get(lname)
                if found is None:
                    index[lname] = [last]
                else:
                    found.append(last)
            self._fields, self._index, self._original = fields, index, wire
        return self._fields

    @property
    def original(self) -> bytes:
        """The fields as they came, message bytes (not the prepended ones; without those a
        check removed): what a DKIM signature covers."""
        fields = self.fields
        if self._original is None:
            self._original = b"".join([f.raw for f in fields])
        return self._original

    def __iter__(self) -> Iterator[HeaderField]:
        return iter(self.fields)

    def text(self) -> str:
        """The fields as they came (not the prepended ones) as one unfolded text: it holds
        every field value as written, and more (the names, a transparency dot). A prefilter
        can look through it once for all fields instead of once per field."""
        raw = self._wire or b"".join(f.raw for f in self._fields or ())
        text = raw.decode("utf-8", "surrogateescape")
        return _FOLD.sub("", text) if "\n " in text or "\n\t" in text else text

    def get_all(self, name: str) -> list[HeaderField]:
        return self.get_lower(name.lower())

    def get_lower(self, lname: str) -> list[HeaderField]:
        """get_all for a name already in lower case (rules look names up many times)."""
        index = self._index
        if index is None:
            fields = self.fields  # a parse indexes as it goes
            index = self._index
            if index is None:  # the fields were given or edited
                index = self._index = {}
                for f in fields:
                    index.setdefault(f.lname, []).append(f)
        return index.get(lname, [])

    def get(self, name: str) -> str | None:
        found = self.get_all(name)
        return found[0].value if found else None

    def remove(self, name: str, where: Callable[[HeaderField], bool] | None = None) -> int:
        """Remove the fields called name (for which where holds); returns how many."""
        self._check_open()
        lname = name.lower()
        fields = self.fields
        kept = [f for f in fields if f.lname != lname or (where is not None and not where(f))]
        removed = len(fields) - len(kept)
        if removed:
            self._fields = kept
            self._index = None
            self._wire = b""  # the section changed: wire() builds it from the fields
            self._original = None
        return removed

    def prepend(self, name: str, value: str) -> None:
        """Add "name: value" on top (trace and result fields go on top, RFC 5321 4.4)."""
        self.prepend_raw(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))

    def prepend_raw(self, field: bytes) -> None:
        """Add a whole field (folded lines ending in CRLF) on top."""
        self._check_open()
        if not field.endswith(b"\r\n") or not _FIELD_START.match(field):
            raise ValueError(f"not a header field: {field[:40]!r}")
        # later prepends go above earlier ones, as each hop's trace fields do
        self._prepended.insert(0, field)

    def replace_prepended(self, old: bytes, new: bytes) -> None:
        """Put new where the prepended field old is (a result field that learnt more)."""
        self._check_open()
        self._prepended[self._prepended.index(old)] = new

    @property
    def prepended(self) -> tuple[bytes, ...]:
        return tuple(self._prepended)

    def _check_open(self) -> None:
        if self.sealed:
            raise HeadersSent("the header section has already been sent downstream")

    def message_bytes(self) -> bytes:
        return b"".join(self._prepended) + b"".join(f.raw for f in self.fields) + self.separator

    def wire(self) -> bytes:
        """The section in wire form: a line that begins with "." is stuffed (RFC 5321 4.5.2)."""
        if self._wire or self._fields == []:
            # untouched: the section as it came, already in wire form
            return stuff(b"".join(self._prepended)) + self._wire + self.separator
        return stuff(self.message_bytes())
