"""DKIM (RFC 6376) verified while the body streams: memory per message is bounded.

dkimpy verifies a whole message in memory. Here its two halves are split apart:
  - the body hash: each signature's canonicalised body (simple or relaxed, cut at l=) is fed
    chunk by chunk into a hashlib object as the body arrives (BodyCanon keeps back only what
    a later chunk may still change: trailing empty lines, trailing white space, a lone CR);
  - the header signature: dkimpy's own verification (DKIM.verify_sig) over the held header
    section, with the key fetched beforehand through the async resolver, and with bh= taken
    out of the signature's fields since the body hash was already compared here.
The result equals dkimpy's dkim.verify on the same bytes (tests/test_auth_dkim.py proves it
over a corpus); only the failures are told apart (fail, permerror, temperror).
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import dkim as dkimpy
import dkim.crypto
import gmpy2
from dkim.crypto import HASH_ALGORITHMS


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
# in 15 us (tests/test_auth_dkim.py compares the two).
ORIGINAL_RE_BTAG = dkimpy.RE_BTAG
dkimpy.RE_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


@lru_cache(maxsize=256)
def _public_key(record: bytes) -> tuple[Any, Any, Any, Any]:
    """dkimpy's parse of a key record, kept: the same few keys sign most of the mail."""
    return tuple(dkimpy.evaluate_pk("key", record))


_WSP_CRLF = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")
_TAIL = b" \t\r"  # what relaxed canonicalisation may still change at a chunk's end


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
            data = _WSP.sub(b" ", _WSP_CRLF.sub(b"\r\n", data))
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
            held = _WSP.sub(b" ", _WSP_CRLF.sub(b"\r\n", held))
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


@dataclass(slots=True)
class Signature:
    """One DKIM-Signature field of the message, as dkimpy reads it."""

    index: int  # among the message's DKIM-Signature fields, top first (dkimpy's idx)
    fields: dict[bytes, bytes] = field(default_factory=dict)
    error: str = ""  # the field is unusable (dkimpy raises on it): permerror
    domain: str = ""
    selector: str = ""
    hasher: Any = None
    remaining: int | None = None  # l=: body octets still to hash
    body_hash: bytes = b""

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def relaxed_body(self) -> bool:
        c = self.fields.get(b"c", b"simple/simple").split(b"/")
        return len(c) == 2 and c[1] == b"relaxed"

    def update(self, data: bytes) -> None:
        if self.remaining is not None:
            data = data[: self.remaining]
            self.remaining -= len(data)
        self.hasher.update(data)


@dataclass(frozen=True, slots=True)
class DKIMResult:
    result: str  # pass, fail, neutral, permerror, temperror
    domain: str
    selector: str
    b: str = ""  # the first characters of b= (RFC 6008 header.b), to tell signatures apart
    reason: str = ""


def _domain(value: bytes) -> str:
    return value.decode("ascii", "replace").lower().rstrip(".")


