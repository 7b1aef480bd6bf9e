"""Benchmarks, metrics and the harness that runs a retrieval method on a benchmark."""
