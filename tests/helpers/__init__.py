"""Test helpers shared by the capture, tracker and restore tests.

- `target.py`: the target program (`python -m tests.helpers.target`): maps memory of
  several kinds (anon, shared, memfd, sysv, file, file-shared) with known page stamps,
  runs writer threads, and obeys JSON commands on stdin (write, zero, dontneed, munmap,
  mmap, grow, mprotect, guard, unlink, writers/stop_writers, threads, churn, read, dump).
- `driver.py`: `Target`, the test-side handle: spawn, `cmd(op, **args)`, `mapping(name)`
  (address, pages, id), `expected(name, first, count, counter)` (the bytes a stamped page
  must hold), `read(name)` (what it holds now), `assert_running()` (no thread in t/T and
  it answers).
- `patterns.py`: the page stamps and `check_writer`, which proves captured writer pages
  equal the memory of one instant although the writers never paused.
- `fixtures.py`: pytest fixtures `target_factory(**Target kwargs)` and `target`,
  registered for every test by tests/conftest.py.

Example (a tracker test):

    def test_x(target_factory):
        t = target_factory(maps=["hot:256", "cold:64"], writers=["hot:4"])
        t.cmd("write", name="cold", page=3, count=2, counter=7)  # known change
        t.cmd("stop_writers")                                    # deterministic state
        assert (t.read("cold")[3:5] == t.expected("cold", 3, 2, counter=7)).all()
"""
