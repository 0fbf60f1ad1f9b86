"""Run a command inside a qemu guest booted from a stock distribution kernel.

Why: this machine's kernel lacks features some trackers need (soft-dirty), so those tests
run under Debian's stock kernel instead, emulated with TCG (no KVM needed). The guest sees
the host's root file system read-only over virtio-9p, with a tmpfs overlay on top so the
command may write anywhere (writes vanish with the guest); the repository, Python and its
packages are therefore at the same paths as on the host.

Boot: a tiny initramfs (busybox + the kernel modules that 9p/overlay need, built by
tests/kernel/vmimage.py, cached under tests/kernel/.build/) runs `init`, which loads the
modules, mounts the host root and the overlay, mounts proc/sys/dev/tmp/run, runs the
command in a chroot and prints `<nonce> rc=<exit code>` on the serial console, then powers
off. The host reads the console log: qemu itself always exits 0, so the marker (with a
per-run nonce the command cannot guess) is the only trustworthy exit status. The harness
itself exits 250 (cannot cd to cwd), 251 (9p mount failed) or 252 (run script missing).

Speed (TCG, measured here): boot to the command ~5-10 s; Python runs ~25x slower than on
the host, so `python3 -c pass` takes ~3 s and importing hypothesis ~30 s (load pytest
with `-p no:hypothesispytest` when the tests do not use it).

Entry point: `run_in_guest(cmd, timeout)` → GuestResult. `unavailable_reason()` says why a
guest cannot be started here (no qemu, no suitable kernel, no busybox).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.kernel.vmimage import (
    REQUIRED_CONFIG,
    GuestKernel,
    boot_image,
    build_initramfs,
    find_busybox,
    find_kernel,
)

REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
GUEST_ENV_FLAG = "CPCOORD_IN_GUEST"


@dataclass(frozen=True)
class GuestResult:
    """What a guest run produced. exit_code is None when no marker was seen (timeout,
    kernel panic, init failure); `output` is the whole serial console log."""

    exit_code: int | None
    output: str
    duration: float
    timed_out: bool
    kernel: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def describe(self, tail: int = 200) -> str:
        """A failure message: the exit status and the last `tail` lines of the console."""
        lines = self.output.splitlines()
        shown = "\n".join(lines[-tail:])
        status = "timed out" if self.timed_out else f"exit code {self.exit_code}"
        return (
            f"guest ({self.kernel}) {status} after {self.duration:.1f}s; "
            f"console (last {min(tail, len(lines))} lines):\n{shown}"
        )


# -- host prerequisites ---------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why a guest cannot be booted here, or None when it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (Debian package qemu-system-x86)"
    if find_kernel() is None:
        return (
            "no /boot/vmlinuz-* with " + ", ".join(REQUIRED_CONFIG) + " and its modules "
            "(Debian package linux-image-amd64)"
        )
    if find_busybox() is None:
        return "no static busybox (Debian package busybox-static)"
    return None


# -- running --------------------------------------------------------------------------


def _run_script(cmd: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    exports = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    return (
        f"cd {shlex.quote(str(cwd))} || exit 250\n"
        f"exec env -i {exports} {' '.join(shlex.quote(c) for c in cmd)}\n"
    )


def guest_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's environment: a clean one, with this Python first on PATH, bytecode
    writing off (the host tree is read-only below the overlay anyway) and CI passed on."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:"
        "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PY_COLORS": "0",  # the console is a tty; logs should stay plain text
        GUEST_ENV_FLAG: "1",
    }
    for k in ("CI",):
        if k in os.environ:
            env[k] = os.environ[k]
    env.update(extra or {})
    return env


def exit_code_from(console: str, nonce: str) -> int | None:
    """The command's exit code from the init's marker line, None without a marker. Only
    a whole line `<nonce> rc=N` counts, so output that merely mentions it cannot fake one."""
    m = re.search(rf"^{re.escape(nonce)} rc=(\d+)\r?$", console, re.MULTILINE)
    return None if m is None else int(m.group(1))


def run_in_guest(
    cmd: Sequence[str],
    timeout: float,
    *,
    cwd: Path | str = REPO,
    env: Mapping[str, str] | None = None,
    memory_mb: int = 2048,
    cpus: int = 2,
    kernel: GuestKernel | None = None,
    overlay: bool = True,
) -> GuestResult:
    """Boot a guest, run `cmd` in `cwd` (a host path, seen at the same path inside) with
    guest_env(env), and return its exit code and console output. With `overlay` (the
    default) the root is writable, writes landing in guest memory; without it the host
    root is mounted read-only as it is (about 10% faster file access).

    `timeout` covers boot, command and power-off; on expiry qemu is killed and the result
    has timed_out=True and exit_code None. Raises RuntimeError when no guest can be
    started here (see unavailable_reason)."""
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(why)
    kernel = kernel or find_kernel()
    assert kernel is not None
    initramfs = build_initramfs(kernel)
    image = boot_image(kernel)
    nonce = "cpcoord-guest-" + secrets.token_hex(8)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cpcoord-guest-") as td:
        run_dir = Path(td).resolve()
        if any(c.isspace() for c in str(run_dir)):
            raise RuntimeError(f"temporary directory {run_dir} has spaces: kernel cmdline")
        script = run_dir / "run.sh"
        script.write_text(_run_script(cmd, Path(cwd).resolve(), guest_env(env)))
        console = run_dir / "console.log"
        append = (
            f"console=ttyS0 quiet loglevel=3 panic=-1 random.trust_cpu=on "
            f"rdinit=/init cpcoord.run={script} cpcoord.nonce={nonce}"
            + ("" if overlay else " cpcoord.overlay=0")
        )
        argv = [
            QEMU, "-accel", "tcg", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(image), "-initrd", str(initramfs), "-append", append,
            "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
            "-fsdev", "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=r,mount_tag=hostroot",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        timed_out = False
        try:
            qemu_out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:  # timeout, or we were interrupted: never leave qemu
                proc.kill()
                qemu_out, _ = proc.communicate()
        duration = time.monotonic() - started
        output = console.read_text(errors="replace") if console.exists() else ""
    if qemu_out.strip():
        output += "\n[qemu] " + qemu_out.decode(errors="replace")
    code = exit_code_from(output, nonce)
    return GuestResult(code, output, duration, timed_out and code is None, kernel.release)
