"""Runs survive SIGKILL, SIGTERM, bad numbers, unreadable checkpoints and topology changes."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from chaos import (
    REPO,
    KillMissed,
    RunWatcher,
    chaos,
    checkpoint_steps,
    command,
    final_params,
    signal_at_step,
)
from conftest import resumable_config, resumable_flags, subprocess_env, tiny_config

from imagenet_jax import run_dir, storage
from imagenet_jax.checkpoint import Checkpointer
from imagenet_jax.errors import ConfigError
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.run_dir import read_records
from imagenet_jax.train import assemble, goodput, loop

TOTAL_STEPS = 4 * (400 // 32)  # num_epochs=4 over the tiny dataset's 400 images


def _flags(dataset, *extra):
    return resumable_flags(dataset, *extra)


def _env():
    return subprocess_env(4)


def test_sigterm_then_sigkill_resume_to_identical_parameters(tiny_dataset, uninterrupted,
                                                             tmp_path):
    # Every step logged, so that each signal lands at the step it is scheduled at (the log
    # interval changes no trained number: `uninterrupted` logs every 5th step).
    flags, workdir = _flags(tiny_dataset, "--config.log_every_steps=1"), tmp_path / "killed"
    # SIGTERM at step 10: a checkpoint at the step reached, off the 8-step interval, and
    # exit code 75.
    term, stopped = signal_at_step(flags, workdir, _env(), lambda ahead: 10,
                                   signum=signal.SIGTERM)
    assert stopped.returncode == 75, stopped.stdout[-3000:]
    stopped_at = term.resumed_from
    assert f"preempted: saved a checkpoint at step {stopped_at}" in stopped.stdout
    assert term.observed <= stopped_at < TOTAL_STEPS, term

    # Then SIGKILL at a step drawn from those ahead and restart (the chaos test, once here;
    # `make chaos` kills five times); a run that finished before its kill would have
    # raised KillMissed.
    report = chaos(flags, tmp_path, kills=1, seed=0, env=_env(), uninterrupted=uninterrupted)
    print(report.describe())
    assert report.kills == 1 and report.params_equal, report.describe()
    started_from = [stopped_at] + [kill.resumed_from for kill in report.landed[:-1]]
    for kill, start in zip(report.landed, started_from, strict=True):
        assert start < kill.target <= kill.observed < TOTAL_STEPS, report.describe()
        assert kill.resumed_from <= kill.observed, report.describe()

    # metrics.jsonl keeps the records of each of the three attempts; the run's history
    # holds each record once, ending on the final eval and the run's goodput.
    keys = [(r["step"], r["split"]) for r in read_records(workdir)]
    assert len(keys) == len(set(keys)) and keys[-3:] == [
        (TOTAL_STEPS, "val"), (TOTAL_STEPS, "val_ema"), (TOTAL_STEPS, "goodput")]
    every = read_records(workdir, every_attempt=True)
    assert {r["attempt"] for r in every} == {1, 2, 3}
    # The SIGKILLed attempt's work after the checkpoint the next one resumed from was done
    # again: its training seconds there, as its own records give them, are lost work (the
    # SIGTERMed attempt lost none: it saved where it stopped).
    (kill,) = report.landed
    killed = [r for r in every if r["split"] == "goodput" and r["attempt"] == 2]
    kept = [r for r in killed if r["step"] <= kill.resumed_from]
    lost = killed[-1]["attempt_seconds"]["training"] - (
        kept[-1]["attempt_seconds"]["training"] if kept else 0.0)
    assert killed[-1]["step"] > kill.resumed_from and lost > 0
    summary = goodput.summarize(every)
    assert summary.attempts == 3
    assert summary.seconds["lost_work"] == pytest.approx(lost, abs=1e-3)
    assert summary.seconds["downtime"] > 0  # two restarts, each a new process
    final = read_records(workdir)[-1]
    assert final["lost_work_s"] == pytest.approx(lost, abs=1e-3)
    assert final["wall_s"] == pytest.approx(summary.wall_s, abs=1e-2)
    cli = subprocess.run([sys.executable, "-m", "imagenet_jax", "goodput", str(workdir),
                          "--json"], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stderr[-2000:]
    printed = json.loads(cli.stdout)[str(workdir)]
    assert printed["attempts"] == 3 and printed["lost_work_s"] == pytest.approx(lost, abs=1e-3)
    # (A test of resuming, not of learning: at 12-16 px, 48 steps and this much
    # augmentation the tiny run stays near chance; the demo runs of README's "Recipes at
    # scale" table and tests/test_learning.py are the evidence of learning.)



# Stands in for `imagenet-jax train` of 3 steps: writes its plan, logs steps 1 to
# argv[2] at once (each file replaced whole, as the run's are) and exits with argv[3].
_INSTANT_RUN = """
import json, pathlib, sys
workdir = pathlib.Path(sys.argv[1])
workdir.mkdir(parents=True, exist_ok=True)
def write(name, text):
    (workdir / ".partial").write_text(text)
    (workdir / ".partial").replace(workdir / name)
