"""Chaos test: SIGKILL a training run at random moments, restart it, compare with a clean run.

    python tests/chaos.py [--kills=5] [--seed=0] [--workdir=DIR] [-- CONFIG FLAGS...]

Runs the command `imagenet-jax train CONFIG FLAGS --workdir=...` once uninterrupted, then
again while killing it with SIGKILL at random moments after its first checkpoint, `kills`
times in a row, restarting it after each kill. Reports kills survived, steps lost, and
whether the final parameters equal the uninterrupted run's, ending with one line:

    chaos: kills=K resumed=R params_equal=true|false

Default flags: the demo recipe on the demo dataset at 16x16 for 4 epochs (`make chaos`).
The test suite runs a shorter version on a tiny dataset (tests/test_fault_tolerance.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FLAGS = ["--config=configs/demo.py", "--config.image_size=16", "--config.num_epochs=4",
                 "--config.checkpoint_every_steps=10", "--config.log_every_steps=5"]


@dataclasses.dataclass
class ChaosReport:
    kills: int = 0
    resumed: int = 0
    steps_lost: list[int] = dataclasses.field(default_factory=list)
    params_equal: bool = False

    def summary(self) -> str:
        return (f"chaos: kills={self.kills} resumed={self.resumed} "
                f"params_equal={str(self.params_equal).lower()}")


def command(flags: list[str], workdir: Path) -> list[str]:
    return [sys.executable, "-m", "imagenet_jax", "train", *flags, f"--workdir={workdir}"]


def run_to_end(flags: list[str], workdir: Path, env: dict, timeout: float = 900):
    result = subprocess.run(command(flags, workdir), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def checkpoint_steps(workdir) -> list[int]:
    """The committed checkpoints of the run in `workdir` (a path or gs:// URL)."""
    from imagenet_jax import storage

    folder = storage.as_path(workdir) / "checkpoints"
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


def last_logged_step(workdir) -> int:
    from imagenet_jax.metrics import read_records

    return max((r["step"] for r in read_records(workdir)), default=0)


def kill_at_random(flags: list[str], workdir: Path, env: dict, rng: random.Random,
                   max_delay: float, timeout: float = 600) -> int | None:
    """Starts the run, SIGKILLs it a random delay after it next makes progress.

    Returns the steps lost (last logged step minus last checkpoint), or None if the
    run finished before the kill landed.
    """
    before = checkpoint_steps(workdir)
    process = subprocess.Popen(command(flags, workdir), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint_steps(workdir) != before:  # training is under way
                time.sleep(rng.uniform(0, max_delay))
                if process.poll() is not None:
                    break
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=60)
                return max(0, last_logged_step(workdir) - max(checkpoint_steps(workdir)))
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode not in (0, None):
        raise RuntimeError(f"the run failed on its own with exit code {process.returncode}")
    return None


def final_params(workdir: Path):
    from imagenet_jax.checkpoint import Checkpointer

    checkpointer = Checkpointer(workdir / "checkpoints", every_steps=1, keep=1)
    restored = checkpointer.load()
    checkpointer.close()
    return restored


def trees_equal(a, b) -> bool:
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True))


def chaos(flags: list[str], root, *, kills: int, seed: int, max_delay: float,
          env: dict | None = None, uninterrupted: Path | None = None) -> ChaosReport:
    """Kills and restarts a run of `flags` in root/killed (`root` a path or gs:// URL);
    compares with `uninterrupted` (a finished run of the same flags), which it first
    makes in root/ if not given."""
    from imagenet_jax import storage

    env = dict(os.environ if env is None else env)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rng = random.Random(seed)
    root = storage.as_path(root)
    straight, chaotic = uninterrupted or root / "uninterrupted", root / "killed"
    if uninterrupted is None:
        run_to_end(flags, straight, env)
    report = ChaosReport()
    for _ in range(kills):
        lost = kill_at_random(flags, chaotic, env, rng, max_delay)
        if lost is None:
            break  # finished before this kill: nothing left to interrupt
        report.kills += 1
        report.steps_lost.append(lost)
    run_to_end(flags, chaotic, env)
    report.resumed = report.kills
    a, b = final_params(straight), final_params(chaotic)
    report.params_equal = int(a["step"]) == int(b["step"]) and all(
        trees_equal(a.get(k), b.get(k)) for k in ("params", "model_state", "opt_state", "ema"))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_delay", type=float, default=4.0,
                        help="seconds: each kill lands up to this long after progress")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("flags", nargs="*", default=DEFAULT_FLAGS)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="chaos."))
    report = chaos(args.flags, root, kills=args.kills, seed=args.seed, max_delay=args.max_delay)
    print(f"workdirs: {root}; steps lost at each kill: {report.steps_lost}")
    print(report.summary())
    sys.exit(0 if report.params_equal and report.kills == args.kills else 1)


if __name__ == "__main__":
    main()
