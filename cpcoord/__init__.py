"""cpcoord: a distributed checkpoint coordinator for Linux processes.

This package holds what coordinator and node agent share: the CLI, errors, values,
the image format, and the generated gRPC stubs (cpcoord.gen).
"""

__version__ = "0.1.0"
