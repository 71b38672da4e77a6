"""Train state, optimizers and schedules, the pure train/eval steps, `assemble` (a config
to a model, a state and compiled steps: shared with the benchmarks), and the loop."""
