"""Strict parsing of the MAIL FROM / RCPT TO path argument (RFC 5321 4.1.2, 4.1.3, 4.5.3.1).

The relay decision is taken on the parsed address, so the parser follows the grammar instead of
guessing: a loose pattern lets a client write an argument that we read as one address and the
downstream (or a policy check) reads as another, e.g. a quoted local part holding "@" or ">".

Non-ASCII text is only legal under SMTPUTF8 (RFC 6531 3.3), where it extends atext, qtextSMTP
and sub-domain (as U-labels). Every limit counts UTF-8 octets, not characters. All PathError
texts are short, ASCII and never echo the client's argument, so they can go into a reply as-is.
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass

import idna

__all__ = ["Path", "PathError", "ascii_domain", "parse_path"]

_LOCAL_MAX = 64  # RFC 5321 4.5.3.1.1
_DOMAIN_MAX = 255  # RFC 5321 4.5.3.1.2
_PATH_MAX = 256  # RFC 5321 4.5.3.1.3, "including the punctuation and element separators"
_LABEL_MAX = 63  # RFC 1035 2.3.4: RFC 5321 2.3.5 domain names are DNS names

# RFC 5322 3.2.3, referenced by RFC 5321 4.1.2
_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset(string.ascii_letters + string.digits + "-")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)

_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_HEX = re.compile(r"[0-9A-Fa-f]{1,4}")
_LDH_STR = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]")

# General categories that RFC 5892 2.1 (LetterDigits) lets a U-label code point have; the
# upper- and title-case letters it also lists are then removed again as Unstable (2.6).


class PathError(ValueError):
    """Why an argument is not a valid path.

    str(exc) is a short human reason for the SMTP reply text.
    """


@dataclass(frozen=True, slots=True)
class Path:
    """A parsed reverse- or forward-path; any source route has already been dropped."""

    local: str  # as written, a quoted form kept verbatim (e.g. '"john doe"')
    domain: str  # as written; "" for <> and <postmaster>; a literal keeps its brackets

    @property
    def address(self) -> str:
        """local@domain; "" for the null path; "postmaster" for <postmaster>."""
        if not self.domain:
            # Only <> and <postmaster> have no domain, and the latter is case-insensitive
            # (RFC 5321 4.5.1), so one spelling is handed on whatever the client wrote.
            return self.local.lower()
        return f"{self.local}@{self.domain}"

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def domain_ascii(self) -> str:
        """The domain to compare and resolve: lower-case A-labels, no trailing dot.

        An address literal comes back as written, lower-cased; "" when there is no domain.
        """
        return ascii_domain(self.domain) if self.domain else ""


def parse_path(arg: str, keyword: str, *, smtputf8: bool = False) -> tuple[Path, str]:
    """Parse 'FROM:<path> params' (keyword "FROM") or 'TO:<path> params' (keyword "TO").

    Returns (path, rest) where rest is the parameter text after the path (leading spaces
    stripped). Raises PathError for anything not in the grammar.

    smtputf8 says whether UTF-8 is allowed (RFC 6531 3.3): for RCPT, whether the transaction's
    MAIL carried SMTPUTF8; for MAIL, whether its own parameters do. Without it any non-ASCII
    character, in the path or in rest, is an error.
    """
    kw = keyword.upper()
    if kw not in ("FROM", "TO"):
        raise ValueError(f"keyword must be FROM or TO, not {keyword!r}")
    simple = _SIMPLE.match(arg)
    if simple is not None and simple.group(1).upper() == kw:
        # The common case, in one regex: <dot-atom@ldh.domain> in ASCII, within the limits.
        # It accepts only what the grammar below accepts, with the same result.
        local, domain = simple.group(2), simple.group(3)
        if len(local) <= _LOCAL_MAX and len(local) + len(domain) + 3 <= _PATH_MAX:
            return Path(local, domain), (simple.group(4) or "").lstrip(" ")
    return _parse_grammar(arg, kw, smtputf8)


def _parse_grammar(arg: str, kw: str, smtputf8: bool) -> tuple[Path, str]:
    """parse_path by the whole grammar, rule by rule."""
    _check_characters(arg, smtputf8)
    prefix = kw + ":"
    head = arg[: len(prefix)]
    # isascii() first: str.upper() maps a few non-ASCII letters onto ASCII ones.
    if not (head.isascii() and head.upper() == prefix):
        raise PathError(f"expected {prefix}<address>")
    pos = len(prefix)
    # RFC 5321 4.1.2 has no space after the colon, but clients send one and Postfix accepts
    # any number; nothing else (no tab, no space before the colon) is tolerated.
    while arg.startswith(" ", pos):
        pos += 1
    if arg.startswith("<", pos):
        path, end = _bracketed(arg, pos, kw, smtputf8)
        octets = _octets(arg[pos:end])
    else:
        # Not in RFC 5321, but many clients send MAIL FROM:user@example.com and Postfix takes
        # it. It is read as if it had been written in angle brackets, and only when that cannot
        # be ambiguous: the path runs to the first space and may hold no "<" or ">".
        end = arg.find(" ", pos)
        if end < 0:
            end = len(arg)
        token = arg[pos:end]
        if not token:
            raise PathError("missing address")
        if "<" in token or ">" in token:
            raise PathError("unbalanced angle brackets")
        scanner = _Scanner(token, 0, smtputf8)
        path = _path_body(scanner, kw, "")
        if scanner.pos != len(token):
            raise PathError(f"unexpected {scanner.describe()} in address")
        octets = _octets(token) + 2  # the limit counts the brackets the client left out
    if octets > _PATH_MAX:
        raise PathError(f"path longer than {_PATH_MAX} octets")
    rest = arg[end:]
    if rest and not rest.startswith(" "):
        raise PathError("expected a space after the address")
    return path, rest.lstrip(" ")


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LDH_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE = re.compile(
    rf"([Ff][Rr][Oo][Mm]|[Tt][Oo]): *<({_ATOM}(?:\.{_ATOM})*)@({_LDH_LABEL}(?:\.{_LDH_LABEL})*)>"
    r"(?: ([ -~]*))?\Z"
)


class _Scanner:
    """A cursor over the text; each grammar rule below advances it or raises PathError."""

    __slots__ = ("pos", "text", "utf8")

    def __init__(self, text: str, pos: int, utf8: bool) -> None:
        self.text = text
        self.pos = pos
        self.utf8 = utf8

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def describe(self) -> str:
        """The current character for an error text, ASCII-only and never the client's words."""
        char = self.peek()
        if not char:
            return "end of address"
        if char.isascii() and char.isprintable():
            return f"'{char}'"
        return f"character U+{ord(char):04X}"


