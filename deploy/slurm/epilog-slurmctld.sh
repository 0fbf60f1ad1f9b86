#!/bin/sh
# EpilogSlurmctld: release the cpcoord generations of a job that ended for good.
# Install as /etc/slurm/cpcoord-epilog-slurmctld.sh (mode 0755) and set EpilogSlurmctld
# to it in slurm.conf. It runs on the controller after every run of every job, a requeue
# included, while the job is still COMPLETING; so it starts `cpcoord slurm release
# --wait` in a session of its own, which waits for the job's next state: pending again
# (requeued) keeps the generations, any end state (completed, failed, cancelled,
# timeout, ...) releases them. The coordinator's address and credentials come from
# /etc/cpcoord/config.toml ([client] table, docs/config.md); its messages go to syslog
# (tag cpcoord).
#
# Slurm kills the epilog's process group once the epilog exits, and `setsid -f` returns
# before its child has left that group: so the epilog waits (command substitution, until
# the pipe closes) for the child to say it runs in its own session.
started=$(setsid -f sh -c '
    exec 3>&1 >/dev/null 2>&1 </dev/null
    echo started >&3
    exec 3>&-
    cpcoord slurm release --wait 600 --slurm-job-id "$1" --cluster "$2" 2>&1 | logger -t cpcoord
' release "$SLURM_JOB_ID" "${SLURM_CLUSTER_NAME:-}" 2>/dev/null)
[ "$started" = started ] || echo "cpcoord epilog: could not start the release" >&2
exit 0
