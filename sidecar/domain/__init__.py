"""The bottom layer: plain domain types, errors and names. Imports nothing else of sidecar."""
