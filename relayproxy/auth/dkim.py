"""DKIM (RFC 6376) verified while the body streams: memory per message is bounded.

dkimpy verifies a whole message in memory. Here its two halves are split apart:
  - the body hash: each signature's canonicalised body (simple or relaxed, cut at l=) is fed
    chunk by chunk into a hashlib object as the body arrives (BodyCanon keeps back only what
    a later chunk may still change: trailing empty lines, trailing white space, a lone CR);
  - the header signature: dkimpy's steps (DKIM.verify_headerprep, verify_sig_process) over
    the held header section, with the key fetched beforehand through the async resolver,
    written out here without what a streamed verification does not need: the body (hashed
    already), the canonicalisation of fields h= does not name, the per-message compiles of
    dkimpy's patterns, the DigestInfo built again for every signature.
The result equals dkimpy's dkim.verify on the same bytes (tests/test_auth_dkim.py proves it
over a corpus, and each replaced dkimpy function against the original); only the failures are
told apart (fail, permerror, temperror).
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import dkim as dkimpy
import dkim.crypto
import gmpy2
import nacl.exceptions
from dkim.canonicalization import (
    CanonicalizationPolicy,
    Relaxed,
)
from dkim.crypto import HASH_ALGORITHMS, DigestTooLargeError
from dkim.util import DuplicateTag, InvalidTagSpec, InvalidTagValueList

from ..headers import HeaderField, HeaderSection


def _int2str(n: int, length: int = -1) -> bytes:
    """dkim.crypto.int2str, by int.to_bytes: dkimpy's loop over 256 octets was a third of an
    RSA-2048 verification (equality: tests/test_auth_dkim.py)."""
    if length < 0:
        length = max(1, (n.bit_length() + 7) // 8)
    return n.to_bytes(length, "big")


def _str2int(s: bytes) -> int:
    return int.from_bytes(s, "big")


def _rsa_encrypt(message: bytes, pk: dict[str, int], mlen: int) -> bytes:
    """dkim.crypto.rsa_encrypt (the RSA public operation of a verification) with GMP's
    modular exponentiation: Python's pow took 0.35 ms for a 2048-bit key here, GMP 0.07."""
    m = int.from_bytes(message, "big")
    return int(gmpy2.powmod(m, pk["publicExponent"], pk["modulus"])).to_bytes(mlen, "big")


# the functions dkimpy's RSA code calls through its module: the same results, faster
ORIGINAL_INT2STR, ORIGINAL_STR2INT = dkim.crypto.int2str, dkim.crypto.str2int
ORIGINAL_RSA_ENCRYPT = dkim.crypto.rsa_encrypt
dkim.crypto.int2str = _int2str
dkim.crypto.str2int = _str2int
dkim.crypto.rsa_encrypt = _rsa_encrypt

# dkimpy's pattern for the b= value to blank out, FWS = (?:(?:\s*\r?\n)?\s+)? before each
# character, backtracks for 70 us over a 2048-bit signature. FWS matches exactly the runs of
# white space (\s covers CR and LF), so "(FWS char)*" is "(\s* char)*", whose longest match
# is the longest run of white space and characters ending in a character: the same matches,
# in 15 us (tests/test_auth_dkim.py compares the two). dkimpy's ARC code uses it; DKIM here
# uses strip_b.
ORIGINAL_RE_BTAG = dkimpy.RE_BTAG
dkimpy.RE_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


_B_EQ = re.compile(rb"b\s*=")  # a literal first: sre finds it without trying each octet
_B_BEFORE = b"; \t\n\r\x0b\x0c"  # [;\s]
_B64_RUN = b"\t\n\x0b\x0c\r +/0123456789=ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B64_RUN_ALNUM = bytes.maketrans(b"\t\n\x0b\x0c\r +/=", b"AAAAAAAAA")
_B64_RUN_RE = re.compile(rb"(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?")