def _check_characters(arg: str, utf8: bool) -> None:
    for char in arg:
        code = ord(char)
        # C0, DEL and C1 controls: the session filters these already, but a stray one must
        # never reach a downstream command line or a log.
        if code < 0x20 or 0x7F <= code <= 0x9F:
            raise PathError("control character in argument")
        if code > 0x7F:
            # The session decodes with surrogateescape, so bytes that were not UTF-8 show
            # up as lone surrogates; they are not UTF8-non-ascii (RFC 6532 3.1).
            if 0xD800 <= code <= 0xDFFF:
                raise PathError("argument is not valid UTF-8")
            if not utf8:
                raise PathError("non-ASCII address requires SMTPUTF8")


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _bracketed(arg: str, pos: int, kw: str, utf8: bool) -> tuple[Path, int]:
    """The path starting at the "<" at pos, and the index just past its ">"."""
    scanner = _Scanner(arg, pos + 1, utf8)
    if scanner.take(">"):
        if kw != "FROM":
            # Forward-path = Path (RFC 5321 4.1.2); only a Reverse-path may be "<>".
            raise PathError("null path <> is only valid in MAIL FROM")
        return Path("", ""), scanner.pos
    path = _path_body(scanner, kw, ">")
    if not scanner.take(">"):
        if not scanner.peek():
            raise PathError("missing '>' after the address")
        raise PathError(f"unexpected {scanner.describe()} in address")
    return path, scanner.pos


