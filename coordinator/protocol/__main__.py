"""`python -m coordinator.protocol [DOC]`: print the protocol table (table.py), or
refresh it in DOC between the <!-- table:begin --> and <!-- table:end --> markers."""

import sys
from pathlib import Path

from coordinator.protocol.table import render_table

if len(sys.argv) < 2:
    sys.stdout.write(render_table())
else:
    doc = Path(sys.argv[1])
    head, rest = doc.read_text().split("<!-- table:begin -->\n", 1)
    tail = rest.split("<!-- table:end -->", 1)[1]
    doc.write_text(f"{head}<!-- table:begin -->\n{render_table()}<!-- table:end -->{tail}")