def strip_b(value: bytes) -> bytes:
    r"""dkimpy.RE_BTAG.sub(b"\1", value): the b= value blanked out of a signature field.
    The pattern's [;\s] first made sre try it at every octet of the field (45 k
    instructions a signature); here sre looks for the literal b, the octet before it and
    the base64 run after it are checked with bytes methods (equality:
    tests/test_auth_dkim.py)."""
    out = []
    pos = 0
    for m in _B_EQ.finditer(value):
        start = m.start()
        # the octet before b is the pattern's first, and a match does not overlap the last
        if start <= pos or value[start - 1] not in _B_BEFORE:
            continue
        end = m.end()
        semi = value.find(b";", end)
        run = value[end:] if semi < 0 else value[end:semi]
        # all of the run in _B64_RUN (then all alphanumeric once mapped): it ends before the
        # ";"; else it does not, where the pattern decides (a mapping and isalnum() cost
        # half of a deletion)
        if run and not run.translate(_B64_RUN_ALNUM).isalnum():
            found = _B64_RUN_RE.match(value, end)  # it always matches (all optional)
            stop = found.end() if found else end
        else:
            stop = end + len(run.rstrip(_WS))  # it ends in a base64 character
        if value[stop:] in (b"\n", b"\r\n"):  # (?:\r?\n\Z)?
            stop = len(value)
        out.append(value[pos:end])
        pos = stop
    out.append(value[pos:])
    return b"".join(out)


@lru_cache(maxsize=256)
def _public_key(record: bytes) -> tuple[Any, Any, Any, Any, tuple[int, Any, Any] | None]:
    """dkimpy's parse of a key record (pk, keysize, ktag, seqtlsrpt), kept: the same few keys
    sign most of the mail; with, for an RSA key, its modulus length in octets and its
    exponent and modulus as GMP numbers (each conversion costs as much as the rest)."""
    pk, keysize, ktag, seqtlsrpt = dkimpy.evaluate_pk("key", record)
    rsa = None
    if ktag == b"rsa" and isinstance(pk, dict):
        with contextlib.suppress(TypeError, KeyError, AttributeError, ValueError):
            modulus, exponent = pk["modulus"], pk["publicExponent"]
            if modulus > 0 and exponent > 0:
                rsa = (len(_int2str(modulus)), int(exponent), gmpy2.mpz(modulus))
    return pk, keysize, ktag, seqtlsrpt, rsa


def octets_mpz(octets: bytes) -> Any:
    """int.from_bytes(octets, "big") as a GMP number, without the Python int between: gmpy2's
    binary form is a type octet (1: mpz), a sign octet (1: not negative) and the magnitude,
    least significant octet first (equality: tests/test_auth_dkim.py)."""
    return gmpy2.from_binary(b"\x01\x01" + octets[::-1])


def rsa_public(m: Any, exponent: int, modulus: Any) -> Any:
    """pow(m, exponent, modulus) for GMP numbers (a positive modulus). The usual exponent,
    65537 = 2**16 + 1, is sixteen squarings and a product: GMP's powmod first sets up a
    Montgomery reduction, which costs more than it saves over so short an exponent
    (equality: tests/test_auth_dkim.py)."""
    if exponent != 65537:
        return gmpy2.powmod(m, exponent, modulus)
    x = m
    for _ in range(16):
        x = x * x % modulus
    return x * m % modulus


_NAME_OCTETS = bytes(range(0x21, 0x7F))


def _lines(section: bytes) -> list[bytes]:
    """re.split(rb"\r?\n", section) without the regular expression (which scans every
    octet in Python's sre: three quarters of the parse): a CR goes with the LF after it."""
    if section.count(b"\n") == section.count(b"\r\n"):  # no bare LF: the usual section
        return section.split(b"\r\n")
    lines = section.split(b"\n")
    for i in range(len(lines) - 1):
        if lines[i].endswith(b"\r"):
            lines[i] = lines[i][:-1]
    return lines


def parse_header(section: bytes) -> list[list[bytes]]:
    """The header list of dkimpy's rfc822_parse(section), its patterns compiled once (it
    looks each up in re's cache for every line); the same errors (equality:
    tests/test_auth_dkim.py)."""
    headers: list[list[bytes]] = []
    for line in _lines(section):
        if not line:
            break
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"  # IndexError on a leading fold, as dkimpy's
        else:
            # ([\x21-\x7e]+?): matches up to the first colon after the first octet, if
            # every octet before it is printable ASCII other than space
            colon = line.find(b":", 1)
            if colon > 0 and not line[:colon].translate(None, _NAME_OCTETS):
                headers.append([line[:colon], line[colon + 1 :] + b"\r\n"])
            elif not line.startswith(b"From "):
                raise dkimpy.MessageFormatError(
                    f"Unexpected characters in RFC822 header: {line!r}")
    return headers


_NAME_KEYS: dict[str, bytes] = {}  # a field name dkimpy reads as one -> lower case, bytes
_NAME_KEYS_MAX = 4096