def _path_body(scanner: _Scanner, kw: str, close: str) -> Path:
    """What stands between the brackets: [A-d-l ":"] Mailbox, or the bare word Postmaster."""
    text, pos = scanner.text, scanner.pos
    word = text[pos : pos + 10]
    if word.isascii() and word.lower() == "postmaster" and text[pos + 10 : pos + 11] == close:
        # RFC 5321 4.1.1.3 / 4.5.1: "<Postmaster>" without a domain, for RCPT only.
        if kw != "TO":
            raise PathError("<postmaster> without a domain is only valid in RCPT TO")
        scanner.pos += 10
        return Path(word, "")
    if scanner.peek() == "@":
        _source_route(scanner)
    local = _local_part(scanner)
    if not scanner.take("@"):
        raise PathError(f"expected '@' after the local part, found {scanner.describe()}")
    return Path(local, _domain(scanner, literal_ok=True))


def _source_route(scanner: _Scanner) -> None:
    # RFC 5321 4.1.2 and C.2: a source route MUST be accepted and SHOULD be ignored. It is
    # still checked against the grammar, so that it cannot carry text a downstream acts on.
    while True:
        if not scanner.take("@"):
            raise PathError(f"bad source route: unexpected {scanner.describe()}")
        _domain(scanner, literal_ok=False)
        if scanner.take(","):
            continue
        if scanner.take(":"):
            return
        raise PathError(f"bad source route: unexpected {scanner.describe()}")


def _is_atext(char: str, utf8: bool) -> bool:
    return char in _ATEXT or (utf8 and char > "\x7f")  # RFC 6531 3.3: atext =/ UTF8-non-ascii


def _is_qtext(char: str, utf8: bool) -> bool:
    # RFC 5321 4.1.2 qtextSMTP = %d32-33 / %d35-91 / %d93-126; RFC 6531 3.3 adds UTF-8.
    if len(char) != 1:
        return False
    return char in " !" or "#" <= char <= "[" or "]" <= char <= "~" or (utf8 and char > "\x7f")


def _local_part(scanner: _Scanner) -> str:
    """Local-part = Dot-string / Quoted-string (RFC 5321 4.1.2), returned as written."""
    start = scanner.pos
    if scanner.take('"'):
        while not scanner.take('"'):
            char = scanner.peek()
            if char == "\\":
                # quoted-pairSMTP = %d92 %d32-126; RFC 6531 does not extend it to UTF-8.
                escaped = scanner.text[scanner.pos + 1 : scanner.pos + 2]
                if not escaped or not " " <= escaped <= "~":
                    raise PathError("bad quoted pair in local part")
                scanner.pos += 2
            elif not char:
                raise PathError("unterminated quoted string in local part")
            elif _is_qtext(char, scanner.utf8):
                scanner.pos += 1
            else:
                raise PathError(f"unexpected {scanner.describe()} in quoted local part")
    else:
        while True:
            atom_start = scanner.pos
            while _is_atext(scanner.peek(), scanner.utf8):
                scanner.pos += 1
            if scanner.pos == atom_start:
                if scanner.peek() == "." or scanner.pos > start:
                    raise PathError("misplaced dot in local part")
                raise PathError(f"unexpected {scanner.describe()} in local part")
            if not scanner.take("."):
                break
    local = scanner.text[start : scanner.pos]
    if _octets(local) > _LOCAL_MAX:
        raise PathError(f"local part longer than {_LOCAL_MAX} octets")
    return local


def _domain(scanner: _Scanner, *, literal_ok: bool) -> str:
    """Domain / address-literal (RFC 5321 4.1.2), returned as written."""
    start = scanner.pos
    if scanner.peek() == "[":
        if not literal_ok:
            # At-domain = "@" Domain: a source route names hosts, never literals.
            raise PathError("address literal in source route")
        close = scanner.text.find("]", start)
        if close < 0:
            raise PathError("unterminated address literal")
        _check_literal(scanner.text[start + 1 : close])
        scanner.pos = close + 1
        return scanner.text[start : scanner.pos]
    while True:
        label_start = scanner.pos
        while (char := scanner.peek()) and (char in _LDH or (scanner.utf8 and char > "\x7f")):
            scanner.pos += 1
        label = scanner.text[label_start : scanner.pos]
        if not label:
            if scanner.pos > start:
                raise PathError("empty label in domain")
            if scanner.peek() in ("", ">"):
                raise PathError("missing domain")
            raise PathError(f"unexpected {scanner.describe()} in domain")
        # sub-domain = Let-dig [Ldh-str]; RFC 5891 4.2.3.1 says the same for U-labels.
        if label.startswith("-") or label.endswith("-"):
            raise PathError("domain label starts or ends with a hyphen")
        # For a U-label this is a second, stricter test than the A-label's 63 octets: IDNA
        # expects both forms to fit the same 63-octet slot (RFC 5890 4.2).
        if _octets(label) > _LABEL_MAX:
            raise PathError(f"domain label longer than {_LABEL_MAX} octets")
        if not scanner.take("."):
            break
    domain = scanner.text[start : scanner.pos]
    if _octets(domain) > _DOMAIN_MAX:
        raise PathError(f"domain longer than {_DOMAIN_MAX} octets")
    ascii_domain(domain)  # a U-label that has no valid A-label is a syntax error
    return domain


