"""The incremental-chain property with the soft-dirty
tracker, on a kernel that has it (run inside the qemu guest by
tests/kernel/test_softdirty_vm.py; the property itself lives in tests/helpers/chains.py
and runs on the host for uffd-wp, hash and none).

Fails, never skips, where soft-dirty is missing. Few examples: under TCG every example
spawns a Python target ~25x slower than on the host.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.chains import run_chain
from tests.kernel.guest.support import require_soft_dirty


@settings(
    max_examples=3,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_soft_dirty_chain_equals_full_capture_at_the_same_freeze(data: st.DataObject) -> None:
    require_soft_dirty()
    run_chain("soft-dirty", data, rounds=3)
