"""High availability: coordinator replicas with a leader elected through etcd
(etcd.py: the client; election.py: leases, terms, the commit fence; replica.py: take
over and step down; serve.py: the daemon; metrics.py). docs/operations.md has the
failure model."""
