"""Benchmarks that measure our data pipeline and training step against plain baselines in one run."""
