"""Logging set-up with a filter that redacts every secret from every record (tracebacks too).

`fmt="json"` (DIALOGBOT_LOG_FORMAT=json) writes one JSON object a line with `platform` and
`channel` on every line: the pipeline sets them per event with `log_context` (contextvars, so
each event's task has its own); lines logged outside an event carry null.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import datetime, timezone

REDACTED = "[REDACTED]"
_platform: ContextVar[str | None] = ContextVar("dialogbot_log_platform", default=None)
_channel: ContextVar[str | None] = ContextVar("dialogbot_log_channel", default=None)


@contextlib.contextmanager
def log_context(platform: str | None, channel: str | None) -> Iterator[None]:
    """Every line logged inside (in this task or thread) carries this platform and channel."""
    tokens = (_platform.set(platform), _channel.set(channel))
    try:
        yield
    finally:
        _platform.reset(tokens[0])
        _channel.reset(tokens[1])


class ContextFilter(logging.Filter):
    """Puts the current `log_context` on the record as `platform` and `channel`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.platform = _platform.get()
        record.channel = _channel.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, platform, channel[, exc]."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "platform": getattr(record, "platform", None),
            "channel": getattr(record, "channel", None),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


class RedactingFilter(logging.Filter):
    """Replaces each secret (and its URL-encoded form) in message, args and exception text."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        from urllib.parse import quote

        values = {s for s in secrets if s and len(s) >= 6}
        values |= {quote(s, safe="") for s in values}
        self._pattern = (re.compile("|".join(re.escape(v) for v in sorted(values, key=len,
                                                                                reverse=True)))
                         if values else None)

    def redact(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text) if self._pattern else text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what we can
            message = str(record.msg)
        record.msg, record.args = self.redact(message), None
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = self.redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def setup_logging(level: str = "INFO", secrets: Iterable[str] = (),
                  fmt: str = "text") -> RedactingFilter:
    """Route every logger (ours and the libraries') through one redacting stderr handler,
    as text lines or (fmt="json") JSON lines."""
    redactor = RedactingFilter(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(redactor)
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "discord.gateway", "aiosqlite",
                  "telegram.ext.Updater", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.captureWarnings(True)
    return redactor
