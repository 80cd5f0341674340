"""Reproducible performance benchmarks; each writes JSON and a PNG plot (see docs/performance.md)."""
