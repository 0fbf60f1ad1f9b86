"""cpcoord.grpcutil without a server: error details from agents become our classes, and
the options and flags are what the daemons rely on. The round trip of every error class
through a real gRPC server: tests/integration/test_grpcutil.py.
"""

from __future__ import annotations

import pytest

from cpcoord import errors
from cpcoord.grpcopts import MAX_MESSAGE_BYTES, channel_options, insecure_requested, server_options
from cpcoord.grpcutil import from_error_detail


def test_error_details_from_agents() -> None:
    e = from_error_detail("NoSuchProcess", "no such process: pid 4242", "NOT_FOUND")
    assert type(e) is errors.NoSuchProcess and str(e) == "no such process: pid 4242"
    u = from_error_detail("SomethingNew", "it broke", "INTERNAL")
    assert isinstance(u, errors.RemoteError) and "it broke" in str(u)


def test_options_and_insecure_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    c, s = dict(channel_options()), dict(server_options())
    for d in (c, s):
        assert d["grpc.max_send_message_length"] == MAX_MESSAGE_BYTES
        assert d["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES
    assert s["grpc.so_reuseport"] == 0
    monkeypatch.delenv("CPCOORD_INSECURE", raising=False)
    assert insecure_requested(True) and not insecure_requested(False)
    monkeypatch.setenv("CPCOORD_INSECURE", "1")
    assert insecure_requested(False)
