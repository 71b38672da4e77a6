"""Benchmarks: `bench_train` times the train step, `bench_input` the input pipeline,
`bench_scaling` the train step on 1, 2, 4, ... devices."""

from imagenet_jax.bench.input import bench_input
from imagenet_jax.bench.scaling import bench_scaling, format_scaling_table
from imagenet_jax.bench.train import bench_train, format_table

__all__ = ["bench_input", "bench_scaling", "bench_train", "format_scaling_table",
           "format_table"]
