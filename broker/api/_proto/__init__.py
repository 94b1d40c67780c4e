"""Generated protobuf and gRPC code (private to broker.api)."""
