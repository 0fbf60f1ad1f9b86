"""Host side of the kernel tests: boot Debian's stock kernel under qemu (tests/kernel/vm.py)
and run tests/kernel/guest/ inside it, where soft-dirty exists.

Skipped locally, failed in CI, only when qemu, a soft-dirty kernel or busybox is missing.
The guest suite's verdict is its exit code, carried out of the guest by the harness's
marker; the guest's console is shown on any failure or timeout.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.conftest import require
from tests.kernel import vm

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# Boot takes ~10 s and Python is ~25x slower under TCG than here; a loaded machine
# doubles that. The timeouts bound a hang, they are not a performance goal.
SUITE_TIMEOUT = 900.0
SHELL_TIMEOUT = 300.0


@pytest.fixture(autouse=True)
def _need_guest() -> None:
    why = vm.unavailable_reason()
    require(why is None, f"cannot boot a test guest: {why}")


def test_harness_carries_exit_code_and_output() -> None:
    kernel = vm.find_kernel()
    assert kernel is not None
    r = vm.run_in_guest(
        ["sh", "-c", "uname -r; touch /work-is-writable && echo overlay-ok; exit 7"],
        timeout=SHELL_TIMEOUT,
    )
    assert r.exit_code == 7, r.describe()
    assert not r.timed_out
    assert kernel.release in r.output, r.describe()
    assert "overlay-ok" in r.output, r.describe()


def test_harness_reports_timeout_with_output() -> None:
    r = vm.run_in_guest(["sh", "-c", "echo started-sleeping; sleep 600"], timeout=15.0)
    assert r.timed_out and r.exit_code is None, r.describe()
    assert not r.ok


def test_soft_dirty_suite_in_guest() -> None:
    # Plugins the guest tests do not use stay unloaded: importing hypothesis alone costs
    # ~30 s of emulated CPU.
    no_plugins = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark"]
    r = vm.run_in_guest(
        [sys.executable, "-m", "pytest", "-v", *no_plugins, "tests/kernel/guest"],
        timeout=SUITE_TIMEOUT,
    )
    assert r.ok, r.describe()
    summary = re.findall(r"^=+ (.*) in [\d.]+s", r.output, re.MULTILINE)
    assert summary, r.describe()
    # Everything ran and passed: a skip inside the guest would hide a missing feature.
    assert re.fullmatch(r"\d+ passed", summary[-1]), r.describe()
