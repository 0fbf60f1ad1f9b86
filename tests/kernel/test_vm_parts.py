"""Unit tests of the qemu harness's pure parts: module order, the cpio writer, the kernel
payload extraction and the exit marker. No qemu needed."""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.kernel import vm, vmimage


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko "
        "kernel/fs/netfs/netfs.ko\n"
        "kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko\n"
    )
    order = vmimage.module_load_order(tmp_path, ["9pnet_virtio", "9p", "virtio_rng", "absent"])
    names = [Path(p).name.split(".ko")[0] for p in order]
    assert sorted(names) == sorted(set(names)), "each module once"
    pos = {n: i for i, n in enumerate(names)}
    assert set(pos) == {
        "9p", "9pnet", "fscache", "netfs", "9pnet_virtio", "virtio", "virtio_ring", "virtio-rng"
    }  # fmt: skip
    for mod, deps in {
        "9p": ["9pnet", "fscache", "netfs"],
        "fscache": ["netfs"],
        "9pnet_virtio": ["9pnet", "virtio"],
        "virtio": ["virtio_ring"],
        "virtio-rng": ["virtio"],
    }.items():
        assert all(pos[d] < pos[mod] for d in deps), (mod, names)


def test_cpio_archive_reads_back_with_cpio(tmp_path: Path) -> None:
    require(shutil.which("cpio") is not None, "cpio not installed (Debian package cpio)")
    w = vmimage.Cpio()
    w.directory("bin")
    w.directory("dev")
    w.chardev("dev/console", 5, 1)
    w.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    w.file("odd-size", b"x" * 4099)
    archive = w.finish()
    assert len(archive) % 4 == 0
    listing = subprocess.run(
        ["cpio", "-itv"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    lines = {ln.split()[-1]: ln for ln in listing.splitlines()}
    assert set(lines) == {"bin", "dev", "dev/console", "bin/hello", "odd-size"}
    assert lines["dev/console"].startswith("crw-------")
    assert lines["bin/hello"].startswith("-rwxr-xr-x")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "bin/hello", "odd-size"], input=archive, cwd=out, check=True
    )
    assert (out / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "odd-size").read_bytes() == b"x" * 4099


@pytest.mark.parametrize("pack", ["xz", "gzip"])
def test_kernel_payload_is_extracted(pack: str) -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    payload = lzma.compress(elf) if pack == "xz" else gzip.compress(elf)
    # A false magic match before the real payload must not stop the search.
    image = b"MZ setup \x1f\x8b\x08 not gzip" + b"\0" * 100 + payload + b"trailer"
    assert vmimage.decompress_payload(image) == elf


def test_kernel_payload_unknown_is_none() -> None:
    assert vmimage.decompress_payload(b"MZ nothing compressed here") is None


def test_exit_marker_needs_the_whole_line() -> None:
    nonce = "cpcoord-guest-0123456789abcdef"
    assert vm.exit_code_from(f"boot\r\n{nonce} rc=3\r\n[ 1.0] reboot\r\n", nonce) == 3
    assert vm.exit_code_from(f"echo '{nonce} rc=0'\n", nonce) is None
    assert vm.exit_code_from(f"{nonce} rc=0 and more\n", nonce) is None
    assert vm.exit_code_from("cpcoord-guest-ffff rc=0\n", nonce) is None
    assert vm.exit_code_from("", nonce) is None
