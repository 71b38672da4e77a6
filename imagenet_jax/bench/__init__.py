"""Benchmarks: `train.bench_train` times the train step, `input.bench_input` the input
pipeline, `scaling.bench_scaling` the train step on 1, 2, 4, ... devices.

Import the one you need: `bench train` with synthetic data needs no TensorFlow.
"""
