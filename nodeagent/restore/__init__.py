"""Restore: plan, fit check against the cut's mappings, the all-or-nothing write with its
backup, and the agent-side restore operations.
"""
