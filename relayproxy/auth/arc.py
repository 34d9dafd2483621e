"""ARC (RFC 8617) verified while the body streams: memory per message is bounded.

Of an ARC set, only the ARC-Message-Signature reads the body, through its bh= (a DKIM body
hash); the ARC-Seal signs ARC fields only. So the chain is verified from the header section
and body hashes computed as the body streams (relayproxy.auth.dkim.BodyHashes, the passes
shared with the DKIM signatures): at the header section, each bh= the chain carries becomes a
body hash to compute (canonicalisation, algorithm, l=); at the end, dkimpy's ARC.verify runs
on the header section alone, comparing each bh= with its streamed digest instead of hashing a
body it does not have. Keys are fetched beforehand through the async resolver and handed to
dkimpy as a table. The result equals dkimpy's arc_verify on the whole message
(tests/test_auth_arc.py proves it over a corpus).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim as dkimpy
from dkim.canonicalization import CanonicalizationPolicy, Relaxed
from dkim.crypto import HASH_ALGORITHMS

from .dkim import BodyHash, _domain, parse_header

_ARC_SIGNED = (b"arc-seal", b"arc-message-signature")
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d+)")
_WS = re.compile(rb"\s+")

# a body hash: relaxed body canonicalisation, a=, l=
_BodyKey = tuple[bool, bytes, int | None]


@dataclass(frozen=True, slots=True)
class ARCResult:
    result: str  # pass, fail, none, temperror
    sealer: str = ""  # d= of the latest ARC-Seal
    instance: int = 0
    reason: str = ""


def seals(fields: list[tuple[bytes, bytes]] | list[list[bytes]]) -> dict[int, str]:
    """d= of each ARC-Seal by instance."""
    found: dict[int, str] = {}
    for name, value in fields:
        if name.lower() == b"arc-seal":
            tags = _tags(value)
            if tags is not None and tags.get(b"i", b"").isdigit():
                found[int(tags[b"i"])] = _domain(tags.get(b"d", b""))
    return found


def key_names(fields: list[tuple[bytes, bytes]]) -> list[str]:
    """The key records the ARC-Seal and ARC-Message-Signature fields name."""
    names = []
    for name, value in fields:
        if name.lower() in _ARC_SIGNED:
            tags = _tags(value)
            if tags is not None and tags.get(b"s") and tags.get(b"d"):
                names.append(f"{_domain(tags[b's'])}._domainkey.{_domain(tags[b'd'])}")
    return list(dict.fromkeys(names))


def instance_of(value: bytes) -> int | None:
    m = _INSTANCE.search(value)
    return int(m.group(1)) if m else None


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        return dict(dkimpy.util.parse_tag_value(value))
    except dkimpy.util.InvalidTagValueList:
        return None


def _body_key(sig: dict[bytes, bytes]) -> _BodyKey:
    """The body hash dkimpy's verify_sig_process computes for sig: c= (ARC's default
    relaxed/relaxed, which verify_instance sets), a=, l=; its errors for a bad c=."""
    try:
        policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"relaxed/relaxed"))
    except dkimpy.InvalidCanonicalizationPolicyError as exc:
        raise dkimpy.MessageFormatError(f"invalid c= value: {exc.args[0]}") from None
    length = sig.get(b"l")
    try:
        # dkimpy lets l= be empty (\d{,76}), then int() raises out of arc_verify: a failed
        # signature here, never an exception that tempfails the message at every retry
        cut = int(length) if length is not None else None
    except ValueError:
        raise dkimpy.MessageFormatError(f"invalid l= value: {length!r}") from None
    return policy.body_algorithm is Relaxed, sig[b"a"], cut


class _StreamedARC(dkimpy.ARC):  # type: ignore[misc]  # dkimpy is untyped
    """dkimpy's ARC on the header section, each bh= compared with its streamed digest."""

    def __init__(self, headers: list[list[bytes]], min_key_bits: int,
                 digests: dict[_BodyKey, BodyHash]) -> None:
        super().__init__(None, minkey=min_key_bits)
        self.headers = headers
        self.body = b""
        self.digests = digests

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Any) -> bool:
        if b"bh" in sig:
            body = self.digests.get(_body_key(sig))
            if body is None:  # every bh= of the section was asked for: cannot happen
                raise dkimpy.ValidationError("body hash not computed")
            try:
                want = base64.b64decode(_WS.sub(b"", sig[b"bh"]))
            except binascii.Error as exc:  # dkimpy's would raise out of arc_verify
                raise dkimpy.MessageFormatError(str(exc)) from None
            got = body.digest()
            if got != want:
                raise dkimpy.ValidationError(
                    f"body hash mismatch (got {base64.b64encode(got)!r}, "
                    f"expected {sig[b'bh']!r})")
            # the rest is dkimpy's, which hashes the body only for a bh= (hash_headers
            # signs the raw field, so bh= still counts there)
            sig = {k: v for k, v in sig.items() if k != b"bh"}
        result: bool = super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)
        return result


