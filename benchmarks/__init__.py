"""Benchmarks for florg (server aggregation and client training step). Not part of the test suite.

Run everything with ``bash benchmarks/run_all.sh`` (or ``python -m benchmarks.run_all``); it writes
``benchmarks/RESULTS.md`` from the measured numbers.
"""
