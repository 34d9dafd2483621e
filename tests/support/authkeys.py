"""DKIM keys made by the tests (openssl for RSA, PyNaCl for ed25519), their DNS records, and
signing with dkimpy, extra tags (x=) included."""

from __future__ import annotations

import base64
import re
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import dkim
import nacl.encoding
import nacl.signing


@dataclass(frozen=True)
class Key:
    private: bytes  # what dkim.sign takes
    record: str  # the TXT record
    algorithm: bytes


@cache
def rsa_key(bits: int = 1024) -> Key:
    pem = subprocess.run(["openssl", "genrsa", "-traditional", str(bits)], check=True,
                         capture_output=True).stdout
    der = subprocess.run(["openssl", "rsa", "-RSAPublicKey_out", "-outform", "DER"], input=pem,
                         check=True, capture_output=True).stdout
    # dkimpy reads p= as an RSAPublicKey or a SubjectPublicKeyInfo: the shorter one fits a
    # single TXT string for 1024 bits
    return Key(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode(), b"rsa-sha256")


@cache
def ed25519_key() -> Key:
    signing = nacl.signing.SigningKey.generate()
    private = signing.encode(encoder=nacl.encoding.Base64Encoder)
    public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return Key(private, f"v=DKIM1; k=ed25519; p={public}", b"ed25519-sha256")


def sign(message: bytes, selector: str, domain: str, key: Key,
         canon: tuple[bytes, bytes] = (b"relaxed", b"relaxed"), length: bool = False,
         expire: int | None = None,
         include: tuple[bytes, ...] = (b"from", b"to", b"subject", b"date")) -> bytes:
    """message with a DKIM-Signature on top; expire: x= that many seconds from now."""
    if expire is None:
        field = dkim.sign(message, selector.encode(), domain.encode(), key.private,
                          canonicalize=canon, length=length,
                          signature_algorithm=key.algorithm,
                          include_headers=list(include))
        return field + message
    # dkimpy's sign has no x=: its own header generation, with the tag added
    d = dkim.DKIM(message, signature_algorithm=key.algorithm)
    policy = dkim.CanonicalizationPolicy.from_c_value(b"/".join(canon))
    body_hash = base64.b64encode(dkim.HASH_ALGORITHMS[key.algorithm](
        policy.canonicalize_body(d.body)).digest())
    include = (b"from", b"to", b"subject")
    now = int(time.time())
    if key.algorithm == b"rsa-sha256":
        pk = dkim.parse_pem_private_key(key.private)
    else:
        pk = nacl.signing.SigningKey(key.private, encoder=nacl.encoding.Base64Encoder)
    fields = [(b"v", b"1"), (b"a", key.algorithm), (b"c", policy.to_c_value()),
              (b"d", domain.encode()), (b"s", selector.encode()),
              (b"t", str(now - 7 * 86400).encode()), (b"x", str(now + expire).encode()),
              (b"h", b" : ".join(include)), (b"bh", body_hash), (b"b", b"0" * 60)]
    d.signature_algorithm = key.algorithm
    d.hasher = dkim.HASH_ALGORITHMS[key.algorithm]
    return b"DKIM-Signature: " + d.gen_header(fields, include, policy, b"DKIM-Signature",
                                             pk) + message


def tamper_body(message: bytes) -> bytes:
    head, _, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + body.replace(b"Hello", b"Hullo", 1)


def tamper_header(message: bytes) -> bytes:
    return re.sub(rb"(?m)^Subject: (.*)$", rb"Subject: \1 (changed)", message, count=1)


class _Sealer(dkim.ARC):  # type: ignore[misc]
    """dkimpy's ARC sealing, its ARC-Message-Signature with a chosen c= and l= (dkimpy
    always writes c=relaxed/relaxed and no l=)."""

    canon = (b"relaxed", b"relaxed")
    length = False

    def gen_header(self, fields: list[tuple[bytes, bytes]], include_headers: Any,
                   canon_policy: Any, header_name: bytes, pk: Any,
                   standardize: bool = False) -> bytes:
        if header_name == b"ARC-Message-Signature":
            canon_policy = dkim.CanonicalizationPolicy.from_c_value(b"/".join(self.canon))
            body = canon_policy.canonicalize_body(self.body)
            body_hash = base64.b64encode(self.hasher(body).digest())
            tags = {b"c": b"/".join(self.canon), b"bh": body_hash}
            fields = [(k, tags.get(k, v)) for k, v in fields]
            if self.length:
                fields.insert(-2, (b"l", str(len(body)).encode()))
        value: bytes = super().gen_header(fields, include_headers, canon_policy, header_name,
                                          pk, standardize)
        return value


def seal(message: bytes, selector: str, domain: str, key: Key, cv: str | None = None,
         canon: tuple[bytes, bytes] = (b"relaxed", b"relaxed"), length: bool = False
         ) -> bytes:
    """message with an ARC set on top, by domain, which records what it saw in an
    Authentication-Results (arc=cv when given, as a sealer after the first does)."""
    seen = f"Authentication-Results: {domain}; dkim=pass header.d=signer.test".encode()
    if cv is not None:
        seen += f"; arc={cv}".encode()
    message = seen + b"\r\n" + message
    sealer = _Sealer(message, signature_algorithm=b"rsa-sha256")
    sealer.canon, sealer.length = canon, length
    fields = sealer.sign(selector.encode(), domain.encode(), key.private, domain.encode(),
                         include_headers=sealer.default_sign_headers())
    assert fields, "dkimpy did not seal"
    return b"".join(fields) + message
