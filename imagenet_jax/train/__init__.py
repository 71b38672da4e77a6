"""Train state, optimizers and schedules, the pure train/eval steps, the recipe (a config
to a compiled step: shared with the benchmarks), and the loop."""
