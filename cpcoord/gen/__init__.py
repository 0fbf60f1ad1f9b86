"""Generated gRPC/protobuf stubs; nothing hand-written lives here."""
