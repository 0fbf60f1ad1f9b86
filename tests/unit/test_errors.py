from __future__ import annotations

from cpcoord import errors


def _all(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all(sub))
    return out


def test_every_error_has_message_and_distinct_exit_code() -> None:
    classes = _all(errors.CpcoordError)
    codes = [c.exit_code for c in classes]
    assert len(codes) == len(set(codes)), "exit codes must be distinct"
    for c in classes:
        assert c.__doc__ and c.__doc__.strip(), c
        assert c.exit_code not in (0, 2), c  # 0 success, 2 argparse usage


def test_message_formats_args() -> None:
    e = errors.NoSuchProcess(4242)
    assert str(e) == "no such process: pid 4242"
    assert e.exit_code == 10


def test_exit_codes_doc_lists_every_error() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md").read_text()
    for c in _all(errors.CpcoordError):
        assert f"| {c.exit_code} | `{c.__name__}`" in doc, f"docs/exit-codes.md lacks {c.__name__}"


def test_an_agent_bug_is_reported_with_the_line_of_our_code_it_was_raised_at() -> None:
    from cpcoord.errors import AgentStepFailed
    from nodeagent.daemon import prefetch

    try:
        prefetch.merge(None, None)  # type: ignore[arg-type]  # raises inside prefetch.py
    except AttributeError as e:
        err = AgentStepFailed.of("restore generation 1", e)
    msg = str(err)
    assert msg.startswith("the agent could not restore generation 1: an unexpected ")
    assert "AttributeError at daemon/prefetch.py:" in msg, msg
    assert "None" not in msg  # a place, never a value
