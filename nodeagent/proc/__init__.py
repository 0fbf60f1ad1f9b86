"""Process access: /proc, ptrace (freeze, inject, registers), pagemap, userfaultfd, reading
and writing another process's memory. Imports nothing above it.
"""
