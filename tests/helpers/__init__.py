"""Test helpers: pytest fixtures and test-only tools over the real parts in testbed/.

The target program, its driver, clusters, stores and the SeaweedFS server are in
testbed/ (benchmarks use them too, without pytest). Here: the fixtures registered for
every test by tests/conftest.py (`fixtures.py`: `target_factory`, `target`;
`cluster.py`: `inproc`, `cluster_factory`; `stores.py`: `store_select`; `seaweed.py`:
`seaweed`, `seaweed_private`; `etcd.py`: `etcd`), and helpers only tests need (C targets
`restore_c.py`/`freeze_c.py`, network namespaces, replicas, Slurm, fake agents, ...).

Example (a tracker test):

    def test_x(target_factory):
        t = target_factory(maps=["hot:256", "cold:64"], writers=["hot:4"])
        t.cmd("write", name="cold", page=3, count=2, counter=7)  # known change
        t.cmd("stop_writers")                                    # deterministic state
        assert (t.read("cold")[3:5] == t.expected("cold", 3, 2, counter=7)).all()
"""
