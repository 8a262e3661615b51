"""Helpers for this package's tests and benchmarks, like ``ray.cluster_utils``: throw-away
loopback Ray clusters, small models, and driver scenarios in fresh processes. The library
itself never imports this room."""
