"""Process trees on the agent, pure parts: which mappings name a shared object, who owns
each object in a group (nodeagent/proc/owners.py), what the capture is told
(shared.py end_page, copyout's mapping facts), and finding a process's descendants
(nodeagent/daemon/tree.py) on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from hypothesis import given
from hypothesis import strategies as st

from cpcoord.gen.v1 import manifest_pb2
from cpcoord.mapfacts import MapFact
from nodeagent.capture.copyout import owned_facts
from nodeagent.daemon import tree
from nodeagent.proc import owners
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.shared import SharedObjects

P = 4096


def _m(start: int, perms: str, dev: str, inode: int, path: str) -> Mapping:
    return Mapping(start, start + 4 * P, perms, 0, dev, inode, path)


def test_object_keys() -> None:
    assert owners.key_of(_m(P, "rw-s", "00:01", 7, "/dev/zero (deleted)")) is not None
    assert owners.key_of(_m(P, "rw-s", "00:01", 7, "/memfd:x (deleted)")) is not None
    assert owners.key_of(_m(P, "rw-s", "00:01", 3, "/SYSV00000000 (deleted)")) is not None
    assert owners.key_of(_m(P, "rw-p", "00:00", 0, "")) is None  # private
    assert owners.key_of(_m(P, "rw-s", "00:05", 9, "/dev/dri/card0")) is None  # a device
    assert owners.key_of(_m(P, "r--s", "00:05", 9, "/proc/1/x")) is None
    assert owners.key_of(_m(P, "-w-s", "00:01", 7, "/dev/zero (deleted)")) is None  # unreadable
    # SysV id 7 and shmem inode 7 on one device are different objects.
    a = owners.key_of(_m(P, "rw-s", "00:01", 7, "/SYSV00000000 (deleted)"))
    b = owners.key_of(_m(P, "rw-s", "00:01", 7, "/dev/zero (deleted)"))
    assert a != b


keys = st.tuples(st.just("00:01"), st.integers(1, 6), st.sampled_from(["/dev/zero (deleted)"]))


@given(st.lists(st.frozensets(keys, max_size=6), min_size=1, max_size=5))
def test_every_object_has_one_owner_that_maps_it(objs: list[frozenset]) -> None:
    members = [owners.GroupMaps(f"m{i}", 100 + i * 7 % 11, i == 0, o) for i, o in enumerate(objs)]
    table = owners.assign(members)
    by_name = {g.name: g for g in members}
    every = set().union(*objs)
    for k in every:
        holders = [g for g in members if k in g.objects]
        stored_by = {g.name for g in holders if k not in table[g.name]}
        assert len(stored_by) == 1, (k, stored_by)
        (own,) = stored_by
        assert k in by_name[own].objects
        assert all(table[g.name][k] == own for g in holders if g.name != own)
        # The root stores every object it maps.
        if k in objs[0]:
            assert own == "m0"


def test_owner_is_stable_root_first_then_pid() -> None:
    k = ("00:01", 5, "/dev/zero (deleted)")
    a = owners.GroupMaps("t", 50, True, frozenset({k}))
    b = owners.GroupMaps("t.20", 20, False, frozenset({k}))
    c = owners.GroupMaps("t.30", 30, False, frozenset({k}))
    assert owners.assign([c, b, a]) == {"t": {}, "t.20": {k: "t"}, "t.30": {k: "t"}}
    assert owners.assign([c, b]) == {"t.20": {}, "t.30": {k: "t.20"}}


def test_capture_takes_no_page_of_an_object_a_sibling_owns() -> None:
    m = _m(0x10000, "rw-s", "00:01", 5, "/dev/zero (deleted)")
    other = _m(0x20000, "rw-s", "00:01", 6, "/dev/zero (deleted)")
    pid = 999_999_999  # never opened: the table decides first
    owners.set_elsewhere(pid, {("00:01", 5, "/dev/zero (deleted)"): "t"})
    try:
        with SharedObjects(pid) as objs:
            assert objs.end_page(m) == m.start // P  # the object ends where it starts
            assert objs.end_page(other) == -1  # not owned elsewhere: as before
        f = MapFact(m.start, m.end, m.perms, m.dev, m.inode, 0, m.path)
        g = MapFact(other.start, other.end, other.perms, other.dev, other.inode, 0, other.path)
        ((fo, go),) = owned_facts(pid, [(f, g)])
        assert (fo.owner, go.owner) == ("t", "")
        assert fo.problem() == ""
        back = MapFact.from_proto(
            manifest_pb2.RegionMapping.FromString(fo.to_proto().SerializeToString())
        )
        assert back == fo
    finally:
        owners.clear(pid)
    assert owners.elsewhere(pid) == {}


def test_descendants_of_a_real_tree() -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(30)\n"
        "    time.sleep(30)\n"
        "time.sleep(30)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        found: list[int] = []
        while time.monotonic() < deadline:
            found = tree.descendants(p.pid)
            if len(found) == 2:
                break
            time.sleep(0.02)
        assert len(found) == 2, found
        child, grandchild = found
        assert _ppid(child) == p.pid and _ppid(grandchild) == child
        assert os.getpid() not in found and p.pid not in found
    finally:
        for pid in tree.descendants(p.pid):
            os.kill(pid, 9)
        p.kill()
        p.wait()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])
