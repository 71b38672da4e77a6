"""Runs survive SIGKILL, SIGTERM, bad numbers, unreadable checkpoints and topology changes."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from chaos import REPO, chaos, checkpoint_steps, command, final_params, run_to_end
from conftest import resumable_config, resumable_flags, subprocess_env, tiny_config

from imagenet_jax import storage
from imagenet_jax.checkpoint import Checkpointer
from imagenet_jax.config import ConfigError
from imagenet_jax.metrics import read_records
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.train import loop, recipe

TOTAL_STEPS = 6 * (400 // 32)  # num_epochs=6 over the tiny dataset's 400 images


def _flags(dataset, *extra):
    return resumable_flags(dataset, *extra)


def _env():
    return subprocess_env(4)


def test_sigterm_then_sigkills_resume_to_identical_parameters(tiny_dataset, uninterrupted,
                                                              tmp_path):
    flags, workdir = _flags(tiny_dataset), tmp_path / "killed"
    # SIGTERM: a checkpoint at the step reached, exit code 75.
    process = subprocess.Popen(command(flags, workdir), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not checkpoint_steps(workdir) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    stopped_at = max(checkpoint_steps(workdir))
    assert f"preempted: saved a checkpoint at step {stopped_at}" in stderr
    assert stopped_at < TOTAL_STEPS

    # Then SIGKILL at random moments, twice, restarting each time (the chaos test).
    report = chaos(flags, tmp_path, kills=2, seed=0, max_delay=1.0, env=_env(),
                   uninterrupted=uninterrupted)
    assert report.kills == 2, report
    assert report.params_equal, report

    # The resumed run's metrics.jsonl holds each record once, ending on the final eval.
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    keys = [(r["step"], r["split"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) and keys[-2:] == [(TOTAL_STEPS, "val"),
                                                         (TOTAL_STEPS, "val_ema")]
    # (A test of resuming, not of learning: at 12-16 px, 72 steps and this much
    # augmentation the tiny run stays near chance; the demo runs of README's "Recipes at
    # scale" table and tests/test_learning.py are the evidence of learning.)

    again = run_to_end(flags, uninterrupted, _env())  # a finished run says so, exits 0
    assert "already finished" in again.stdout


def test_absurd_learning_rate_stops_naming_the_step(tiny_dataset, tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        command(_flags(tiny_dataset, "--config.learning_rate=1e9",
                       "--config.checkpoint_every_steps=1"), workdir),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    message = [line for line in result.stderr.splitlines() if "non-finite" in line][-1]
    bad_step = int(message.split("at step ")[1].split(";")[0])
    kept = max(checkpoint_steps(workdir))
    assert f"the last good checkpoint (step {kept}) is intact" in message
    assert kept < bad_step
    saved = final_params(workdir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))


def test_skip_mode_counts_and_survives_non_finite_steps(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, learning_rate=1e9, on_nonfinite="skip", num_epochs=0.5,
                         eval_batch_size=80)
    result = loop.train_and_evaluate(config, tmp_path / "run")
    records = [r for r in read_records(tmp_path / "run")
               if r["split"] == "train"]
    assert records[-1]["skipped_steps_total"] > 0
    assert result["num_examples"] == 70
    saved = final_params(tmp_path / "run")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))


def test_unreadable_checkpoint_falls_back_to_the_previous(tmp_path):
    mesh = mesh_from_shape({"data": 1})
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    checkpointer = Checkpointer(tmp_path, every_steps=1, keep=5)
    for step in (1, 2):
        state = {"step": np.int32(step), "w": np.full((4,), float(step), np.float32)}
        checkpointer.save(step, jax.device_put(state, sharding), force=True)
    checkpointer.wait()
    for path in (tmp_path / "2").rglob("*"):  # wreck every file of the newest checkpoint
        if path.is_file():
            path.write_bytes(b"garbage")
    template = jax.device_put({"step": np.int32(0), "w": np.zeros((4,), np.float32)}, sharding)
    restored = checkpointer.restore_latest(template)
    assert int(restored["step"]) == 1 and float(restored["w"][0]) == 1.0
    assert (tmp_path / "2.unreadable").exists() and checkpointer.latest_step() == 1
    checkpointer.close()


def test_checkpoint_from_4_devices_restores_on_8_2_and_1_and_into_fsdp_with_the_same_eval(
        tiny_dataset, uninterrupted):
    """The uninterrupted run's checkpoint (4 devices, replicated state) restores on other
    device counts, and into an fsdp layout (data 2 x fsdp 4: the convolutions and their
    momentum split four ways), each giving the run's own final eval."""
    results = []
    for data, fsdp in ((8, 1), (2, 1), (1, 1), (2, 4)):
        config = resumable_config(tiny_dataset, fsdp_min_size=1024)
        config.mesh.data, config.mesh.fsdp = data, fsdp
        source, derived = recipe.plan(config)
        mesh = mesh_from_shape(derived.mesh_shape)
        run = recipe.build(config, derived, mesh)
        checkpointer = Checkpointer(uninterrupted / "checkpoints", every_steps=1, keep=3)
        state = checkpointer.restore_latest(run.state)
        checkpointer.close()
        assert int(state.step) == TOTAL_STEPS
        placed = {d.id for d in jax.tree.leaves(state.params)[0].devices()}
        assert placed == {d.id for d in mesh.devices.flat}
        specs = [x.sharding.spec for x in jax.tree.leaves((state.params, state.opt_state))]
        assert any("fsdp" in spec for spec in specs) == (fsdp > 1)
        results.append(loop.run_eval(run.eval_step, state, source=source, config=config,
                                     mesh=mesh))
    logged = [r for r in read_records(uninterrupted) if r["split"] == "val"]
    assert all(r["num_examples"] == 70 for r in results)
    assert {r["top1"] for r in results} == {logged[-1]["top1"]}
    np.testing.assert_allclose([r["loss"] for r in results], logged[-1]["loss"], rtol=1e-5)


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "imagenet_jax", "train",
                             f"--workdir={blocker / 'run'}"], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "is not writable" in result.stderr


def test_a_workdir_url_other_than_gs_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="gs://BUCKET/PATH"):
        loop.check_writable(storage.as_path("s3://bucket/run"))
