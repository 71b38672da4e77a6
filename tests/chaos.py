"""Chaos test: SIGKILL a training run at random steps, restart it, compare with a clean run.

    python tests/chaos.py [--kills=5] [--seed=0] [--workdir=DIR] [-- CONFIG FLAGS...]

Runs the command `imagenet-jax train CONFIG FLAGS --workdir=...` once uninterrupted, then
again `kills` times in a row, each time SIGKILLing it at a step drawn (from `seed`) among
the steps still ahead of the checkpoint it resumed from, and restarting it. Kills are
scheduled by step, not by time: the killer watches the steps the run logs to
WORKDIR/metrics.jsonl (every step with --config.log_every_steps=1; else it draws among
the logged ones) and kills once the scheduled one is logged, so a fast machine cannot
finish first and a slow one cannot be killed before it trains; a run that ends before
its kill lands stops the test (KillMissed). Reports each kill (the step scheduled, the
step observed when it was sent, the checkpoint the next run resumed from) and whether
the final parameters equal the uninterrupted run's, ending with one line:

    chaos: kills=K resumed=R params_equal=true|false

Default flags: the demo recipe on the demo dataset at 16x16 for 4 epochs, every step
logged (`make chaos`). The test suite runs a shorter version on a tiny dataset
(tests/test_fault_tolerance.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Every step logged: the killer sees each step, so each kill lands at the step drawn.
DEFAULT_FLAGS = ["--config=configs/demo.py", "--config.image_size=16", "--config.num_epochs=4",
                 "--config.checkpoint_every_steps=10", "--config.log_every_steps=1"]
RUN_TIMEOUT_S = 900  # a hung run fails the test after this long instead of blocking it


class KillMissed(RuntimeError):
    """A kill could not land before the run's end: the run finished training first, or
    no step was left ahead of its checkpoint to schedule the kill at."""


@dataclasses.dataclass(frozen=True)
class Kill:
    """One interruption: the step it was scheduled at, the last step the run had logged
    when the signal was sent, and the checkpoint the next run resumes from."""

    target: int
    observed: int
    resumed_from: int

    def describe(self) -> str:
        return (f"scheduled at step {self.target}, observed at step {self.observed}, resumed "
                f"from checkpoint {self.resumed_from} ({self.observed - self.resumed_from} "
                "step(s) lost)")


@dataclasses.dataclass
class ChaosReport:
    landed: list[Kill] = dataclasses.field(default_factory=list)
    resumed: int = 0
    params_equal: bool = False

    @property
    def kills(self) -> int:
        return len(self.landed)

    def describe(self) -> str:
        """One line per kill, then the summary line."""
        lines = [f"kill {i}: {kill.describe()}" for i, kill in enumerate(self.landed, 1)]
        return "\n".join([*lines, self.summary()])

    def summary(self) -> str:
        return (f"chaos: kills={self.kills} resumed={self.resumed} "
                f"params_equal={str(self.params_equal).lower()}")


def command(flags: list[str], workdir: Path) -> list[str]:
    return [sys.executable, "-m", "imagenet_jax", "train", *flags, f"--workdir={workdir}"]


def run_to_end(flags: list[str], workdir: Path, env: dict, timeout: float = RUN_TIMEOUT_S):
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


class RunWatcher:
    """What a run in `workdir` has done, read from its files while it trains.

    The steps it logs come from WORKDIR/config.json (its total steps and log interval),
    its progress from WORKDIR/metrics.jsonl, written whole at each log after the step's
    numbers left the device. A killed run leaves records past its checkpoint, which the
    next run keeps but supersedes with its first record (`run_dir.kept_records` leaves
    them out); so the file counts as this run's only once it differs from what it held
    before this run started.
    """

    def __init__(self, workdir):
        from imagenet_jax import storage

        self.workdir = storage.as_path(workdir)
        self._before = self._read("metrics.jsonl")
        self._rewritten = False
        self._text, self._step = self._before, None  # the last text read, its last step

    def _read(self, name: str) -> str | None:
        try:
            return (self.workdir / name).read_text()
        except FileNotFoundError:
            return None

    def logged_steps(self) -> list[int] | None:
        """The steps the run logs train metrics at, in order; None before it says."""
        text = self._read("config.json")
        if text is None:
            return None
        saved = json.loads(text)
        total, every = saved["derived"]["num_train_steps"], saved["config"]["log_every_steps"]
        return [s for s in range(1, total + 1) if s == 1 or s % every == 0 or s == total]

    def last_step(self) -> int | None:
        """The last step this run has logged; None before it logs or rewrites anything."""
        text = self._read("metrics.jsonl")
        self._rewritten = self._rewritten or text != self._before
        if not self._rewritten or text is None:
            return None
        if text != self._text:  # parsed only when it changed: the killer polls often
            from imagenet_jax.run_dir import kept_records

            records = kept_records([json.loads(line) for line in text.splitlines()])
            steps = [r["step"] for r in records if r["split"] == "train"]
            self._text, self._step = text, (steps[-1] if steps else None)
        return self._step


def signal_at_step(flags: list[str], workdir, env: dict,
                   choose_target: Callable[[list[int]], int], *, signum: int = signal.SIGKILL,
                   timeout: float = RUN_TIMEOUT_S) -> tuple[Kill, subprocess.CompletedProcess]:
    """Starts the run in `workdir` and sends it `signum` once it has logged the step that
    `choose_target` picks among the logged steps still ahead (after its checkpoint, before
    its last step). Returns the kill and the stopped run (its output in `stdout`).

    Raises KillMissed if the run finishes training first, RuntimeError if it fails on
    its own, TimeoutError if it runs past `timeout` seconds.
    """
    from imagenet_jax import storage

    started_from = max(checkpoint_steps(workdir), default=0)
    watcher = RunWatcher(workdir)
    poll_s = 0.5 if storage.is_url(workdir) else 0.005  # (an emulator serves one at a time)
    target = observed = total = None
    sent = False
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command(flags, workdir), cwd=REPO, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            while True:
                running = process.poll() is None  # (then a last look at what it left)
                if target is None and (steps := watcher.logged_steps()) is not None:
                    total = steps[-1]
                    target = _choose(choose_target, steps, started_from)
                observed = watcher.last_step()
                if not running:
                    break
                if target is not None and observed is not None and observed >= target:
                    process.send_signal(signum)
                    sent = True
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the run in {workdir} did not reach step {target} "
                                       f"in {timeout:.0f} s (last logged: {observed})")
                time.sleep(poll_s)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        output.seek(0)
        text = output.read().decode(errors="replace")
    stopped = subprocess.CompletedProcess(process.args, process.returncode, text)
    name = signal.Signals(signum).name
    if process.returncode == 0 or (None not in (observed, total) and observed >= total):
        raise KillMissed(f"the run in {workdir} finished training (step {total}) before its "
                         f"{name} scheduled at step {target} landed (last step seen: "
                         f"{observed}):\n{text[-2000:]}")
    if not sent:
        raise RuntimeError(f"the run in {workdir} failed on its own (exit code "
                           f"{process.returncode}) before step {target}:\n{text[-3000:]}")
    return Kill(target, observed, max(checkpoint_steps(workdir), default=0)), stopped


def _choose(choose_target: Callable[[list[int]], int], logged_steps: list[int],
            started_from: int) -> int:
    ahead = [s for s in logged_steps if started_from < s < logged_steps[-1]]
    if not ahead:
        raise KillMissed(f"no logged step is left between checkpoint {started_from} and the "
                         f"run's last step ({logged_steps[-1]}) to interrupt it at: ask for "
                         "fewer kills or a longer run")
    target = choose_target(ahead)
    if target not in ahead:
        raise ValueError(f"step {target} is not a logged step ahead of checkpoint "
                         f"{started_from} and before the last: choose among {ahead}")
    return target


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


def chaos(flags: list[str], root, *, kills: int, seed: int, env: dict | None = None,
          uninterrupted: Path | None = None) -> ChaosReport:
    """Kills and restarts a run of `flags` in root/killed (`root` a path or gs:// URL) at
    `kills` steps drawn from `seed`; compares with `uninterrupted` (a finished run of the
    same flags, the log interval aside), which it first makes in root/ if not given.
    """
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
        kill, _ = signal_at_step(flags, chaotic, env, rng.choice)
        report.landed.append(kill)
    run_to_end(flags, chaotic, env)
    report.resumed = report.kills
    a, b = final_params(straight), final_params(chaotic)
    report.params_equal = int(a["step"]) == int(b["step"]) and all(
        trees_equal(a.get(k), b.get(k)) for k in ("params", "model_state", "opt_state", "ema"))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="draws the step of each kill")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("flags", nargs="*", default=DEFAULT_FLAGS)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="chaos."))
    print(f"workdirs: {root}", flush=True)
    try:
        report = chaos(args.flags, root, kills=args.kills, seed=args.seed)
    except KillMissed as e:
        sys.exit(f"chaos: {e}")
    print(report.describe())
    sys.exit(0 if report.params_equal and report.kills == args.kills else 1)


if __name__ == "__main__":
    main()
