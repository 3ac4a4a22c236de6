"""JSON log lines: fixed fields, the call's bound fields, and nothing else of a record."""

from __future__ import annotations

import io
import json
import logging

import pytest

from protocols.observability.logs import (
    ContextFilter,
    JsonFormatter,
    bind,
    check_log_format,
    setup_logging,
)
from queries.errors import ConfigError


def _logger() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter(node="nwc"))
    logger = logging.getLogger("chc.test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_has_the_fixed_fields_and_only_the_named_extras() -> None:
    """time, level, logger, message; query_id and node; a stray extra is never written."""
    logger, stream = _logger()
    logger.info(
        "query %s released", "q1", extra={"query_id": "q1", "secret": "s3cr3t", "value": 4217}
    )
    (line,) = _lines(stream)
    assert line["level"] == "INFO"
    assert line["logger"] == "chc.test.logs"
    assert line["message"] == "query q1 released"
    assert line["query_id"] == "q1"
    assert line["node"] == "nwc"
    assert str(line["time"]).endswith("+00:00")
    assert "s3cr3t" not in stream.getvalue()
    assert "4217" not in stream.getvalue()
    assert set(line) == {"time", "level", "logger", "message", "query_id", "node"}


def test_bound_fields_reach_every_record_of_the_call_and_extra_wins() -> None:
    """bind() adds the call's fields; a record's own extra is kept over them."""
    logger, stream = _logger()
    with bind(method="Execute", analyst="ada", peer="ipv4:127.0.0.1:5"):
        logger.debug("inside")
        logger.debug("override", extra={"analyst": "bob"})
        with bind(query_id="q9"):
            logger.debug("nested")
    logger.debug("outside")
    inside, override, nested, outside = _lines(stream)
    assert inside["method"] == "Execute"
    assert inside["analyst"] == "ada"
    assert override["analyst"] == "bob"
    assert nested["query_id"] == "q9"
    assert nested["method"] == "Execute"
    assert "method" not in outside
    assert "query_id" not in outside


def test_an_exception_is_one_line_too() -> None:
    """A traceback goes under "exception", and the line stays one JSON object."""
    logger, stream = _logger()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    text = stream.getvalue()
    assert text.count("\n") == 1
    (line,) = _lines(stream)
    assert "RuntimeError: boom" in str(line["exception"])


def test_setup_logging_replaces_only_its_own_handler() -> None:
    """A second call (once the config is read) wins; other handlers are left alone."""
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        setup_logging("INFO", "text")
        first = [h for h in root.handlers if h not in before]
        setup_logging("DEBUG", "json", node="nwc")
        second = [h for h in root.handlers if h not in before]
        assert len(first) == 1
        assert len(second) == 1
        assert isinstance(second[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
        assert all(h in root.handlers for h in before)
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)


def test_log_format_is_text_or_json() -> None:
    """Anything else is refused, naming where it came from."""
    assert check_log_format("json", "x") == "json"
    with pytest.raises(ConfigError, match=r'node.toml: log format must be "text" or "json"'):
        check_log_format("yaml", "node.toml")
