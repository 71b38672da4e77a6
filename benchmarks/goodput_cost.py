"""What the train loop's time accounting (imagenet_jax/train/goodput.py) costs a step.

    python benchmarks/goodput_cost.py [--rounds=5] [-- BENCH TRAIN FLAGS...]

1. `imagenet-jax bench train FLAGS` without and with `--goodput`, alternated `rounds`
   times (each run a fresh process); the step-time median of each run, and the median
   of each side.
2. The accounting alone: a loop of tiny jitted steps (8 floats) dispatched without
   waiting, with and without `next_batch` / `dispatched` and the device watch, 2,000
   steps a pass, 7 passes alternated: microseconds a step.

Prints one JSON line with every figure. Default flags: the demo's config fed by its
pipeline (`--config=configs/demo.py --mode=pipeline --steps=40 --warmup_steps=5`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FLAGS = ["--config=configs/demo.py", "--mode=pipeline", "--steps=40",
                 "--warmup_steps=5"]


def bench_step_ms(flags: list[str], goodput: bool) -> float:
    command = [sys.executable, "-m", "imagenet_jax", "bench", "train", *flags, "--json",
               *(["--goodput"] if goodput else [])]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["step_time_ms"]


def accounting_us_per_step(passes: int = 7, steps: int = 2000) -> dict[str, list[float]]:
    import jax
    import jax.numpy as jnp

    from imagenet_jax.train.goodput import TimeAccount

    step = jax.jit(lambda state, batch: (state + batch, {"loss": state.sum()}))
    batch = jnp.ones((8,))

    def run(account: TimeAccount | None) -> float:
        state, batches = jnp.zeros((8,)), itertools.repeat(batch)
        start = time.perf_counter()
        for _ in range(steps):
            next_batch = next(batches) if account is None else account.next_batch(batches)
            state, metrics = step(state, next_batch)
            if account is not None:
                account.dispatched(metrics)
        jax.block_until_ready(state)
        if account is not None:
            account.settle()
        return (time.perf_counter() - start) / steps * 1e6

    run(None)  # compiles
    figures: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(passes):
        figures["without"].append(run(None))
        account = TimeAccount()
        account.switch("training")
        figures["with"].append(run(account))
        account.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("flags", nargs="*", default=DEFAULT_FLAGS)
    args = parser.parse_args()
    steps_ms: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.rounds):
        steps_ms["without"].append(bench_step_ms(args.flags, goodput=False))
        steps_ms["with"].append(bench_step_ms(args.flags, goodput=True))
    micro = accounting_us_per_step()
    print(json.dumps({
        "flags": args.flags, "rounds": args.rounds,
        "bench_step_ms": steps_ms,
        "bench_step_ms_median": {k: statistics.median(v) for k, v in steps_ms.items()},
        "accounting_us_per_step": micro,
        "accounting_us_per_step_median": {k: statistics.median(v) for k, v in micro.items()},
    }))


if __name__ == "__main__":
    main()
