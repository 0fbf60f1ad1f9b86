"""cpcoord.log: logfmt lines, and a handler that never writes to a stream gone stale."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import pytest

from cpcoord import log as cplog


@pytest.fixture
def root_restored() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_record_goes_to_the_stderr_of_the_moment_not_one_closed_since(
    root_restored: logging.Logger,
) -> None:
    # A CLI command run in-process sets logging up while sys.stderr is one stream (a
    # test's capture); a daemon thread logs after that stream was closed.
    first = io.StringIO()
    with contextlib.redirect_stderr(first):
        cplog.setup("info")
    first.close()
    later = io.StringIO()
    with contextlib.redirect_stderr(later):
        cplog.log_event(logging.getLogger("t"), logging.WARNING, "agent disconnected", node="a")
    out = later.getvalue()
    assert "Logging error" not in out
    assert 'msg="agent disconnected"' in out and "node=a" in out and "level=warning" in out


def test_fields_with_spaces_quotes_and_newlines_are_quoted() -> None:
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    rec.fields = {"why": 'a "b"\nc', "n": 3}
    line = cplog.LogfmtFormatter().format(rec)
    assert 'why="a \\"b\\"\\nc"' in line and "n=3" in line and line.startswith("ts=")
