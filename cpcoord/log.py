"""Structured logging: logfmt lines (`ts=... level=... logger=... msg=... key=value`).

Call sites pass facts as `extra={"fields": {...}}` or use `log_event`. Never log page
contents, tokens or keys: only sizes, counts, ids and addresses.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


def _quote(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "=\n\t'):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted. A handler bound to
    the stream of the moment outlived it when a CLI command ran in-process (tests, an
    embedding program): a daemon thread that logged later hit a closed file."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:  # setStream and StreamHandler's own __init__
        pass


def setup(level: str = "warning") -> None:
    handler = _Stderr()
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})
