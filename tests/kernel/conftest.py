"""tests/kernel: host-side tests boot a qemu guest (tests/kernel/vm.py) and run the tests
of tests/kernel/guest/ inside it. Those guest tests are collected only inside the guest
(vm.GUEST_ENV_FLAG set by the harness): a run of tests/ or tests/kernel/ on the host
leaves them out, since they require a kernel feature the host may lack. Named explicitly
(`pytest tests/kernel/guest`) they run anywhere, and fail, with the reason, wherever
soft-dirty is missing."""

from __future__ import annotations

import os

from tests.kernel.vm import GUEST_ENV_FLAG

collect_ignore = [] if os.environ.get(GUEST_ENV_FLAG) == "1" else ["guest"]
