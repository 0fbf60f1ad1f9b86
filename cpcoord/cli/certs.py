"""`cpcoord certs init`: a development CA with coordinator, agent and client certificates,
plus admin/viewer tokens (the coordinator's token file stores only their SHA-256)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "certs"
HELP = "make a development CA, certificates and tokens"
DESCRIPTION = """\
`certs init --out DIR` writes a development PKI into DIR (mode 0700, every file 0600):
ca.pem/ca.key, coordinator.pem/.key (SAN 127.0.0.1, localhost and each --san),
agent-NAME.pem/.key for each --agent, admin.pem/.key and viewer.pem/.key client
certificates, admin.token/viewer.token, and `tokens` (ROLE sha256:HEX lines for
`cpcoord coordinator --tokens`). For production, use your own CA with the same names."""
EPILOG = """\
examples:
  cpcoord certs init --out /etc/cpcoord/pki --san coord.example --agent n1 --agent n2
  cpcoord coordinator --listen 0.0.0.0:7420 --store /var/lib/cpcoord \\
      --tls-cert pki/coordinator.pem --tls-key pki/coordinator.key --tls-ca pki/ca.pem \\
      --tokens pki/tokens"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["init"], help="what to do")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument(
        "--san", action="append", default=[], metavar="NAME", help="extra server name or IP"
    )
    p.add_argument(
        "--agent", action="append", default=[], metavar="NAME", help="an agent's node name"
    )


def run(args: argparse.Namespace) -> int:
    from cpcoord.tls import init_dev_pki

    res = init_dev_pki(args.out, args.san, args.agent)
    print(f"wrote {len(res.files)} files to {res.out}: {' '.join(res.files)}")
    return 0
