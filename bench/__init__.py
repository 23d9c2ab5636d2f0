"""Benchmarks (not tests): run with ``python3 bench/run.py``; see bench/README.md."""