write("config.json", json.dumps({"config": {"log_every_steps": 1},
                                 "derived": {"num_train_steps": 3}}))
write("metrics.jsonl", "".join(json.dumps({"step": s, "split": "train"}) + "\\n"
                               for s in range(1, int(sys.argv[2]) + 1)))
sys.exit(int(sys.argv[3]))
"""


@pytest.mark.parametrize("last_step, exit_code, error, message", [
    (3, 0, KillMissed, r"finished training \(step 3\) before its SIGKILL scheduled at step 2"),
    (1, 1, RuntimeError, r"failed on its own \(exit code 1\) before step 2")],
    ids=["finished", "failed"])
def test_a_run_that_ends_before_its_kill_fails_the_chaos_test(monkeypatch, tmp_path, last_step,
                                                                exit_code, error, message):
    monkeypatch.setattr("chaos.command",
                        lambda flags, workdir: [sys.executable, "-c", _INSTANT_RUN,
                                                str(workdir), str(last_step), str(exit_code)])
    with pytest.raises(error, match=message):
        signal_at_step([], tmp_path / "run", _env(), lambda ahead: ahead[-1])


def test_the_chaos_killer_counts_only_the_steps_its_run_logs(tmp_path):
    def write_records(*steps):
        (tmp_path / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "split": "train"}) + "\n" for s in steps))

    (tmp_path / "config.json").write_text(json.dumps(
        {"config": {"log_every_steps": 5}, "derived": {"num_train_steps": 12}}))
    write_records(1, 5, 10)  # left by a run killed after step 10, its checkpoint at 5
    watcher = RunWatcher(tmp_path)
    assert watcher.logged_steps() == [1, 5, 10, 12]
    assert watcher.last_step() is None  # the records of the run before are not progress
    write_records(1, 5)  # the next run starts: it drops the records past its checkpoint
    assert watcher.last_step() == 5
    write_records(1, 5, 10)  # the same text as before, written by this run
    assert watcher.last_step() == 10


def test_absurd_learning_rate_stops_naming_the_step(tiny_dataset, tmp_path):
    workdir = tmp_path / "run"
    # The plain tiny recipe on one device (the rule is the loop's, not the recipe's).
    result = subprocess.run(
        command(["--config=tests/tiny_config.py", f"--config.dataset=folder:{tiny_dataset}",
                 "--config.learning_rate=1e9", "--config.checkpoint_every_steps=1"], workdir),
        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
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
    config.mesh.data = 1
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


def test_checkpoint_from_4_devices_restores_on_8_and_1_and_into_fsdp_with_the_same_eval(
        tiny_dataset, uninterrupted):
    """The uninterrupted run's checkpoint (4 devices, replicated state) restores on more
    and fewer devices, and into an fsdp layout (data 2 x fsdp 4: the convolutions and their
    momentum split four ways), each giving the run's own final eval."""
    results = []
    for data, fsdp in ((8, 1), (1, 1), (2, 4)):
        config = resumable_config(tiny_dataset, fsdp_min_size=1024)
        config.mesh.data, config.mesh.fsdp = data, fsdp
        source, derived = assemble.plan(config)
        mesh = mesh_from_shape(derived.mesh_shape)
        run = assemble.build(config, derived, mesh)
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
    assert "is not writable: Not a directory" in result.stderr
    # Before the model is built (the log's last line is the plan's), and nothing created.
    log = Path(result.stdout.split("Log: ", 1)[1].split(" ", 1)[0]).read_text()
    assert "Devices:" not in log and "Parameter" not in log
    run_dir.check_writable(tmp_path / "not" / "yet" / "made")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    run_dir.create(tmp_path / "not" / "yet" / "made")
    assert (tmp_path / "not" / "yet" / "made").is_dir()


def test_a_workdir_url_other_than_gs_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="gs://BUCKET/PATH"):
        run_dir.check_writable(storage.as_path("s3://bucket/run"))
