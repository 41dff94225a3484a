"""kf-dify benchmarks: webhook, pipeline, concurrency, memory and crypto, each next to its baseline.

Run with `python -m bench` (see bench/README.md). Not part of the pytest suite.
"""
