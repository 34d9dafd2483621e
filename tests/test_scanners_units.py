"""The scanners' protocol parsing and their configuration, without daemons."""

from __future__ import annotations

import pytest
from support.proxy import check_config

from relayproxy.config import ConfigError, from_dict
from relayproxy.scanners import scanner_checks
from relayproxy.scanners.base import ScanError, header_field
from relayproxy.scanners.clamd import parse_reply as clamd_reply
from relayproxy.scanners.spamd import parse_reply as spamd_reply


def test_clamd_replies() -> None:
    assert clamd_reply(b"stream: OK\0").verdict == "clean"
    found = clamd_reply(b"stream: Eicar-Test-Signature FOUND\0")
    assert (found.verdict, found.virus) == ("infected", "Eicar-Test-Signature")
    # a name goes into a reply and a log line: no spaces or control characters
    assert clamd_reply(b"stream: Bad Name\r\x01 FOUND\0").virus == "Bad_Name__"
    for bad in (b"INSTREAM size limit exceeded. ERROR\0", b"stream: \0", b"garbage\0"):
        with pytest.raises(ScanError) as caught:
            clamd_reply(bad)
        assert caught.value.kind == "protocol"


def test_spamd_replies() -> None:
    spam = spamd_reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 11\r\n"
                       b"Spam: True ; 1004.2 / 5.0\r\n\r\nGTUBE,NO_RELAYS")
    assert (spam.verdict, spam.score, spam.required, spam.symbols) == (
        "spam", 1004.2, 5.0, ("GTUBE", "NO_RELAYS"))
    ham = spamd_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.0 / 5.0\r\n\r\n")
    assert (ham.verdict, ham.score, ham.symbols) == ("clean", 0.0, ())
    for bad in (b"SPAMD/1.1 76 EX_PROTOCOL\r\n\r\n", b"SPAMD/1.1 0 EX_OK\r\n\r\n",
                b"HTTP/1.0 200 OK\r\n\r\n", b"",
                b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; x / y\r\n\r\n"):
        with pytest.raises(ScanError):
            spamd_reply(bad)


def test_header_field_folds_long_symbol_lists() -> None:
    symbols = ",".join(f"SYMBOL_NUMBER_{i}" for i in range(20))
    field = header_field("X-Spam-Status", f"Yes, score=9 required=5 tests={symbols}")
    lines = field.split(b"\r\n")
    assert field.endswith(b"\r\n") and all(len(line) <= 78 for line in lines), lines
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert b"".join(line.lstrip(b"\t") for line in lines) == (
        b"X-Spam-Status: Yes, score=9 required=5 tests=" + symbols.encode())


def test_scanner_config() -> None:
    assert scanner_checks(from_dict({}).scanners) == []
    config = from_dict({"scanners": {"clamd": {"address": "/run/clamav/clamd.ctl"},
                                     "spamd": {"address": "127.0.0.1:783", "action": "tag"}}})
    assert [c.name for c in scanner_checks(config.scanners)] == ["clamd", "spamd"]
    for bad, message in [
        ({"clamd": {"adress": "x"}}, "scanners.clamd.adress: unknown key (did you mean address?)"),
        ({"clam": {}}, "scanners.clam: unknown section"),
        ({"clamd": {"timeout": 0}}, "scanners.clamd.timeout: expected a number > 0"),
        ({"spamd": {"address": "localhost"}}, "scanners.spamd.address: expected host:port"),
        ({"rspamd": {"url": "localhost:11333"}}, "scanners.rspamd.url: expected an http://"),
        ({"spamd": {"action": "drop"}}, "scanners.spamd.action: expected one of reject, tag"),
        ({"clamd": {"on_error": "ignore"}}, "scanners.clamd.on_error: expected one of"),
    ]:
        with pytest.raises(ConfigError) as caught:
            from_dict({"scanners": bad})
        assert str(caught.value).startswith(message), caught.value


def test_a_quoted_dotted_section_is_not_taken_for_a_table() -> None:
    with pytest.raises(ConfigError, match=r"^scanners\.clamd: unknown section"):
        from_dict({"scanners.clamd": {"address": "127.0.0.1:3310"}})


def test_check_config_names_a_bad_scanner_key() -> None:
    result = check_config({"scanners": {"clamd": {"max_bytes": -1}}})
    assert result.returncode == 2, result
    assert "scanners.clamd.max_bytes" in result.stderr, result.stderr
