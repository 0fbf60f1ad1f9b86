"""Where a frozen process has a `syscall` instruction an injection can run from.

Owns: finding the first `0f 05` in the process's vDSO image (from AT_SYSINFO_EHDR in
/proc/PID/auxv and the image's ELF program headers, not from the maps, which can be tens of
thousands of lines), and the per-process cache of found sites (keyed by pid and start
time, so a reused pid never hits; the caller verifies a cached site by reading it back).
Poking an instruction over an executable mapping when there is no vDSO is the injector's
business (it must put the word back).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

SYSCALL_INSN = b"\x0f\x05"
AT_SYSINFO_EHDR = 33  # auxv: where the kernel mapped the vDSO image
PT_LOAD = 1
_MAX_CACHED = 4096  # pids come and go: never let the cache grow without bound

_sites: dict[tuple[int, int], int] = {}


def cached(key: tuple[int, int]) -> int | None:
    """The site found earlier for process `key` (pid, start time), unverified."""
    return _sites.get(key)


def remember(key: tuple[int, int], at: int) -> None:
    if len(_sites) > _MAX_CACHED:
        _sites.clear()
    _sites[key] = at


def vdso_site(pid: int, peek: Callable[[int, int], bytes]) -> int:
    """The address of the first `syscall` in the vDSO image of `pid`, 0 when there is
    none; `peek(addr, n)` reads the target's memory (b"" when it cannot)."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            auxv = f.read()
    except OSError:
        return 0
    base = 0
    for i in range(0, len(auxv) - 15, 16):
        kind, val = struct.unpack_from("<QQ", auxv, i)
        if kind == AT_SYSINFO_EHDR:
            base = val
            break
    head = peek(base, 64) if base else b""
    if len(head) < 64 or head[:4] != b"\x7fELF":
        return 0
    (phoff,) = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    table = peek(base + phoff, phentsize * phnum)
    size = 0
    for k in range(phnum if len(table) == phentsize * phnum else 0):
        (p_type,) = struct.unpack_from("<I", table, k * phentsize)
        (vaddr,) = struct.unpack_from("<Q", table, k * phentsize + 0x10)
        (memsz,) = struct.unpack_from("<Q", table, k * phentsize + 0x28)
        if p_type == PT_LOAD:
            size = max(size, vaddr + memsz)
    at = peek(base, min(size, 1 << 20)).find(SYSCALL_INSN) if size else -1
    return base + at if at >= 0 else 0
