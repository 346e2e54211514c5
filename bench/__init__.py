"""Benchmarks: `python -m bench.append [--quick]`."""