def _name_key(name: str) -> bytes | None:
    """name in lower case, or None where dkimpy's pattern would not take it for a name (a
    character outside printable ASCII, or none)."""
    key = _NAME_KEYS.get(name)
    if key is None:
        octets = name.encode("utf-8", "surrogateescape")
        if not octets or octets.translate(None, _NAME_OCTETS):
            return None
        key = octets.lower()
        if len(_NAME_KEYS) < _NAME_KEYS_MAX:  # the usual few dozen names; a flood of others
            _NAME_KEYS[name] = key  # is read the slow way, never kept
    return key


def split_named(section: bytes, fields: list[HeaderField], names: Collection[bytes]
                ) -> dict[bytes, list[list[bytes]]] | None:
    """by_lower_name(parse_header(section + CRLF)), for the (lower-case) names given only,
    from HeaderSection's fields of section (each field its first line and its continuation
    lines, split after its name as pairs() does). None where the two splits could differ,
    which parse_header then decides: a bare CR or LF (HeaderSection ends a line at either),
    a name dkimpy would not take (white space before the colon, a character outside
    printable ASCII). One loop over the fields checks them all and splits those named
    (equality: tests/test_auth_dkim.py)."""
    if section[-2:] != b"\r\n":
        return None
    rest = section.replace(b"\r\n", b"")
    if 13 in rest or 10 in rest:  # an int: bytes in bytes first fails to read one, at a cost
        return None
    keys = _NAME_KEYS
    by_name: dict[bytes, list[list[bytes]]] = {}
    for f in fields:
        name = f.name
        key = keys.get(name) or _name_key(name)
        raw = f.raw
        n = len(name)
        # the name HeaderSection read ends at the colon: no white space before it
        if key is None or raw[n : n + 1] != b":":
            return None
        if key in names:
            pair = [raw[:n], raw[n + 1 :]]
            found = by_name.get(key)
            if found is None:
                by_name[key] = [pair]
            else:
                found.append(pair)
    return by_name


def pairs(fields: list[HeaderField]) -> list[list[bytes]]:
    """dkimpy's [name, value] of each field (for a section split_named splits)."""
    out = []
    for f in fields:  # a loop: a comprehension costs a function call more
        raw = f.raw
        n = len(f.name)
        out.append([raw[:n], raw[n + 1 :]])
    return out


def select_headers(by_name: dict[bytes, list[Any]], include: Sequence[bytes]) -> list[Any]:
    """dkimpy's select_headers(headers, include) (each name's fields bottom up, each once),
    from the headers grouped by lower-case name in their order: dkimpy lowers every name
    again for every name h= lists (equality: tests/test_auth_dkim.py)."""
    taken: dict[bytes, int] = {}
    out = []
    for name in include:
        found = by_name.get(name)
        if found:
            left = taken.get(name, len(found))
            if left:
                out.append(found[left - 1])
                taken[name] = left - 1
    return out


def by_lower_name(headers: list[Any]) -> dict[bytes, list[Any]]:
    by_name: dict[bytes, list[Any]] = {}
    for h in headers:
        found = by_name.get(lname := h[0].lower())
        if found is None:
            by_name[lname] = [h]
        else:
            found.append(h)
    return by_name


def parse_tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    """dkim.util.parse_tag_value with its pattern compiled once (equality:
    tests/test_auth_dkim.py)."""
    tag_specs = tag_list.strip().split(b";")
    if not tag_specs[-1]:  # a trailing semicolon is valid
        tag_specs.pop()
    # the usual list first, its tags checked together: every name all letters (its first
    # character one), none twice; anything else is read again below, for dkimpy's error
    tags: dict[bytes, bytes] = {}
    for tag_spec in tag_specs:
        key, sep, value = tag_spec.partition(b"=")
        if not sep:
            break
        tags[key.strip()] = value.strip()
    else:
        if len(tags) == len(tag_specs) and b"".join(tags).isalpha() and b"" not in tags:
            return tags
    tags = {}
    for tag_spec in tag_specs:
        key, sep, value = tag_spec.partition(b"=")
        if not sep:  # dkimpy: the unpacking of a split without "=" fails
            raise InvalidTagSpec(tag_spec)
        key, value = key.strip(), value.strip()
        if not key[:1].isalpha():  # ^[a-zA-Z](\w)* asks only that: an ASCII letter first
            raise InvalidTagSpec(tag_spec)
        if key in tags:
            raise DuplicateTag(key)
        tags[key] = value
    return tags


_WSP_RUN = re.compile(rb"[\t ]+")


