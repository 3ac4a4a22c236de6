"""Log lines for people (text) or for a log pipeline (one JSON object per line).

A JSON line always has time, level, logger and message; it has query_id, analyst, node,
method, peer, code and duration_ms where the record carries them, from `extra=` or from the
call being served (bind, which the gRPC interceptor uses). Nothing else of a record is
copied: a field reaches the log only if it is named here, so an `extra=` can never carry a
secret or an exact value into it by accident.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

from queries.errors import ConfigError

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

# The only record attributes a JSON line carries besides time, level, logger and message.
FIELDS = ("query_id", "analyst", "node", "method", "peer", "code", "duration_ms")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "chc-stderr"

_bound: ContextVar[dict[str, object] | None] = ContextVar("chc_log_fields", default=None)


@contextmanager
def bind(**fields: object) -> Iterator[None]:
    """Add fields (of FIELDS) to every record logged in this context (one gRPC call)."""
    previous = _bound.get()
    token = _bound.set({**(previous or {}), **fields})
    try:
        yield
    finally:
        _bound.reset(token)


class ContextFilter(logging.Filter):
    """Puts the bound fields, and the process's own (e.g. node = its name), on each record.

    A field the record already has (from `extra=`) is kept: the call site knows best.
    """

    def __init__(self, **process_fields: object) -> None:
        super().__init__()
        self.process_fields = process_fields

    def filter(self, record: logging.LogRecord) -> bool:
        """Always True: this filter only adds fields."""
        for source in (_bound.get() or {}, self.process_fields):
            for key, value in source.items():
                if key in FIELDS and not hasattr(record, key):
                    setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, FIELDS."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (a traceback, if any, under "exception")."""
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None and value != "":
                line[key] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def check_log_format(value: object, source: str) -> LogFormat:
    """value if it is a log format ("text" or "json"), else a ConfigError naming source."""
    for fmt in LOG_FORMATS:
        if value == fmt:
            return fmt
    raise ConfigError(f'{source}: log format must be "text" or "json", not {str(value)[:40]!r}')


def setup_logging(
    level: str = "INFO", fmt: LogFormat = "text", **process_fields: object
) -> logging.Handler:
    """Log to stderr at level, as text or JSON lines; returns the handler it installed.

    Replaces the handler an earlier call installed (a second call, e.g. once the config is
    read, wins) and leaves any other alone. process_fields (such as node="nwc") go on every
    record.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter(**process_fields))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler
