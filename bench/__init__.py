"""Benchmarks: `chatlog bench [--quick] [--json FILE] [--only a,b]` (bench/README.md)."""