class Chain:
    """The ARC chain of one message: parsed at the header section, its body hashes
    (`hashes`) fed to BodyHashes as the body streams, verified at the end."""

    def __init__(self, header: bytes, min_key_bits: int) -> None:
        self.error = ""  # the section is malformed: dkimpy's arc_verify would raise
        self._digests: dict[_BodyKey, BodyHash] = {}
        self._arc: _StreamedARC | None = None
        try:
            headers = parse_header(header + b"\r\n")
        except (dkimpy.DKIMException, IndexError) as exc:
            self.error = str(exc) or type(exc).__name__
            return
        self._arc = _StreamedARC(headers, min_key_bits, self._digests)
        # the same fields and tag values dkimpy's verify_instance reads (relaxed, sorted)
        for _instance, (name, value) in self._arc.sorted_arc_headers()[1]:
            if name.lower() not in _ARC_SIGNED:
                continue
            tags = _tags(value)
            if tags is None or b"bh" not in tags or tags.get(b"a") not in HASH_ALGORITHMS:
                continue  # dkimpy fails the field before it reads the body
            try:
                key = _body_key(tags)
            except dkimpy.DKIMException:
                continue
            if key not in self._digests:
                self._digests[key] = BodyHash(key[0], HASH_ALGORITHMS[key[1]](), key[2])

    @property
    def hashes(self) -> list[BodyHash]:
        return list(self._digests.values())

    def verify(self, keys: dict[str, list[bytes] | None]) -> ARCResult:
        """The chain's validation status once the body hashes are complete; keys by record
        name (None: the lookup failed)."""
        if self._arc is None:
            return ARCResult("fail", reason=self.error)
        failed: list[str] = []
        try:
            cv, _results, reason = self._arc.verify(dnsfunc=key_table(keys, failed))
        except dkimpy.DKIMException as exc:  # as arc_verify
            cv, reason = dkimpy.CV_Fail, str(exc)
        return outcome(cv, reason, failed, self._arc.headers)


def key_table(keys: dict[str, list[bytes] | None], failed: list[str]
              ) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc over keys fetched beforehand; names whose lookup failed go in
    failed."""

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = (name.decode("ascii", "replace") if isinstance(name, bytes) else name)
        records = keys.get(text.lower().rstrip("."))
        if records is None:
            failed.append(text)
            raise dkimpy.DnsTimeoutError(f"{text}: lookup failed")
        return records[0] if records else None

    return dnsfunc


def outcome(cv: bytes | None, reason: str, failed: list[str],
            headers: list[list[bytes]] | list[tuple[bytes, bytes]]) -> ARCResult:
    """The result of dkimpy's (cv, reason), a key lookup failure making a failed chain a
    temperror."""
    if cv == dkimpy.CV_Pass:
        sealers = seals(headers)
        latest = max(sealers) if sealers else 0
        return ARCResult("pass", sealers.get(latest, ""), latest, reason)
    if cv == dkimpy.CV_None:
        return ARCResult("none", reason=reason)
    if failed:
        return ARCResult("temperror", reason=reason)
    return ARCResult("fail", reason=str(reason))
