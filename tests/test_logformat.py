"""Issue 9 point 8: `log.format = "logfmt" | "json"`, the same fields either way.

Two real proxies, one per format, carry the same message to a scripted downstream; their
transaction lines must hold the same keys and values. The formatters are also checked alone
for what a live proxy rarely logs (a traceback, odd characters).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from support.proxy import ProxyProcess, base_config, parse_logfmt
from support.scripted import ScriptedDownstream
from support.smtpclient import send_message

from relayproxy.logformat import JsonFormatter, LogfmtFormatter

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]

BODY = b"Subject: log format\r\n\r\nbody\r\n"


def _deliver(proxy: ProxyProcess) -> None:
    replies = send_message(proxy.host, proxy.port, "a@example.org",
                           ["alice@relay.test", "bob@relay.test"], BODY, helo="client.test")
    assert replies["dot"].code == 250, replies


def _json_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    lines = [line for line in proxy.log_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not one JSON object per line: {line!r}") from None
    return parsed


def test_json_and_logfmt_carry_the_same_fields(scripted: ScriptedFactory,
                                               proxy_factory: ProxyFactory) -> None:
    downstream = scripted()
    logfmt = proxy_factory(base_config(downstream.port, log={"format": "logfmt"}))
    as_json = proxy_factory(base_config(downstream.port, log={"format": "json"}))
    _deliver(logfmt)
    _deliver(as_json)
    [text_tx] = logfmt.wait_for_transactions(1)

    def json_tx() -> list[dict[str, Any]]:
        return [r for r in _json_lines(as_json) if r.get("event") == "transaction"]

    as_json.wait_for_log('"event": "transaction"')
    [record] = json_tx()

    assert list(record) == list(text_tx), (record, text_tx)
    assert record["size"] == len(BODY) and isinstance(record["size"], int)
    varying = {"time", "session", "client", "duration_ms", "reply"}
    for key in text_tx.keys() - varying:
        assert str(record[key]) == text_tx[key], key
    assert record["level"] == "INFO" and record["logger"] == "relayproxy.transaction"
    assert record["from"] == "<a@example.org>"
    assert record["rcpts"] == "<alice@relay.test>=250,<bob@relay.test>=250"
    assert record["outcome"] == "accepted"
    assert record["reply"].startswith("250 ")
    # the other lines: the same time, level, logger, and the text as msg
    listening = [r for r in _json_lines(as_json) if str(r.get("msg", "")).startswith("listening")]
    assert listening and set(listening[0]) == {"time", "level", "logger", "msg"}
    text_lines = [parse_logfmt(line) for line in logfmt.log_text().splitlines()
                  if "listening on" in line]
    assert text_lines and set(text_lines[0]) == {"time", "level", "logger", "msg"}


def _record(msg: str, exc: bool = False, **fields: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("relayproxy.test", logging.ERROR, __file__, 1, msg, None,
                               exc_info)
    if fields:
        record.fields = fields
    return record


def test_formatters_quote_and_keep_tracebacks() -> None:
    record = _record('odd "value" with = and \\ and\nnewline', exc=True)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == 'odd "value" with = and \\ and\nnewline'
    assert "ValueError: boom" in data["exc"]
    first, *rest = LogfmtFormatter().format(record).split("\n")
    # quoted as a JSON string: one line whatever the text holds
    assert first.endswith(" msg=" + json.dumps('odd "value" with = and \\ and\nnewline')), first
    assert rest and "ValueError: boom" in rest[-1]

    fields = _record("ignored", event="transaction", size=3, helo="")
    assert json.loads(JsonFormatter().format(fields))["size"] == 3
    parsed = parse_logfmt(LogfmtFormatter().format(fields))
    assert parsed["event"] == "transaction" and parsed["size"] == "3" and parsed["helo"] == ""
    assert "msg" not in parsed
