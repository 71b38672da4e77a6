"""Train state, optimizers and schedules, the pure train/eval steps, and the loop."""
