"""The protocol core: one generation of one job as a sans-io state machine.

  values    states, timing, stats, the generation's spec and snapshot
  messages  events in, commands out
  table     the rules: `TABLE`, one cell per (state, event), and `Generation`
  prepare   the prepare phase (PRIMING) before the Freeze: a restore's prefetch
  cells     the cell type and the helpers the actions share
Nothing here does I/O, reads a clock or knows gRPC; the engine (coordinator/engine.py)
drives it. `python -m coordinator.protocol DOC` renders the table into docs/protocol.md.
"""

from coordinator.protocol.table import TABLE, Generation, render_table

__all__ = ["TABLE", "Generation", "render_table"]
