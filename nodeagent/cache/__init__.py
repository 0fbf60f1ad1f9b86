"""The node cache and its drain to the store (docs/multilevel.md)."""
