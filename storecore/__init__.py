"""The store's data format, shared by the coordinator and the node agents (docs/store.md).

What both sides must agree on to write and read pack objects: chunk ids (ids), named
immutable objects on a directory or an S3 bucket (backend, s3, directio), packs of
zstd-compressed, optionally sealed chunks (packs, crypt), the pack sink that seals and
puts them on writer threads (writer), where a store lives (location) and its identity
file (identity). No catalog, index, manifest or protocol: those are the coordinator's
(coordinator/store/). storecore imports neither coordinator nor nodeagent.
"""