class Verifier:
    """The DKIM signatures of one message: parse at the header section, hash the body as it
    streams, verify at the end with keys fetched by then."""

    def __init__(self, header: bytes, max_signatures: int, min_key_bits: int) -> None:
        self.header = header  # the held header section, message bytes, as it came
        self.min_key_bits = min_key_bits
        self.signatures: list[Signature] = []
        self._canons: list[BodyCanon] = []
        self._ok = True
        try:
            self._dkim = dkimpy.DKIM(header + b"\r\n", minkey=min_key_bits)
        except dkimpy.DKIMException as exc:
            # the section itself is malformed: dkimpy would fail every signature
            self._ok = False
            self._error = str(exc)
            count = len(re.findall(rb"(?im)^dkim-signature[ \t]*:", header))
            self.signatures = [Signature(i, error=self._error)
                               for i in range(min(count, max_signatures))]
            return
        count = sum(1 for name, _ in self._dkim.headers if name.lower() == b"dkim-signature")
        for index in range(min(count, max_signatures)):
            self.signatures.append(self._parse(index))
        by_mode: dict[bool, list[Signature]] = {}
        for sig in self.signatures:
            if not sig.error:
                by_mode.setdefault(sig.relaxed_body, []).append(sig)
        for relaxed, sigs in by_mode.items():
            self._canons.append(BodyCanon(relaxed, _fanout(sigs)))

    def _parse(self, index: int) -> Signature:
        sig = Signature(index)
        try:
            prep = self._dkim.verify_headerprep(index)
            fields, _include, _headers = prep
            dkimpy.CanonicalizationPolicy.from_c_value(fields.get(b"c", b"simple/simple"))
        except (dkimpy.DKIMException, dkimpy.InvalidCanonicalizationPolicyError) as exc:
            sig.error = str(exc) or type(exc).__name__
            raw = self._dkim.headers
            with contextlib.suppress(Exception):
                found = [v for n, v in raw if n.lower() == b"dkim-signature"][index]
                parsed = dkimpy.util.parse_tag_value(found)
                sig.domain = _domain(parsed.get(b"d", b""))
                sig.selector = _domain(parsed.get(b"s", b""))
            return sig
        sig.fields = fields
        sig.domain = _domain(fields[b"d"])
        sig.selector = _domain(fields[b"s"])
        sig.hasher = HASH_ALGORITHMS[fields[b"a"]]()
        if b"l" in fields:
            sig.remaining = int(fields[b"l"])
        return sig

    @property
    def key_names(self) -> list[str]:
        return list(dict.fromkeys(s.key_name for s in self.signatures
                                  if not s.error and s.domain and s.selector))

    def feed(self, chunk: bytes) -> None:
        for canon in self._canons:
            canon.feed(chunk)

    def end(self) -> None:
        for canon in self._canons:
            canon.end()
        self._canons = []

    def results(self, keys: dict[str, list[bytes] | None]) -> list[DKIMResult]:
        """Each signature's result, given its key records (None: the lookup failed)."""
        return [self._result(sig, keys) for sig in self.signatures]

    def _result(self, sig: Signature, keys: dict[str, list[bytes] | None]) -> DKIMResult:
        b = re.sub(rb"\s+", b"", sig.fields.get(b"b", b""))[:8].decode("ascii", "replace")

        def done(result: str, reason: str) -> DKIMResult:
            return DKIMResult(result, sig.domain, sig.selector, b, reason)

        if sig.error:
            return done("permerror", sig.error)
        records = keys.get(sig.key_name)
        if records is None:
            return done("temperror", "key lookup failed")
        if not records:
            return done("permerror", "no key")
        # dkimpy's order: the key first (a missing or revoked key decides), then the body
        try:
            pk, keysize, ktag, seqtlsrpt = _public_key(records[0])
        except (dkimpy.DKIMException, ValueError) as exc:
            return done("permerror", f"bad key: {exc}")
        want = base64.b64decode(re.sub(rb"\s+", b"", sig.fields[b"bh"]))
        if sig.hasher.digest() != want:
            return done("fail", "body hash mismatch")
        fields = {k: v for k, v in sig.fields.items() if k != b"bh"}
        include = [x.lower() for x in re.split(rb"\s*:\s*", fields[b"h"])]
        every = self._dkim.headers
        headers = [(n, v) for n, v in every if n.lower() == b"dkim-signature"]
        d = self._dkim
        d.pk, d.keysize, d.ktag, d.seqtlsrpt = pk, keysize, ktag, seqtlsrpt
        # dkimpy canonicalises every field, signed or not; only those named in h= are read
        # (each name's fields in their order, which the filter keeps): a message's twenty
        # Received fields need not be
        wanted = frozenset(include)
        d.headers = [h for h in every if h[0].lower() in wanted]
        try:
            ok = d.verify_sig_process(fields, include, headers[sig.index], _no_dns)
        except dkimpy.DKIMException as exc:
            return done("permerror", str(exc))
        finally:
            d.headers = every
        return done("pass", "") if ok else done("fail", "signature did not verify")


def _no_dns(name: str, timeout: float = 5) -> bytes | None:
    raise dkimpy.DnsTimeoutError("relayproxy fetches keys itself")


def _fanout(sigs: list[Signature]) -> Callable[[bytes], None]:
    if len(sigs) == 1:
        return sigs[0].update

    def emit(data: bytes) -> None:
        for sig in sigs:
            sig.update(data)

    return emit
