"""cpcoord coordinator: catalog, protocol core, store, retention, metrics, gRPC servicers.

Never imports `nodeagent`; shares values and errors through `cpcoord`.
"""
