"""The guest's boot files: a kernel image and a busybox initramfs, built from the host's
own packages and cached under tests/kernel/.build/ (gitignored).

Owns: choosing a /boot kernel that has the features the guest tests need, resolving the
module dependencies of 9p/overlay/virtio from modules.dep, writing the initramfs as a
newc cpio in Python (no root, no cpio(1) needed; .ko.xz/.zst/.gz decompressed because
busybox insmod loads plain .ko files), the init script, and extracting the vmlinux ELF
from the bzImage so qemu can boot it through its PVH entry point.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BUILD_DIR = Path(__file__).resolve().parent / ".build"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
# Modules the init loads, with their dependencies resolved from modules.dep.
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio-rng")
# Kernel options a guest kernel must have for the tests that use it.
REQUIRED_CONFIG = ("CONFIG_MEM_SOFT_DIRTY=y",)


@dataclass(frozen=True)
class GuestKernel:
    release: str
    image: Path
    modules: Path


def _kernel_config(release: str) -> str:
    try:
        return Path(f"/boot/config-{release}").read_text()
    except OSError:
        return ""


def _version_key(p: Path) -> list[tuple[int, str]]:
    """Natural order: 6.10 after 6.9."""
    return [(int(x), "") if x.isdigit() else (-1, x) for x in re.split(r"(\d+)", p.name)]


def find_kernel(required: Iterable[str] = REQUIRED_CONFIG) -> GuestKernel | None:
    """The newest /boot/vmlinuz-* whose config has every `required` line and whose
    modules are installed. CPCOORD_GUEST_KERNEL=<release> picks one explicitly."""
    wanted = os.environ.get("CPCOORD_GUEST_KERNEL")
    images = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key, reverse=True)
    for image in images:
        release = image.name.removeprefix("vmlinuz-")
        if wanted and release != wanted:
            continue
        config = _kernel_config(release).splitlines()
        modules = Path("/lib/modules") / release
        if all(req in config for req in required) and (modules / "modules.dep").exists():
            return GuestKernel(release, image, modules)
    return None


def find_busybox() -> Path | None:
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        # A dynamically linked busybox would need the host's libc inside the initramfs.
        if p.is_file() and b"ld-linux" not in p.read_bytes()[:4096]:
            return p
    return None


# -- initramfs ------------------------------------------------------------------


def module_load_order(modules_dir: Path, wanted: Sequence[str]) -> list[str]:
    """Relative paths of the wanted modules and their dependencies, dependencies first.

    modules.dep lines are `path: dep1 dep2 ...`; names match with '-' and '_' equal, the
    way modprobe matches them. Modules built into the kernel are simply not found.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[name] = path
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        found = by_name.get(name.replace("-", "_"))
        if found is not None:
            visit(found)
    return order


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod loads plain .ko files only."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    return data


class Cpio:
    """A newc ("070701") cpio archive writer: enough for an initramfs (dirs, files, one
    device node), written in Python so building needs neither root nor cpio(1)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1]]
        fields += [len(name) + 1, 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._parts.append(_pad4(header + name.encode() + b"\0"))
        self._parts.append(_pad4(data))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


INIT_SCRIPT = r"""#!/bin/busybox sh
# cpcoord guest init: load modules, mount the host root (9p, read-only) under a tmpfs
# overlay, run the command in a chroot, report its exit code, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do
  insmod "/modules/$m" || echo "cpcoord-init: insmod $m failed"
done
RUN= NONCE= OVERLAY=1
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    cpcoord.run=*) RUN="${arg#cpcoord.run=}" ;;
    cpcoord.nonce=*) NONCE="${arg#cpcoord.nonce=}" ;;
    cpcoord.overlay=0) OVERLAY=0 ;;
  esac
done
finish() {
  echo
  echo "$NONCE rc=$1"
  sync
  poweroff -f
  sleep 5
}
mkdir -p /mnt/host /mnt/rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /mnt/host \
  || finish 251
