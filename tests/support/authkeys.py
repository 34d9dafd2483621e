"""DKIM keys made by the tests (openssl for RSA, PyNaCl for ed25519), their DNS records, and
signing with dkimpy, extra tags (x=) included."""

from __future__ import annotations

import base64
import re
import subprocess
import time
from dataclasses import dataclass
from functools import cache

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