def relaxed_lines(headers: list[Any]) -> list[bytes]:
    r"""dkimpy's Relaxed.canonicalize_headers, each field as the name:value line that is
    hashed, without its regular expressions where they would change nothing: unfolding
    removes each LF and the CR just before it (as re.sub(b"\r?\n", b"", v)); where tabs
    and spaces are the only white space left, split() cuts at their runs and drops those at
    both ends, as compression then strip() do (equality: tests/test_auth_dkim.py). A
    membership test takes an int: bytes in bytes first fails to read an int, at a cost."""
    out = []
    for name, value in headers:
        value = value.replace(b"\r\n", b"")
        if 10 in value:
            value = value.replace(b"\n", b"")
        if 13 in value or 11 in value or 12 in value:  # \s that compression keeps
            value = _WSP_RUN.sub(b" ", value).strip()
        else:
            value = b" ".join(value.split())
        out.append(name.lower().rstrip() + b":" + value + b"\r\n")
    return out


def relaxed_plain_lines(headers: list[Any]) -> list[bytes]:
    r"""relaxed_lines(headers) for fields whose white space is spaces, tabs and CRLFs, each
    CRLF before a space or a tab or at the end (a section split_named splits, without \x0b
    and \x0c), their names without white space: split() cuts at exactly the runs that
    unfolding and compression make one space, and drops those at both ends, as strip()
    (equality: tests/test_auth_dkim.py)."""
    return [name.lower() + b":" + b" ".join(value.split()) + b"\r\n" for name, value in headers]


def simple_lines(headers: list[Any]) -> list[bytes]:
    """dkimpy's Simple.canonicalize_headers (the fields as they are), as lines."""
    return [name + b":" + value for name, value in headers]


_WS = b" \t\n\r\x0b\x0c"  # what rb"\s" matches: dkimpy's re.sub(rb"\s+", b"", v) deletes it

_BASE64_OCTETS = _B64_RUN.replace(b"=", b"")  # [\s0-9A-Za-z+/]