mount -t tmpfs -o mode=755 rw /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
if [ "$OVERLAY" = 0 ]; then
  mount --bind /mnt/host /newroot
elif ! mount -t overlay overlay \
    -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot; then
  echo "cpcoord-init: overlay failed; the root stays read-only"
  mount --bind /mnt/host /newroot
fi
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
# With the overlay, /tmp stays the host's (writes land in guest RAM): a checkout under
# /tmp (CI clones anywhere) must stay visible. Without it, a fresh tmpfs makes /tmp writable.
if [ "$OVERLAY" = 0 ]; then mount -t tmpfs -o mode=1777 tmp /newroot/tmp; fi
mount -t tmpfs -o mode=755 run /newroot/run
cp "/mnt/host$RUN" /newroot/run/cpcoord-guest.sh || finish 252
chroot /newroot /bin/sh /run/cpcoord-guest.sh
finish $?
"""


def _initramfs_key(kernel: GuestKernel, busybox: Path, order: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(INIT_SCRIPT.encode())
    h.update(kernel.release.encode())
    for rel in order:
        st = (kernel.modules / rel).stat()
        h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
    st = busybox.stat()
    h.update(f"{busybox}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


_KERNEL_PAYLOADS = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b\x08", "gzip"),
)


def decompress_payload(image: bytes) -> bytes | None:
    """The vmlinux ELF inside a bzImage, or None when its compression is not handled.

    Why: booting the uncompressed ELF through its PVH entry point skips both SeaBIOS's
    real-mode loader and the in-guest decompression, which under TCG take ~5 s."""
    for magic, kind in _KERNEL_PAYLOADS:
        at = image.find(magic)
        while at >= 0:
            out = _try_decompress(kind, image[at:])
            if out is not None and out.startswith(b"\x7fELF"):
                return out
            at = image.find(magic, at + 1)  # a false match in the setup code: go on
    return None


def _try_decompress(kind: str, data: bytes) -> bytes | None:
    try:
        if kind == "xz":
            return lzma.LZMADecompressor().decompress(data)
        if kind == "zstd":
            import zstandard

            return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    except (lzma.LZMAError, zlib.error, ValueError):
        return None
    except Exception as e:  # zstandard.ZstdError, without importing zstandard up front
        if type(e).__name__ == "ZstdError":
            return None
        raise


def boot_image(kernel: GuestKernel, build_dir: Path = BUILD_DIR) -> Path:
    """The image to hand qemu: the extracted vmlinux (cached, ~66 MB) when the kernel has a
    PVH entry point, else the bzImage."""
    if "CONFIG_PVH=y" not in _kernel_config(kernel.release).splitlines():
        return kernel.image
    st = kernel.image.stat()
    out = build_dir / f"vmlinux-{kernel.release}-{st.st_size}-{st.st_mtime_ns}"
    if out.exists():
        return out
    elf = decompress_payload(kernel.image.read_bytes())
    if elf is None:
        return kernel.image
    _write_atomic(out, elf)
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_initramfs(kernel: GuestKernel, build_dir: Path = BUILD_DIR) -> Path:
    """The initramfs for `kernel`, built once and cached by content key (atomic rename,
    so concurrent test runs never see half a file)."""
    busybox = find_busybox()
    if busybox is None:
        raise RuntimeError("no static busybox")
    order = module_load_order(kernel.modules, WANTED_MODULES)
    key = _initramfs_key(kernel, busybox, order)
    out = build_dir / f"initramfs-{kernel.release}-{key}.cpio"
    if out.exists():
        return out
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "modules", "newroot", "tmp"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    names = []
    for rel in order:
        name = Path(rel).name.split(".ko")[0] + ".ko"
        cpio.file(f"modules/{name}", _read_module(kernel.modules / rel))
        names.append(name)
    cpio.file("modules/order", ("\n".join(names) + "\n").encode())
    _write_atomic(out, cpio.finish())
    return out
