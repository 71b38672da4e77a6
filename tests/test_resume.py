"""A run killed with SIGKILL and restarted ends with the parameters of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from imagenet_jax.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6 * (400 // 32)  # num_epochs=6 over the tiny dataset's 400 images


def _command(dataset, workdir):
    return [sys.executable, "-m", "imagenet_jax", "train", "--config=tests/tiny_config.py",
            f"--config.dataset=folder:{dataset}", "--config.num_epochs=6",
            "--config.checkpoint_every_steps=4", f"--workdir={workdir}"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=4")


def _run(dataset, workdir):
    result = subprocess.run(_command(dataset, workdir), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _kill_after_a_checkpoint(dataset, workdir) -> int:
    """Starts a run, SIGKILLs it once a checkpoint past step 4 is complete; returns that step."""
    process = subprocess.Popen(_command(dataset, workdir), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = Path(workdir) / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
            if steps and max(steps) >= 8:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                return max(steps)
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            process.kill()
    raise AssertionError(f"the run ended (code {process.returncode}) before it could be killed")


def test_sigkill_then_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(tiny_dataset, straight)
    killed_at = _kill_after_a_checkpoint(tiny_dataset, killed)
    assert Checkpointer(killed / "checkpoints", every_steps=4, keep=3).latest_step() < TOTAL_STEPS
    _run(tiny_dataset, killed)

    final = [Checkpointer(workdir / "checkpoints", every_steps=4, keep=3).load()
             for workdir in (straight, killed)]
    assert int(final[0]["step"]) == int(final[1]["step"]) == TOTAL_STEPS
    for name in ("params", "model_state", "opt_state"):
        leaves = zip(jax.tree.leaves(final[0][name]), jax.tree.leaves(final[1][name]), strict=True)
        for a, b in leaves:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert killed_at < TOTAL_STEPS

    # The resumed run's metrics.jsonl holds each step once, ending on the final eval.
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    keys = [(r["step"], r["split"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) and keys[-1] == (TOTAL_STEPS, "val")

    again = _run(tiny_dataset, straight)  # a finished run says so and exits 0
    assert "already finished" in again.stderr
