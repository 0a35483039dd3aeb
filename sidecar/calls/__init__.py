"""What both front ends share about a call: who the caller is (callers), how its outcome is
coded and what the caller is told (outcome), and its log line and counters (accounting).
Below the front ends, so that the gRPC and HTTP front ends stay peers that never import
each other."""
