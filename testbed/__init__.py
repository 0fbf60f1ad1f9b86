"""Real parts that tests and benchmarks both start, with no test-only dependency.

- `target.py`: the target program (`python -m testbed.target`): maps memory of several
  kinds (anon, shared, memfd, sysv, file, file-shared) with known page stamps, runs writer
  threads, and obeys JSON commands on stdin (write, zero, dontneed, munmap, mmap, grow,
  mprotect, guard, unlink, writers/stop_writers, threads, churn, read, dump).
- `driver.py`: `Target`, the handle on it: spawn, `cmd(op, **args)`, `mapping(name)`
  (address, pages, id), `expected(name, first, count, counter)` (the bytes a stamped page
  must hold), `read(name)` (what it holds now), `assert_running()` (no thread in t/T and
  it answers).
- `patterns.py`: the page stamps and `check_writer`, which proves captured writer pages
  equal the memory of one instant although the writers never paused.
- `daemons.py`: `Daemon` (a subprocess with a log), `daemon_env`, `wait_for`.
- `cluster.py`: `InProcessCoordinator` and `Cluster` (coordinator and agents as daemons).
- `stores.py`: open or list a coordinator's store, a directory or S3.
- `seaweed.py`: a real SeaweedFS S3 server on loopback.

The pytest fixtures over these live in tests/helpers/ (fixtures, cluster, stores, seaweed);
`bench/` imports only this package, so `pip install -e '.[bench]'` needs no pytest.
"""