def is_base64(value: bytes) -> bool:
    r"""re.match(rb"[\s0-9A-Za-z+/]+[\s=]*$", value), dkimpy's test of b=, without sre's
    octet-by-octet walk over the signature: what comes before the trailing white space and
    "=" must all be base64 or white space, and when nothing does, the value must begin with
    white space (equality: tests/test_auth_dkim.py)."""
    head = value.rstrip(_WS + b"=")
    if head:
        return not head.translate(None, _BASE64_OCTETS)
    return value[:1] in (b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c")


_D_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_DIGITS = re.compile(rb"\d+$")
_LENGTH = re.compile(rb"\d{,76}$")
_SLOP = 36000  # dkimpy's 10 hours for mailers with inaccurate clocks


_MANDATORY = frozenset((b"v", b"a", b"b", b"bh", b"d", b"h", b"s"))


def validate_signature_fields(sig: dict[bytes, bytes]) -> None:
    """dkimpy's validate_signature_fields(sig) for a DKIM-Signature (its default mandatory
    fields, arc=False), step by step, its patterns compiled once: it looked up nine in re's
    cache per signature; each value is looked up once, and the mandatory ones are there
    after the first test (equality, errors included: tests/test_auth_dkim.py)."""
    _validate(sig)


def _validate(sig: dict[bytes, bytes]) -> tuple[bytes, bytes | None]:
    """validate_signature_fields(sig), returning b= without its white space (what is decoded
    and shown: removed once for all) and, for the usual b=, its decoded octets."""
    if not sig.keys() >= _MANDATORY:
        for name in (b"v", b"a", b"b", b"bh", b"d", b"h", b"s"):  # the first missing, named
            if name not in sig:
                raise dkimpy.ValidationError(f"missing {name!r}=")
    if sig[b"a"] not in HASH_ALGORITHMS:
        raise dkimpy.ValidationError(f"unknown signature algorithm: {sig[b'a']!r}")
    b = sig[b"b"]
    b_clean = b"".join(b.split())  # split() cuts at rb"\s", as translate(None, _WS) removes
    signature = strict_base64(b_clean)
    if signature is None and (not is_base64(b) or len(b_clean) % 4 != 0):
        raise dkimpy.ValidationError(f"b= value is not valid base64 ({b!r})")
    # dkimpy tests b= (not bh=) against the pattern again for bh=: it passed just above
    if len(sig[b"bh"].translate(None, _WS)) % 4 != 0:
        raise dkimpy.ValidationError(f"bh= value is not valid base64 ({sig[b'bh']!r})")
    get = sig.get
    cv = get(b"cv")
    if cv is not None and cv not in (dkimpy.CV_Pass, dkimpy.CV_Fail, dkimpy.CV_None):
        raise dkimpy.ValidationError(f"cv= value is not valid ({cv!r})")
    d = sig[b"d"]
    if d.isascii() and _D_SPECIALS.search(d):
        raise dkimpy.ValidationError(f"d= value is not valid ({d!r})")
    # i= is [local-part]@domain (RFC 6376 3.5): one equal to d= without the "@" is invalid
    # here, where dkimpy trips over it with an IndexError (a tempfail at every retry)
    i = get(b"i")
    if i is not None and (not i.lower().endswith(d.lower()) or len(i) <= len(d)
                          or i[-len(d) - 1] not in (64, 46)):
        raise dkimpy.ValidationError(f"i= domain is not a subdomain of d= (i={i!r} d={d!r})")
    length = get(b"l")
    if length is not None and _LENGTH.match(length) is None:
        raise dkimpy.ValidationError(f"l= value is not a decimal integer ({length!r})")
    q = get(b"q")
    if q is not None and q != b"dns/txt":
        raise dkimpy.ValidationError(f"q= value is not dns/txt ({q!r})")
    t = get(b"t")
    t_sign = None
    if t is not None:
        # \d+$ also takes a final LF, which isdigit() does not: the pattern decides then
        if not t.isdigit() and _DIGITS.match(t) is None:
            raise dkimpy.ValidationError(f"t= value is not a decimal integer ({t!r})")
        t_sign = int(t)
        if t_sign > int(time.time()) + _SLOP:
            raise dkimpy.ValidationError(f"t= value is in the future ({t!r})")
    if sig[b"v"] != b"1":
        raise dkimpy.ValidationError(f"v= value is not 1 ({sig[b'v']!r})")
    x = get(b"x")
    if x is not None:
        if not x.isdigit() and _DIGITS.match(x) is None:
            raise dkimpy.ValidationError(f"x= value is not a decimal integer ({x!r})")
        x_sign = int(x)
        if x_sign < int(time.time()) - _SLOP:
            raise dkimpy.ValidationError(f"x= value is past ({x!r})")
        if t_sign and x_sign < t_sign:
            raise dkimpy.ValidationError(
                f"x= value is less than t= value (x={x!r} t={t!r})")
    return b_clean, signature


def strict_base64(clean: bytes) -> bytes | None:
    """The octets of clean (base64 without white space), if it is strictly valid (its
    alphabet, its padding, a length in fours): dkimpy's b= test then passes (is_base64 and a
    length in fours; equality: tests/test_auth_dkim.py), and the octets are what its decode
    gives. None otherwise (including empty, which dkimpy's test takes only after white
    space), for the tests themselves to decide. One C pass instead of three."""
    if not clean or len(clean) % 4:  # strict_mode takes "AAAA=": a length in fours too
        return None
    try:
        return binascii.a2b_base64(clean, strict_mode=True)
    except binascii.Error:
        return None


def _b64(value: bytes) -> bytes:
    # base64.b64decode(value) of bytes, less its two Python-level steps
    return binascii.a2b_base64(value.translate(None, _WS))


@lru_cache(maxsize=64)
def _emsa_prefix(hash_name: str, mlen: int) -> bytes:
    """dkimpy's EMSA-PKCS1-v1_5 encoding of a digest, less the digest: padding and the
    DigestInfo depend only on the hash and the modulus length (raises DigestTooLargeError
    as dkimpy's does)."""
    hasher = hashlib.new(hash_name)
    encoded = dkim.crypto.EMSA_PKCS1_v1_5_encode(hasher, mlen)
    return bytes(encoded[: -hasher.digest_size])


_TAIL = b" \t\r"  # what relaxed canonicalisation may still change at a chunk's end


def relax_body(data: bytes) -> bytes:
    r"""re.sub(rb"[\t ]+", b" ", re.sub(rb"[\t ]+\r\n", b"\r\n", data)), relaxed body
    canonicalisation within a chunk, by bytes methods where the patterns would change
    nothing or little: sre tried them at every octet, 1.5 M instructions for 4 KB (equality:
    tests/test_auth_dkim.py). White space before a CRLF goes; then every run of tabs and
    spaces is one space."""
    if b" \r\n" in data or b"\t\r\n" in data:
        lines = data.split(b"\r\n")
        last = lines.pop()  # not followed by a CRLF: kept as it is
        data = b"\r\n".join([line.rstrip(b" \t") for line in lines] + [last])
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:  # a run of n spaces is about n/2 after each pass
        data = data.replace(b"  ", b" ")
    return data


class BodyCanon:
    """One body canonicalisation, streamed: feed() message bytes, end() once; every
    canonical byte goes to `emit`, in order, exactly once."""

    __slots__ = ("_emit", "_emitted", "_held", "relaxed")

    def __init__(self, relaxed: bool, emit: Callable[[bytes], None]) -> None:
        self.relaxed = relaxed
        self._emit = emit
        self._held = b""  # a run of CRLFs (and a lone CR, or relaxed's tail), not yet sure
        self._emitted = False

    def feed(self, chunk: bytes) -> None:
        data = self._held + chunk if self._held else chunk
        if self.relaxed:
            # white space and CR at the end may join the next chunk's: kept back
            cut = len(data.rstrip(_TAIL))
            data, tail = data[:cut], data[cut:]
            data = relax_body(data)
        else:
            tail = b""
            if data.endswith(b"\r"):
                data, tail = data[:-1], b"\r"
        # trailing empty lines are dropped unless something follows them
        end = len(data)
        while data.endswith(b"\r\n", 0, end):
            end -= 2
        if end:
            self._emit(data[:end])
            self._emitted = True
        self._held = data[end:] + tail

    def end(self) -> None:
        held, self._held = self._held, b""
        if self.relaxed and held:
            held = relax_body(held)
        # the trailing empty lines go; what is left before them (a lone CR, white space) is
        # content, and the body then ends with one CRLF (dkimpy adds it when missing)
        end = len(held)
        while held.endswith(b"\r\n", 0, end):
            end -= 2
        if end:
            self._emit(held[:end])
            self._emitted = True
        if self._emitted or not self.relaxed:
            self._emit(b"\r\n")  # a relaxed empty body stays empty (RFC 6376 errata 3192)


@lru_cache(maxsize=64)
def _canonicalization(c: bytes) -> tuple[bool, bool]:
    """(relaxed header, relaxed body) of a c= value (dkimpy's errors): signers use a few."""
    policy = CanonicalizationPolicy.from_c_value(c)
    return policy.header_algorithm is Relaxed, policy.body_algorithm is Relaxed


@dataclass(slots=True)
class BodyHash:
    """One body hash to compute as the body streams: its canonicalisation, hash and l=."""

    relaxed: bool  # relaxed body canonicalisation (else simple)
    hasher: Any
    remaining: int | None = None  # l=: body octets still to hash

    def update(self, data: bytes) -> None:
        if self.remaining is not None:
            data = data[: self.remaining]
            self.remaining -= len(data)
        self.hasher.update(data)

    def digest(self) -> bytes:
        digest: bytes = self.hasher.digest()
        return digest


class BodyHashes:
    """The body hashes of one message, DKIM's and ARC's alike, fed as the body streams: one
    canonicalisation pass per mode, whatever the number of hashes it feeds."""

    __slots__ = ("_canons",)

    def __init__(self, hashes: list[BodyHash]) -> None:
        if len(hashes) == 1:  # the usual one signature: its own pass, no grouping
            self._canons = [BodyCanon(hashes[0].relaxed, hashes[0].update)]
            return
        by_mode: dict[bool, list[BodyHash]] = {}
        for h in hashes:
            by_mode.setdefault(h.relaxed, []).append(h)
        self._canons = [BodyCanon(relaxed, _fanout(group))
                        for relaxed, group in by_mode.items()]

    def feed(self, chunk: bytes) -> None:
        for canon in self._canons:
            canon.feed(chunk)

    def end(self) -> None:
        for canon in self._canons:
            canon.end()
        self._canons = []


@dataclass(slots=True)
class Signature:
    """One DKIM-Signature field of the message, as dkimpy reads it."""

    index: int  # among the message's DKIM-Signature fields, top first (dkimpy's idx)
    fields: dict[bytes, bytes] = field(default_factory=dict)
    error: str = ""  # the field is unusable (dkimpy raises on it): permerror
    domain: str = ""
    selector: str = ""
    body: BodyHash | None = None  # set when the field is usable
    header: tuple[bytes, bytes] = (b"", b"")  # the DKIM-Signature field (name, value)
    include: tuple[bytes, ...] = ()  # h=, lower case
    relaxed_header: bool = False  # c= (else simple)
    b: bytes = b""  # b= without white space
    signature: bytes | None = None  # b= decoded, when strictly valid base64

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True, slots=True)
class DKIMResult:
    result: str  # pass, fail, neutral, permerror, temperror
    domain: str
    selector: str
    b: str = ""  # the first characters of b= (RFC 6008 header.b), to tell signatures apart
    reason: str = ""


