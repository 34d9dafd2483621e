"""SMTP smuggling (CVE-2023-51764 class) test data, shared by the DotReader unit tests and
the end-to-end protocol tests."""

from __future__ import annotations

# The smuggling variants (the "end of data" a lenient downstream might accept), as in
# chasquid's and Postfix's smuggling write-ups.
SMUGGLING_VARIANTS: dict[str, bytes] = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.CR": b"\r\n.\r",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "LF.CR": b"\n.\r",
}

# The second transaction hidden behind a variant: commands, then a complete message (with
# From/To, so a downstream that fell for it would deliver it as is).
SMUGGLED = (
    b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@relay.test>\r\nDATA\r\n"
    b"From: evil@example.org\r\nTo: bob@relay.test\r\nSubject: smuggled\r\n\r\nsmuggled body"
)

__all__ = ["SMUGGLED", "SMUGGLING_VARIANTS"]
