"""The local API's rules (nodeagent.localapi.rules) with a fake backend: arguments, the permission
rule, error replies, and the wire helpers. No socket here: tests/integration/
test_localapi.py runs the server with real processes and a second user."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from cpcoord import errors
from cpcoord.local_wire import MAX_FRAME, decode, encode, read_frame, remote_error
from cpcoord.ranges import PAGE_SIZE
from nodeagent.localapi.rules import (
    Caller,
    LocalApi,
    LocalRestoreResult,
    Membership,
    Registration,
    RestoreRequest,
)
from nodeagent.proc.procfs import ProcessIdentity

ME = ProcessIdentity.of(os.getpid())  # callers are checked against /proc: use ourselves
OTHER = ProcessIdentity(424242, 7)
USER, OTHER_USER = 1000, 1001


@dataclass
class FakeBackend:
    members: dict[ProcessIdentity, Membership] = field(default_factory=dict)
    owners: dict[str, dict[str, int]] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    fail: Exception | None = None

    def membership(self, process: ProcessIdentity) -> Membership | None:
        return self.members.get(process)

    def job_owners(self, job: str) -> Mapping[str, int]:
        return self.owners.get(job, {})

    def register(self, r: Registration) -> Membership:
        if self.fail:
            raise self.fail
        self.calls.append(("register", r.process.pid, r.uid, r.job, r.member, r.regions))
        m = Membership(r.job, r.member, r.uid)
        self.members[r.process] = m
        self.owners.setdefault(r.job, {})[r.member] = r.uid
        return m

    def unregister(self, process: ProcessIdentity, names: Sequence[str]) -> None:
        self.calls.append(("unregister", process.pid, tuple(names)))

    def checkpoint_member(self, process: ProcessIdentity, membership: Membership) -> int:
        self.calls.append(("checkpoint_member", process.pid, membership.job))
        return 7

    def checkpoint_job(self, job: str) -> int:
        self.calls.append(("checkpoint_job", job))
        return 8

    def restore(self, r: RestoreRequest) -> LocalRestoreResult:
        self.calls.append(("restore", r.process.pid, r.names, r.generation))
        m = r.membership
        return LocalRestoreResult(m.job, m.member, r.generation or 3, (("s", 10),))


def identify_other(pid: int) -> tuple[ProcessIdentity, int]:
    assert pid == OTHER.pid
    return OTHER, OTHER_USER


def api(b: FakeBackend) -> LocalApi:
    return LocalApi(b, identify_other)


USER_CALLER = Caller(ME, USER, USER)
ROOT_CALLER = Caller(ME, 0, 0)
ADDR = 0x7F0000000000
REGION: dict[str, Any] = {"name": "state", "addr": ADDR, "size": 3 * PAGE_SIZE + 5}


def reg(**kw: Any) -> dict[str, Any]:
    return {"op": "register", "job": "j", "member": "m", "regions": [REGION], **kw}


def err(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    assert set(reply) == {"ok", "error", "status", "exit_code", "message"}
    return str(reply["error"])


@pytest.mark.parametrize(
    "req",
    [
        reg(pid=OTHER.pid),
        {"op": "unregister", "regions": ["s"], "pid": OTHER.pid},
        {"op": "checkpoint", "pid": OTHER.pid},
        {"op": "restore", "pid": OTHER.pid},
    ],
)
def test_non_root_cannot_name_another_process(req: dict[str, Any]) -> None:
    b = FakeBackend(members={OTHER: Membership("j", "x", USER)})
    reply = api(b).handle(USER_CALLER, req)
    assert err(reply) == "NotPermitted" and reply["status"] == "PERMISSION_DENIED"
    assert reply["exit_code"] == 98 and f"pid {OTHER.pid}" in reply["message"]
    assert b.calls == []


def test_root_may_name_another_process() -> None:
    b = FakeBackend(members={OTHER: Membership("j", "x", OTHER_USER)})
    assert api(b).handle(ROOT_CALLER, {"op": "checkpoint", "pid": OTHER.pid})["generation"] == 7
    r = api(b).handle(ROOT_CALLER, {"op": "restore", "pid": OTHER.pid, "regions": ["s"]})
    assert r["ok"] and r["bytes"] == 10
    assert b.calls == [("checkpoint_member", OTHER.pid, "j"), ("restore", OTHER.pid, ("s",), None)]


def test_naming_yourself_is_fine_and_the_pid_comes_from_the_caller() -> None:
    b = FakeBackend()
    assert api(b).handle(USER_CALLER, reg(pid=ME.pid))["ok"]
    assert api(b).handle(USER_CALLER, {"op": "checkpoint"})["generation"] == 7
    assert [c[:2] for c in b.calls] == [("register", ME.pid), ("checkpoint_member", ME.pid)]
    hello = api(b).handle(USER_CALLER, {"op": "hello", "pid": 1})
    assert hello["pid"] == ME.pid and hello["job"] == "j" and hello["member"] == "m"


def test_register_reports_the_page_rounded_region() -> None:
    reply = api(FakeBackend()).handle(USER_CALLER, reg())
    (r,) = reply["regions"]
    assert r["start"] == REGION["addr"] and r["end"] == REGION["addr"] + 4 * PAGE_SIZE
    assert r["size"] == REGION["size"]


def test_non_root_cannot_take_another_users_member_or_job() -> None:
    b = FakeBackend(owners={"j": {"m": OTHER_USER}, "k": {"x": OTHER_USER}})
    assert err(api(b).handle(USER_CALLER, reg())) == "NotPermitted"  # their member
    r = api(b).handle(USER_CALLER, reg(job="k", member="y"))  # a new member of their job
    assert err(r) == "NotPermitted" and "job k" in r["message"]
    assert b.calls == []
    assert api(b).handle(ROOT_CALLER, reg())["ok"]  # root may


def test_non_root_may_join_its_own_users_job_and_take_over_its_member() -> None:
    b = FakeBackend(owners={"j": {"m": USER, "n": USER}})
    assert api(b).handle(USER_CALLER, reg())["ok"]  # a restart takes over member m
    assert api(b).handle(Caller(ME, USER, USER), reg(member="z"))["ok"] is False  # now m
    fresh = FakeBackend(owners={"j": {"n": USER}})
    assert api(fresh).handle(USER_CALLER, reg())["ok"]


def test_a_member_cannot_register_under_another_name() -> None:
    b = FakeBackend(members={ME: Membership("j", "m", USER)})
    r = api(b).handle(USER_CALLER, reg(member="other"))
    assert err(r) == "InvalidArgument" and "already member m" in r["message"]
    assert api(b).handle(USER_CALLER, {"op": "register", "regions": [REGION]})["ok"]


def test_checkpoint_job_only_of_your_own_job_unless_root() -> None:
    b = FakeBackend(members={ME: Membership("j", "m", USER)})
    assert api(b).handle(USER_CALLER, {"op": "checkpoint", "scope": "job"})["job"] == "j"
    assert api(b).handle(USER_CALLER, {"op": "checkpoint", "scope": "job", "job": "j"})["ok"]
    r = api(b).handle(USER_CALLER, {"op": "checkpoint", "scope": "job", "job": "k"})
    assert err(r) == "NotPermitted" and "checkpoint job k" in r["message"]
    assert api(b).handle(ROOT_CALLER, {"op": "checkpoint", "scope": "job", "job": "k"})["ok"]
    assert b.calls == [("checkpoint_job", "j"), ("checkpoint_job", "j"), ("checkpoint_job", "k")]


def test_not_a_member_yet() -> None:
    b = FakeBackend()
    for req in (
        {"op": "checkpoint"},
        {"op": "checkpoint", "scope": "job"},
        {"op": "restore"},
        {"op": "unregister", "regions": ["s"]},
    ):
        assert err(api(b).handle(USER_CALLER, req)) == "NotAMember"
    r = api(b).handle(USER_CALLER, {"op": "checkpoint", "scope": "job", "job": "j"})
    assert err(r) == "NotPermitted"


@pytest.mark.parametrize(
    ("req", "error"),
    [
        ({"op": "nope"}, "LocalApiError"),
        ({"op": "hello", "v": 2}, "LocalApiError"),
        ({}, "LocalApiError"),
        (reg(regions=[]), "InvalidArgument"),
        (reg(regions=[{**REGION, "addr": REGION["addr"] + 8}]), "InvalidArgument"),
        (reg(regions=[{**REGION, "size": 0}]), "InvalidArgument"),
        (reg(regions=[{**REGION, "addr": 1 << 60}]), "InvalidArgument"),
        (reg(regions=[{**REGION, "name": "../x"}]), "InvalidName"),
        (reg(regions=[{**REGION, "size": "big"}]), "InvalidArgument"),
        (reg(regions=[REGION, {**REGION, "name": "t"}]), "InvalidArgument"),
        (reg(regions=[REGION] * 1025), "InvalidArgument"),
        (reg(job=None), "InvalidArgument"),
        (reg(job="a/b"), "InvalidName"),
        ({"op": "checkpoint", "scope": "world"}, "InvalidArgument"),
        ({"op": "restore", "generation": -1}, "InvalidArgument"),
        ({"op": "restore", "regions": "state"}, "InvalidArgument"),
        ({"op": "unregister"}, "InvalidArgument"),
    ],
)
def test_bad_requests_get_clear_errors(req: dict[str, Any], error: str) -> None:
    b = FakeBackend(members={ME: Membership("j", "m", USER)})
    if req.get("op") == "register":
        b = FakeBackend()
    reply = api(b).handle(USER_CALLER, req)
    assert err(reply) == error, reply
    assert b.calls == []


def test_hex_addresses_are_accepted() -> None:
    r = api(FakeBackend()).handle(USER_CALLER, reg(regions=[{**REGION, "addr": "0x7f0000000000"}]))
    assert r["ok"] and r["regions"][0]["addr"] == 0x7F0000000000


def test_backend_errors_become_replies() -> None:
    b = FakeBackend(fail=errors.DuplicateMember("j", "m"))
    assert err(api(b).handle(USER_CALLER, reg())) == "DuplicateMember"
    b.fail = RuntimeError("boom")
    r = api(b).handle(USER_CALLER, reg())
    assert (
        err(r) == "CpcoordError" and "RuntimeError" in r["message"] and "boom" not in r["message"]
    )


def test_wire_frames_and_errors() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode({"op": "hello"}) + encode({"x": [1, 2]}))
        assert read_frame(b) == {"op": "hello"} and read_frame(b) == {"x": [1, 2]}
        a.sendall((MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(errors.LocalApiError, match="frame length"):
            read_frame(b)
        a.close()
        assert read_frame(b) is None
    with pytest.raises(errors.LocalApiError):
        decode(b"[1]")
    with pytest.raises(errors.LocalApiError):
        decode(b"\xff")
    with pytest.raises(errors.LocalApiError, match="exceeds"):
        encode({"x": "a" * MAX_FRAME})
    e = remote_error({"error": "NotPermitted", "message": "not permitted: x"})
    assert isinstance(e, errors.PermissionDenied) and isinstance(e, errors.NotPermitted)
    assert str(e) == "not permitted: x" and e.exit_code == 98
    unknown = remote_error({"error": "os.system", "message": "m"})
    assert type(unknown) is errors.CpcoordError and str(unknown) == "m"
