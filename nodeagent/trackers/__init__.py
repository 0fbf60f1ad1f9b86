"""Trackers: how an agent learns which pages changed since the last capture."""
