"""The ptrace thread (nodeagent/daemon/worker.py) when a member's tracker cannot be
released at detach (the process cannot be frozen then): the detach says so (an error
result, the member is gone from the agent anyway), the record of the fd stays, and the
agent's shutdown closes the userfaultfd. Real target, no gRPC (the Rig of
tests/integration/test_agent_worker.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cpcoord.errors import FreezeFailed
from nodeagent.daemon import tracking
from nodeagent.daemon.worker_ops import DetachOp
from nodeagent.trackers import uffd_avail
from tests.conftest import require
from tests.helpers.traceless import userfaultfds
from tests.integration.test_agent_worker import JOB, Rig

pytestmark = pytest.mark.integration


def test_a_failed_release_is_reported_and_retried_at_shutdown(
    target_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    avail = uffd_avail.availability()
    require(avail.available, f"uffd-wp: {avail.reason}")
    monkeypatch.setenv("CPCOORD_RUN_DIR", str(tmp_path / "run"))
    t = target_factory(maps=["data:16"])
    rig = Rig()
    try:
        res = rig.attach(t, maps=("data",), tracker="uffd-wp")
        assert not res.HasField("error"), res.error
        rig.checkpoint(1)
        assert len(userfaultfds(t.pid)) == 1

        def cannot_freeze(*a: object, **kw: object) -> Any:
            raise FreezeFailed(t.pid, "injected: it cannot be frozen now")

        with monkeypatch.context() as m:
            m.setattr(tracking, "frozen", cannot_freeze)
            rig.cid += 1
            cid = rig.cid
            rig.worker.submit(DetachOp(cid, JOB, "m0", 0))
            r = rig.wait("result", lambda r: r.command_id == cid)
        assert r.HasField("error") and "cannot be frozen" in r.error.message, r
        assert rig.members.get(JOB, "m0") is None  # detached all the same
        assert len(userfaultfds(t.pid)) == 1
        assert len(list((tmp_path / "run" / "armed").glob("*.json"))) == 1
    finally:
        rig.close()  # the worker's shutdown sweeps this agent's failed releases
    assert userfaultfds(t.pid) == []
    assert not list((tmp_path / "run" / "armed").glob("*.json"))
    t.assert_running()
