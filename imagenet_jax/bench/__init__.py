"""Benchmarks: `bench_train` times the configured model's train step (later: input, scaling)."""

from imagenet_jax.bench.train import bench_train, format_table

__all__ = ["bench_train", "format_table"]
