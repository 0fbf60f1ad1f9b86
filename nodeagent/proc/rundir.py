"""Where cpcoord keeps what must outlive one process on this machine but not a reboot:
$CPCOORD_RUN_DIR, else /run/cpcoord for root, else a per-user directory under
$XDG_RUNTIME_DIR or the temporary directory. The CLI chain's head records
(nodeagent/capture/chain.py) and the agents' records of armed userfaultfds
(nodeagent/trackers/leftovers.py) live under it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def run_dir() -> Path:
    env = os.environ.get("CPCOORD_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/cpcoord")
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"cpcoord-{os.getuid()}"
