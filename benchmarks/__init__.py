"""Streaming benchmarks for xsvggt_jax (run `python -m benchmarks.stream --help`)."""
