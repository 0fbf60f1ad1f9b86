"""The agent daemon: the control stream, the ptrace worker thread and its steps (freeze,
capture, restore), the members it holds with their tracking and pending pages, and its
metrics.
"""
