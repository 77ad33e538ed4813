"""Generated genloom.v1 protobuf and gRPC stubs (built from protos/ at install time; `make protos` rebuilds them)."""
