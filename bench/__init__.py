"""Benchmarks: the engine benchmark (bench.engine_bench), the HTTP load generator (bench/serving.py), GPU scripts."""
