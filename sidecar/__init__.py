"""sidecar: a local inference daemon serving small GGUF models over gRPC on a Unix socket."""

__version__ = "0.1.0"
