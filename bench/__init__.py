"""Benchmarks. Each module has ``main(argv)``; run e.g. ``python -m bench.bench_ingest``."""
