"""The local API (Unix socket) served to processes that register regions."""
