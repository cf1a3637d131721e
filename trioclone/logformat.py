"""How log records are written: human-readable text or JSON lines.

``text`` (the default) is one line per record: the time, the server's role
in brackets for one side of a pair, the logger, the level and the message.
``json`` is one JSON object per line with ``time`` (ISO 8601, UTC), ``level``,
``logger``, ``message``, ``server`` (standalone, primary, backup or pair;
absent for the client commands) and ``exception`` (the traceback) when a
record carries one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")


class JsonLines(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, server: str | None = None) -> None:
        super().__init__()
        self.server = server

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.server is not None:
            line["server"] = self.server
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(form: str, server: str | None, tag: str | None) -> logging.Formatter:
    """The formatter for ``form``; ``tag`` marks text lines (a pair's role)."""
    if form == "json":
        return JsonLines(server)
    if form != "text":
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    shown = f" [{tag}]" if tag else ""
    return logging.Formatter(f"%(asctime)s{shown} %(name)s %(levelname)s %(message)s")


def configure(level: str, form: str, server: str | None, tag: str | None) -> None:
    """Log to stderr at ``level`` in ``form`` (as ``logging.basicConfig``:
    nothing changes if the root logger has handlers already)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(form, server, tag))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