def _check_literal(content: str) -> None:
    """address-literal (RFC 5321 4.1.3), given without its brackets."""
    tag, colon, value = content.partition(":")
    if not colon:
        if not _is_ipv4(content):
            raise PathError("invalid IPv4 address literal")
    elif tag.isascii() and tag.lower() == "ipv6":  # ABNF literals are case-insensitive
        if not _is_ipv6(value):
            raise PathError("invalid IPv6 address literal")
    elif _is_ipv6(content):
        raise PathError("IPv6 address literal without the IPv6: tag")
    elif _LDH_STR.fullmatch(tag) and value and all(_is_dcontent(c) for c in value):
        # General-address-literal: well-formed, but no tag other than IPv6 is registered and
        # we could not route one, so taking it would only defer the failure.
        raise PathError("general address literals are not supported")
    else:
        raise PathError("invalid address literal")


def _is_dcontent(char: str) -> bool:
    return "!" <= char <= "Z" or "^" <= char <= "~"  # %d33-90 / %d94-126


def _is_ipv4(text: str) -> bool:
    if not _IPV4.fullmatch(text):
        return False
    # Snum = 1*3DIGIT (RFC 5321 4.1.3), but ipaddress also refuses leading zeros: some
    # resolvers read "010" as octal, and the relay decision must not depend on which one.
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    groups_text = text
    if "." in text:
        # IPv6v4-full / IPv6v4-comp: the dotted quad stands in for the last two groups.
        head, colon, quad = text.rpartition(":")
        if not colon or not _is_ipv4(quad):
            return False
        groups_text = head + ":0:0"
    if groups_text.count("::") > 1:
        return False
    if "::" in groups_text:
        left, right = groups_text.split("::")
        groups = (left.split(":") if left else []) + (right.split(":") if right else [])
        # RFC 5321 4.1.3 IPv6-comp: "::" stands for at least two zero groups, so at most six
        # others; ipaddress (following RFC 4291) would also take seven.
        if len(groups) > 6:
            return False
    else:
        groups = groups_text.split(":")
        if len(groups) != 8:
            return False
    if not all(_IPV6_HEX.fullmatch(group) for group in groups):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def ascii_domain(domain: str) -> str:
    """A domain as it is compared and looked up: lower-case A-labels, no trailing dot."""
    if domain.startswith("["):
        return domain.lower()
    if domain.isascii() and len(domain) <= _DOMAIN_MAX:
        return domain.lower().removesuffix(".")
    labels = domain.removesuffix(".").split(".")
    ascii_form = ".".join(
        label.translate(_ASCII_LOWER) if label.isascii() else _a_label(label) for label in labels
    )
    # A-labels can be longer than their U-labels; the DNS limit applies to what is looked up.
    if len(ascii_form) > _DOMAIN_MAX:
        raise PathError(f"domain longer than {_DOMAIN_MAX} octets in A-label form")
    return ascii_form


def _a_label(label: str) -> str:
    """The A-label of a U-label (RFC 5890 2.3.2.1), or PathError if it is not a valid one.

    IDNA 2008 by the `idna` package, without UTS 46 mapping: a label that mapping would rewrite
    (upper case, full-width forms) is refused, because the relay decision must be taken on the
    domain the client actually named, not on a neighbour of it.
    """
    # ASCII case does not matter in the DNS (RFC 4343), so "Bücher" is taken; a non-ASCII
    # capital is DISALLOWED in IDNA 2008 (RFC 5892 2.6) and idna refuses it.
    try:
        return idna.alabel(label.translate(_ASCII_LOWER)).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        # the reason, never the client's own characters, goes into the reply text
        raise PathError("invalid IDNA label (IDNA 2008, RFC 5891)") from exc
