"""Generated gRPC/protobuf stubs for protos/sidecar/v1 (scripts/gen_protos.py; never edit)."""
