"""Benchmark harness: `make bench` (full-size random-weight SD 1.5 + ControlNet) and `make bench-smoke`."""
