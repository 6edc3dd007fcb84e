"""Benchmarks, the demo and the generated pages (not part of the library's API)."""
