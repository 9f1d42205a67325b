"""Generated protobuf and gRPC stubs for the smartspec.v1 wire contract (scripts/gen_proto.py)."""
