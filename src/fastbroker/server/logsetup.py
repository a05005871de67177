"""Logging of the ``fastbroker`` command: -v/-vv levels, text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Dict, Optional, TextIO

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def level_for(verbose: int) -> int:
    """0: warnings and errors; 1 (-v): info, one line per broker event; 2+ (-vv): debug."""
    return logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the
    fields the record got through ``extra=`` (e.g. event, worker, request_id,
    attempts), and exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: Dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra value JSON cannot carry still gives a valid line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(verbose: int = 0, log_format: str = "text", stream: Optional[TextIO] = None) -> logging.Handler:
    """Configure the root logger once for the command: a handler on `stream`
    (default stderr) at the level of `verbose`, in `log_format` ("text" or "json").
    Replaces the handlers set up by an earlier call; returns the new handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_fastbroker", False):
            root.removeHandler(old)
    handler._fastbroker = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level_for(verbose))
    return handler


__all__ = ["JsonFormatter", "LOG_FORMATS", "level_for", "setup_logging"]
