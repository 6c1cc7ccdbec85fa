"""Generated gRPC code for the kvstore.v1 APIs (from proto/kvstore/v1; `make proto`)."""
