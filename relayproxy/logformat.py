"""The log line formats (`log.format`): logfmt or JSON, one line per record, the same fields.

Every line has time, level and logger; a record that carries structured fields (the
transaction record: `extra={"fields": {...}}`) has them as its own keys, any other record has
its text as msg. A traceback goes in exc (JSON) or follows the line (logfmt, as it always did).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["logfmt", "json"]


def logfmt_value(value: object) -> str:
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """time, level, logger, then the record's own fields (or msg)."""
    when = datetime.fromtimestamp(record.created, UTC)
    result: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record.levelname,
        "logger": record.name,
    }
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        result.update(fields)
    else:
        result["msg"] = record.getMessage()
    return result


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = " ".join(f"{k}={logfmt_value(v)}" for k, v in record_fields(record).items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = record_fields(record)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(
            {k: v if isinstance(v, str | int | float) else str(v) for k, v in data.items()},
            ensure_ascii=False)


def setup_logging(level: str, fmt: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
