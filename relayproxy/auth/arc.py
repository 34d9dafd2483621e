"""ARC (RFC 8617) with dkimpy's arc_verify, on a message held whole.

arc_verify needs the whole message (each ARC-Message-Signature hashes the body), so the
chain is verified only for a message that ends within the held window (server.hold_bytes);
a larger one gets no arc result at all (README: "Authentication"). Keys are fetched
beforehand through the async resolver and handed to dkimpy as a table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import dkim as dkimpy

from .dkim import _domain

_ARC_SIGNED = (b"arc-seal", b"arc-message-signature")
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d+)")


@dataclass(frozen=True, slots=True)
class ARCResult:
    result: str  # pass, fail, none
    sealer: str = ""  # d= of the latest ARC-Seal
    instance: int = 0
    reason: str = ""


def seals(fields: list[tuple[bytes, bytes]]) -> dict[int, str]:
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


def verify(message: bytes, keys: dict[str, list[bytes] | None], min_key_bits: int
           ) -> ARCResult:
    """The chain's validation status; keys by record name (None: the lookup failed)."""
    failed: list[str] = []

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = (name.decode("ascii", "replace") if isinstance(name, bytes) else name)
        records = keys.get(text.lower().rstrip("."))
        if records is None:
            failed.append(text)
            raise dkimpy.DnsTimeoutError(f"{text}: lookup failed")
        return records[0] if records else None

    cv, _results, reason = dkimpy.arc_verify(message, dnsfunc=dnsfunc, minkey=min_key_bits)
    sealers = seals(dkimpy.rfc822_parse(message)[0]) if cv == dkimpy.CV_Pass else {}
    latest = max(sealers) if sealers else 0
    if cv == dkimpy.CV_Pass:
        return ARCResult("pass", sealers.get(latest, ""), latest, reason)
    if cv == dkimpy.CV_None:
        return ARCResult("none", reason=reason)
    if failed:
        return ARCResult("temperror", reason=reason)
    return ARCResult("fail", reason=str(reason))
