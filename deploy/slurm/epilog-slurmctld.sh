#!/bin/sh
# EpilogSlurmctld: release the cpcoord generations of a job that ended for good.
# Install as /etc/slurm/cpcoord-epilog-slurmctld.sh (mode 0755) and set EpilogSlurmctld
# to it in slurm.conf. It runs on the controller after every run of every job, a requeue
# included, while the job is still COMPLETING; so it starts `cpcoord slurm release
# --wait` on its own (setsid: the epilog returns at once and holds nothing of the job),
# which waits for the job's next state: pending again (requeued) keeps the generations,
# any end state (completed, failed, cancelled, timeout, ...) releases them. The
# coordinator's address and credentials come from /etc/cpcoord/config.toml ([client]
# table, docs/config.md); its messages go to syslog (tag cpcoord).
setsid -f sh -c 'cpcoord slurm release --wait 600 --slurm-job-id "$1" --cluster "$2" 2>&1 |
    logger -t cpcoord' release "$SLURM_JOB_ID" "${SLURM_CLUSTER_NAME:-}" </dev/null >/dev/null 2>&1
exit 0
