"""A target process for capture and tracker tests: `python -m testbed.target`.

It maps memory with known contents (testbed/patterns.py), runs writer threads that
keep stamping their pages, and obeys JSON commands, one per line on stdin, answering one
JSON line on stdout ({"ok": true, ...} or {"error": "..."}). Drive it with
testbed.driver.Target, not by hand.

Start-up arguments (each repeatable):
  --map NAME:PAGES[:KIND[:FILL]]   KIND anon (default) | shared | memfd | sysv | file |
                                   file-shared; FILL stamp (default) | zero | none |
                                   random:SEED
  --writers NAME:COUNT             COUNT writer threads over mapping NAME's pages
  --thp                            madvise(MADV_HUGEPAGE) every anonymous mapping
  --tmpdir DIR                     where file-backed mappings keep their files

Commands (op and arguments; `name` is a mapping, pages count from its start):
  ping | info | exit {code}
  mmap {name, pages, kind, fill}        munmap {name, page, count}
  mprotect {name, page, count, prot}    prot: none | r | rw
  guard {name, page, count}             MADV_GUARD_INSTALL (guard pages inside a mapping)
  dontneed {name, page, count}          MADV_DONTNEED: anonymous pages become non-present
  pageout {name, page, count}           MADV_PAGEOUT: pages go to swap (if there is swap)
  write {name, page, count, counter}    stamp pages with counter
  child_write {name, page, count, counter}  the same, by a forked child (shared mappings:
                                        another process writes, this one's tables unchanged)
  zero {name, page, count}              fill pages with zeros (they stay present)
  grow {name, pages}                    mremap to PAGES (may move); new pages stamped 0
  unlink {name}                         delete a file-backed mapping's file
  writers {name, count} / stop_writers  start writers / stop them, answer their steps
  threads {count}                       idle threads;  churn {on}  short-lived threads
  fork                                  a child that shares every page copy-on-write and
                                        waits until this process exits; answers its pid
  read {name, page, count}              page bytes, hex;  dump {name, path} bytes to a file
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from testbed import patterns

PAGE = patterns.PAGE
PROT = {"none": 0, "r": 1, "rw": 3}
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MREMAP_MAYMOVE = 1
MADV_DONTNEED, MADV_PAGEOUT, MADV_HUGEPAGE, MADV_GUARD_INSTALL = 4, 21, 14, 102
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


def _check(ret: Any, what: str) -> Any:
    if ret in (-1, MAP_FAILED, None):
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


@dataclass
class Region:
    id: int
    name: str
    kind: str
    addr: int
    pages: int
    path: str = ""
    fd: int = -1


@dataclass
class Writer:
    thread: threading.Thread
    first: int
    per: int
    steps: list[int] = field(default_factory=lambda: [0])


class TargetState:
    def __init__(self, tmpdir: str, thp: bool) -> None:
        self.tmpdir = tmpdir
        self.thp = thp
        self.regions: dict[str, Region] = {}
        self.writers: list[Writer] = []
        self.stop = threading.Event()
        self.idle = threading.Event()
        self.churn_on = threading.Event()
        self.extra_threads: list[threading.Thread] = []
        self.fork_pipes: list[int] = []

    def words(self, r: Region) -> np.ndarray:
        buf = (ctypes.c_uint64 * (r.pages * patterns.WORDS)).from_address(r.addr)
        return np.ctypeslib.as_array(buf).reshape(r.pages, patterns.WORDS)

    def fill(self, r: Region, first: int, count: int, how: str) -> None:
        w = self.words(r)[first : first + count]
        if how == "stamp":
            w[:] = patterns.stamped(r.id, first, count, 0)
        elif how == "zero":
            w[:] = 0
        elif how.startswith("random:"):
            w[:] = patterns.random_pages(int(how.split(":", 1)[1]), first, count)
        elif how != "none":
            raise ValueError(f"unknown fill {how!r}")

    def mmap(self, name: str, pages: int, kind: str = "anon", fill: str = "stamp") -> Region:
        if name in self.regions:
            raise ValueError(f"mapping {name} exists")
        size = pages * PAGE
        path, fd = "", -1
        prot = PROT["rw"]
        if kind in ("anon", "shared"):
            flags = MAP_ANONYMOUS | (MAP_PRIVATE if kind == "anon" else MAP_SHARED)
            addr = _check(libc.mmap(None, size, prot, flags, -1, 0), "mmap")
        elif kind == "memfd":
            fd = os.memfd_create(f"cpt-{name}")
            os.ftruncate(fd, size)
            addr = _check(libc.mmap(None, size, prot, MAP_SHARED, fd, 0), "mmap")
        elif kind in ("file", "file-shared"):
            fd, path = tempfile.mkstemp(prefix=f"cpt-{name}-", dir=self.tmpdir)
            os.ftruncate(fd, size)
            flags = MAP_PRIVATE if kind == "file" else MAP_SHARED
            addr = _check(libc.mmap(None, size, prot, flags, fd, 0), "mmap")
        elif kind == "sysv":
            shmid = _check(libc.shmget(IPC_PRIVATE, size, IPC_CREAT | 0o600), "shmget")
            addr = _check(libc.shmat(shmid, None, 0), "shmat")
            libc.shmctl(shmid, IPC_RMID, None)  # gone with the last detach
        else:
            raise ValueError(f"unknown kind {kind!r}")
        if self.thp and kind == "anon":
            libc.madvise(addr, size, MADV_HUGEPAGE)
        r = Region(len(self.regions) + 1, name, kind, addr, pages, path, fd)
        self.regions[name] = r
        self.fill(r, 0, pages, fill)
        return r

    def span(self, a: dict[str, Any]) -> tuple[Region, int, int]:
        r = self.regions[a["name"]]
        page, count = int(a.get("page", 0)), int(a.get("count", r.pages - int(a.get("page", 0))))
        if page < 0 or count < 0 or page + count > r.pages:
            raise ValueError(f"pages {page}+{count} outside mapping {r.name} ({r.pages})")
        return r, r.addr + page * PAGE, count * PAGE

    def writer_loop(self, view: np.ndarray, first: int, per: int, steps: list[int]) -> None:
        s = 0
        while not self.stop.is_set():
            s += 1
            view[first + (s - 1) % per, 1::2] = s
            steps[0] = s

    def start_writers(self, name: str, count: int) -> None:
        if self.writers:
            raise ValueError("writers already running")
        r = self.regions[name]
        per = r.pages // count
        if per < 1:
            raise ValueError("fewer pages than writers")
        view = self.words(r)
        self.stop.clear()
        for i in range(count):
            steps = [0]
            thread = threading.Thread(
                target=self.writer_loop, args=(view, i * per, per, steps), daemon=True
            )
            self.writers.append(Writer(thread, i * per, per, steps))
        for w in self.writers:
            w.thread.start()

    def stop_writers(self) -> list[dict[str, int]]:
        self.stop.set()
        for w in self.writers:
            w.thread.join()
        out = [{"first": w.first, "per": w.per, "steps": w.steps[0]} for w in self.writers]
        self.writers = []
        return out

    def churn(self) -> None:
        while self.churn_on.is_set():
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "tids": sorted(int(t) for t in os.listdir("/proc/self/task")),
            "mappings": {
                r.name: {
                    "id": r.id,
                    "kind": r.kind,
                    "addr": r.addr,
                    "pages": r.pages,
                    "path": r.path,
                }
                for r in self.regions.values()
            },
            "writers": [{"first": w.first, "per": w.per} for w in self.writers],
        }

    def handle(self, a: dict[str, Any]) -> dict[str, Any]:
        op = a.get("op")
        if op == "ping":
            return {}
        if op == "info":
            return self.info()
        if op == "exit":
            sys.stdout.flush()
            os._exit(int(a.get("code", 0)))
        if op == "mmap":
            r = self.mmap(a["name"], int(a["pages"]), a.get("kind", "anon"), a.get("fill", "stamp"))
            return {"addr": r.addr, "id": r.id}
        if op in ("munmap", "mprotect", "guard", "dontneed", "pageout"):
            r, addr, size = self.span(a)
            if op == "munmap":
                _check(libc.munmap(addr, size), "munmap")
                if size == r.pages * PAGE:
                    del self.regions[r.name]
            elif op == "mprotect":
                _check(libc.mprotect(addr, size, PROT[a["prot"]]), "mprotect")
            else:
                adv = {"guard": MADV_GUARD_INSTALL, "dontneed": MADV_DONTNEED}.get(op, MADV_PAGEOUT)
                _check(libc.madvise(addr, size, adv), "madvise")
            return {}
        if op in ("write", "zero"):
            r, addr, size = self.span(a)
            first = (addr - r.addr) // PAGE
            if op == "zero":
                self.fill(r, first, size // PAGE, "zero")
            else:
                counter = int(a.get("counter", 0))
                self.words(r)[first : first + size // PAGE] = patterns.stamped(
                    r.id, first, size // PAGE, counter
                )
            return {}
        if op == "fork":
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # holds the memory shared; ends when the parent is gone (EOF)
                os.close(wfd)
                os.read(rfd, 1)
                os._exit(0)
            os.close(rfd)
            self.fork_pipes.append(wfd)  # kept open for the parent's lifetime
            return {"child": pid}
        if op == "child_write":
            r, addr, size = self.span(a)
            first = (addr - r.addr) // PAGE
            src = patterns.stamped(r.id, first, size // PAGE, int(a.get("counter", 0)))
            pid = os.fork()
            if pid == 0:  # as little as possible here: a copy, and out
                ctypes.memmove(addr, src.ctypes.data, size)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise RuntimeError(f"child writer ended with status {status:#x}")
            return {}
        if op == "grow":
            r = self.regions[a["name"]]
            new = int(a["pages"])
            addr = _check(libc.mremap(r.addr, r.pages * PAGE, new * PAGE, MREMAP_MAYMOVE), "mremap")
            old, r.addr, r.pages = r.pages, addr, new
            if new > old:
                self.fill(r, old, new - old, "stamp")
            return {"addr": addr}
        if op == "unlink":
            os.unlink(self.regions[a["name"]].path)
            return {}
        if op == "writers":
            self.start_writers(a["name"], int(a["count"]))
            return {"writers": [{"first": w.first, "per": w.per} for w in self.writers]}
        if op == "stop_writers":
            return {"writers": self.stop_writers()}
        if op == "threads":
            for _ in range(int(a["count"])):
                t = threading.Thread(target=self.idle.wait, daemon=True)
                t.start()
                self.extra_threads.append(t)
            return {}
        if op == "churn":
            if a.get("on", True) and not self.churn_on.is_set():
                self.churn_on.set()
                threading.Thread(target=self.churn, daemon=True).start()
            elif not a.get("on", True):
                self.churn_on.clear()
            return {}
        if op == "read":
            r, addr, size = self.span(a)
            return {"hex": ctypes.string_at(addr, size).hex()}
        if op == "dump":
            r, addr, size = self.span(a)
            with open(a["path"], "wb") as f:
                f.write(ctypes.string_at(addr, size))
            return {}
        raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="target")
    p.add_argument("--map", action="append", default=[])
    p.add_argument("--writers", action="append", default=[])
    p.add_argument("--thp", action="store_true")
    p.add_argument("--tmpdir", default=tempfile.gettempdir())
    args = p.parse_args(argv)
    sys.setswitchinterval(0.001)  # commands stay responsive while writers spin
    st = TargetState(args.tmpdir, args.thp)
    for spec in args.map:
        parts = spec.split(":")
        fill = ":".join(parts[3:]) if len(parts) > 3 else "stamp"
        st.mmap(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "anon", fill)
    for spec in args.writers:
        name, count = spec.split(":")
        st.start_writers(name, int(count))
    out = sys.stdout
    out.write(json.dumps({"ok": True, **st.info()}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = {"ok": True, **st.handle(json.loads(line))}
        except Exception as e:  # every failure goes back to the test as data
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
