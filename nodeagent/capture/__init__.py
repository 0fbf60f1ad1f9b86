"""Capture: which regions and pages, the tracked capture model shared by the agent and the
CLI chain, the copy out of a frozen process into staging or an image.
"""
