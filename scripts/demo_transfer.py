"""The README's fine-tuning table: configs/demo_transfer.py from the demo's weights, from
scratch and as a linear probe, at equal steps on the same data (`make demo-transfer`).

Needs a finished demo run in runs/demo (`imagenet-jax train`; `make demo-transfer` makes
it first if it is missing). Each run trains into a fresh runs/demo_transfer_NAME; the table
gives the validation top-1 at 1/4, 1/2 and all of the steps, and each run's wall time.

    python scripts/demo_transfer.py [--json]
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "--config=configs/demo_transfer.py"
RUNS = {  # name: (what it is, its flags beyond the config)
    "scratch": ("from scratch", ["--config.init_from="]),
    "finetune": ("fine-tuned from the demo", []),
    "probe": ("linear probe of the demo", ["--config.freeze=^(?!fc/)"]),
}


def train(name: str, flags: list[str]) -> tuple[Path, float]:
    workdir = REPO / "runs" / f"demo_transfer_{name}"
    shutil.rmtree(workdir, ignore_errors=True)
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "imagenet_jax", "train", CONFIG, *flags,
                    f"--workdir={workdir}"], cwd=REPO, check=True)
    return workdir, time.monotonic() - began


def top1_by_step(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["top1"] for r in records if r["split"] == "val"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    args = parser.parse_args()
    if not (REPO / "runs" / "demo" / "checkpoints").is_dir():
        sys.exit("no demo run in runs/demo: train it first (`imagenet-jax train`)")
    results = {}
    for name, (what, flags) in RUNS.items():
        workdir, seconds = train(name, flags)
        results[name] = {"what": what, "top1": top1_by_step(workdir), "seconds": seconds}
    steps = sorted(results["scratch"]["top1"])
    shown = [steps[len(steps) // 4 - 1], steps[len(steps) // 2 - 1], steps[-1]]
    if args.json:
        print(json.dumps(results))
        return
    print("| run | " + " | ".join(f"top-1 at step {s}" for s in shown) + " | wall |")
    print("|---|" + "---:|" * (len(shown) + 1))
    for result in results.values():
        cells = " | ".join(f"{result['top1'][s]:.4f}" for s in shown)
        print(f"| {result['what']} | {cells} | {result['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