@lru_cache(maxsize=1024)
def _domain(value: bytes) -> str:
    # d= and s= (kept: the same signers come back message after message)
    return value.decode("ascii", "replace").lower().rstrip(".")


@lru_cache(maxsize=1024)
def _include(h: bytes) -> tuple[bytes, ...]:
    r"""dkimpy's h= list: re.split(rb"\s*:\s*", h.lower()) (kept: a signer lists the same
    fields message after message)."""
    h = h.lower()
    # without white space (the usual h=), the pattern splits at each colon
    return tuple(h.split(b":") if len(h.split()) == 1 else _H_SPLIT.split(h))


class Verifier:
    """The DKIM signatures of one message: parse at the header section, their body hashes
    (`hashes`) fed to BodyHashes as the body streams, verify at the end with keys fetched by
    then."""

    def __init__(self, header: bytes, max_signatures: int, min_key_bits: int,
                 section: HeaderSection | None = None) -> None:
        """section: the HeaderSection of header, when there is one (no second parse)."""
        self.header = header  # the held header section, message bytes, as it came
        self.min_key_bits = min_key_bits
        self.signatures: list[Signature] = []
        # the fields by lower-case name, as dkimpy splits them: all of them, or (from a
        # section split alike) those the signatures' h= lists name, the only ones read
        self.by_name: dict[bytes, list[list[bytes]]] = {}
        self.plain = False  # relaxed_plain_lines canonicalises its fields
        if section is not None:
            # the signatures as the section has them, then whether dkimpy splits it alike
            found = pairs(section.get_lower("dkim-signature"))
            signatures = [self._parse(i, (found[i][0], found[i][1]))
                          for i in range(min(len(found), max_signatures))]
            names: Collection[bytes] = (signatures[0].include if len(signatures) == 1
                                        else {n for sig in signatures for n in sig.include})
            by_name = split_named(header, section.fields, names)
            if by_name is not None:
                self.signatures, self.by_name = signatures, by_name
                self.plain = 11 not in header and 12 not in header  # an int: see relaxed_lines
                return
        try:  # dkimpy's DKIM(header + CRLF) parses the section so
            self.by_name = by_lower_name(parse_header(header + b"\r\n"))
        except dkimpy.DKIMException as exc:
            # the section itself is malformed: dkimpy would fail every signature
            error = str(exc)
            count = len(_SIGNATURE_START.findall(header))
            self.signatures = [Signature(i, error=error)
                               for i in range(min(count, max_signatures))]
            return
        found = self.by_name.get(b"dkim-signature", [])
        for index in range(min(len(found), max_signatures)):
            name, value = found[index]
            self.signatures.append(self._parse(index, (name, value)))

    def _parse(self, index: int, header: tuple[bytes, bytes]) -> Signature:
        """dkimpy's verify_headerprep(index) and its c= check, on the signature's field."""
        try:
            try:
                fields = parse_tag_value(header[1])
            except InvalidTagValueList as exc:
                raise dkimpy.MessageFormatError(exc) from None
            b, signature = _validate(fields)
            include = _include(fields[b"h"])
            relaxed_header, relaxed_body = _canonicalization(fields.get(b"c", b"simple/simple"))
            length = fields.get(b"l")
            body = BodyHash(relaxed_body, HASH_ALGORITHMS[fields[b"a"]](),
                            None if length is None else int(length))
        except Exception as exc:  # the sender wrote this field
            # dkimpy's own errors, and anything else a malformed field trips: that signature
            # is a permerror, never an exception that tempfails the message at every retry
            sig = Signature(index, header=header, error=str(exc) or type(exc).__name__)
            with contextlib.suppress(Exception):
                parsed = parse_tag_value(header[1])
                sig.domain = _domain(parsed.get(b"d", b""))
                sig.selector = _domain(parsed.get(b"s", b""))
            return sig
        # built whole (each attribute set afterwards cost as much again)
        return Signature(index, fields, "", _domain(fields[b"d"]), _domain(fields[b"s"]), body,
                         header, include, relaxed_header, b, signature)

    @property
    def key_names(self) -> list[str]:
        if len(self.signatures) == 1:  # the usual
            s = self.signatures[0]
            return [s.key_name] if not s.error and s.domain and s.selector else []
        names = []
        for s in self.signatures:
            if not s.error and s.domain and s.selector:
                name = s.key_name
                if name not in names:
                    names.append(name)
        return names

    @property
    def hashes(self) -> list[BodyHash]:
        return [s.body for s in self.signatures if s.body is not None]

    def results(self, keys: dict[str, list[bytes] | None]) -> list[DKIMResult]:
        """Each signature's result, given its key records (None: the lookup failed)."""
        return [DKIMResult(result, sig.domain, sig.selector,
                           sig.b[:8].decode("ascii", "replace"), reason)
                for sig in self.signatures for result, reason in (self._result(sig, keys),)]

    def _result(self, sig: Signature, keys: dict[str, list[bytes] | None]) -> tuple[str, str]:
        """(result, reason) of one signature."""
        if sig.error or sig.body is None:
            return "permerror", sig.error
        records = keys.get(sig.key_name)
        if records is None:
            return "temperror", "key lookup failed"
        if not records:
            return "permerror", "no key"
        # dkimpy's order: the key first (a missing or revoked key decides), then the body
        try:
            key = _public_key(records[0])
        except (dkimpy.DKIMException, ValueError) as exc:
            return "permerror", f"bad key: {exc}"
        want = _b64(sig.fields[b"bh"])
        if sig.body.digest() != want:
            return "fail", "body hash mismatch"
        try:
            ok = self._verify_header(sig, key)
        except dkimpy.DKIMException as exc:
            return "permerror", str(exc)
        return ("pass", "") if ok else ("fail", "signature did not verify")

    def _verify_header(self, sig: Signature, key: tuple[Any, Any, Any, Any, Any]) -> bool:
        """dkimpy's DKIM.verify_sig_process without the body (compared already), for a
        message that is not a TLS report (tlsrpt=False, dkimpy's default)."""
        pk, keysize, ktag, seqtlsrpt, rsa = key
        if seqtlsrpt:
            raise dkimpy.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        fields = sig.fields
        include: Sequence[bytes] = sig.include
        if b"from" in include:  # dkimpy's bug#644046: any additional From is hashed too
            include = [*include, b"from"]
        # dkimpy canonicalises every field, then picks those h= names (each name's fields
        # bottom up); here the fields are picked first, and only those canonicalised: a
        # message's twenty Received fields need not be (canonicalisation works field by
        # field and keeps a parsed name's case-folded form, so the order does not matter)
        canon = (simple_lines if not sig.relaxed_header
                 else relaxed_plain_lines if self.plain else relaxed_lines)
        signed = select_headers(self.by_name, include)
        signed.append((sig.header[0], strip_b(sig.header[1])))  # last, its b= blanked out
        lines = canon(signed)
        # the signature field is hashed without its trailing CRLF (white space after the
        # colon is the value's: rstrip of the line is rstrip of the value)
        lines[-1] = lines[-1].rstrip()
        hasher = HASH_ALGORITHMS[fields[b"a"]](b"".join(lines))
        signature = sig.signature
        if signature is None:  # valid as dkimpy reads it, if not strictly: its decode
            signature = binascii.a2b_base64(sig.b)  # _b64(b=)
        if ktag == b"rsa":
            try:
                if rsa is None:  # not the usual key: dkimpy's own steps
                    modlen = len(dkim.crypto.int2str(pk["modulus"]))
                    encoded = _emsa_prefix(hasher.name.lower(), modlen) + hasher.digest()
                    res: bool = encoded == dkim.crypto.rsa_encrypt(signature, pk, modlen)
                else:
                    # rsa_encrypt's comparison as numbers: both sides are modlen octets
                    # (the result is below the modulus), so equal numbers are equal octets
                    modlen, exponent, modulus = rsa
                    encoded = _emsa_prefix(hasher.name.lower(), modlen) + hasher.digest()
                    res = octets_mpz(encoded) == rsa_public(octets_mpz(signature), exponent,
                                                            modulus)
                if res and keysize < self.min_key_bits:
                    raise dkimpy.KeyFormatError(f"public key too small: {keysize}")
                return res
            except (TypeError, DigestTooLargeError) as exc:
                raise dkimpy.KeyFormatError(f"digest too large for modulus: {exc}") from None
        if ktag == b"ed25519":
            try:
                pk.verify(hasher.digest(), signature)
            except nacl.exceptions.BadSignatureError:
                return False
            return True
        raise dkimpy.UnknownKeyTypeError(ktag)


_H_SPLIT = re.compile(rb"\s*:\s*")


_SIGNATURE_START = re.compile(rb"(?im)^dkim-signature[ \t]*:")


def _fanout(hashes: list[BodyHash]) -> Callable[[bytes], None]:
    if len(hashes) == 1:
        return hashes[0].update

    def emit(data: bytes) -> None:
        for h in hashes:
            h.update(data)

    return emit
