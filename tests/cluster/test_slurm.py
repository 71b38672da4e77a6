"""launch/slurm.sbatch, unchanged, under a real SLURM (tests/cluster/slurm_cluster.py): two
nodes training like one process, a preempted job requeued and resumed to the same
parameters, a bad config not requeued, a node lost mid-run; and, with a stand-in for
imagenet-jax where only the launcher and SLURM are under test (GPUs, the data service, how
each way of stopping a job ends), the commands the script runs on each node and when it
requeues. `make test-cluster` runs them (as root: the nodes are network namespaces).

Each job runs on CPU devices (GPUS_PER_NODE=cpu:2) on both nodes, which SLURM schedules as
GPU nodes of 8 GPUs, so the script's own #SBATCH lines (--gpus-per-node=8, --exclusive,
--requeue, --open-mode=append) all apply."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from chaos import checkpoint_steps, final_params, trees_equal
from conftest import REPO, subprocess_env

from imagenet_jax.run_dir import read_records

LAUNCH = REPO / "launch"
# Every variable launch/slurm.sbatch reads, dropped from the environment jobs are submitted in.
LAUNCHER_VARIABLES = ("CONFIG WORKDIR VENV EXTRA_ARGS COORDINATOR_PORT GPUS_PER_NODE "
                      "DATA_SERVICE_NODES DATA_SERVICE_PORT").split()
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT_S = 240
# 3 steps, each logged: where 2 processes and 1 agree to 1e-5 (tests/test_multiprocess.py).
SHORT = ["--config.num_epochs=0.25", "--config.log_every_steps=1"]
# 24 steps, a checkpoint every 4, one evaluation: long enough to be stopped in the middle.
RESUMABLE = ["--config.num_epochs=2", "--config.checkpoint_every_steps=4",
             "--config.eval_every_epochs=2"]


# Submitting and watching jobs.


def _job_env(cluster, **variables: str) -> dict:
    """The submitter's environment: this session's (its 8 fake devices in XLA_FLAGS, its
    compilation cache), without SLURM_* or launcher variables but `variables`."""
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCHER_VARIABLES and not key.startswith("SLURM_")}
    # The job runs VENV/bin/imagenet-jax, which may be installed from another checkout (a
    # worktree sharing the venv): the jobs train this tree's code.
    return {**env, "SLURM_CONF": str(cluster.conf), "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": str(REPO), **variables}


def _sbatch(cluster, jobs: Path, script: str, *args: str, options=(), **variables) -> str:
    """Submits launch/SCRIPT from the repository, its log written in `jobs`; the job's id."""
    jobs.mkdir(exist_ok=True)
    submitted = subprocess.run(
        [*cluster.client_command("sbatch", "--parsable", f"--chdir={jobs}", *options),
         str(LAUNCH / script), *args],
        cwd=REPO, env=_job_env(cluster, **variables), capture_output=True, text=True,
        timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def _train(cluster, jobs: Path, dataset: Path, workdir: Path, *flags: str, options=(),
           **variables) -> str:
    """Submits a training of the tiny recipe on both nodes, 2 CPU devices each."""
    return _sbatch(cluster, jobs, "slurm.sbatch", f"--config.dataset=folder:{dataset}",
                   "--heartbeat_timeout_s=5", *flags, options=options,
                   **{"GPUS_PER_NODE": "cpu:2", "CONFIG": "tests/tiny_config.py",
                      "WORKDIR": str(workdir), **variables})


def _job(cluster, job: str) -> dict:
    """`scontrol show job`'s fields."""
    shown = cluster.client("scontrol", "show", "job", "-o", job).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def _log(jobs: Path, job: str) -> str:
    path = jobs / f"slurm-imagenet-jax-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for(condition, what: str, timeout_s: float = JOB_TIMEOUT_S, log=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not after {timeout_s} s: {what}\n{log()[-5000:]}"
        time.sleep(0.2)
    return result


def _finished(cluster, jobs: Path, job: str, timeout_s: float = JOB_TIMEOUT_S) -> dict:
    """The job's fields once it has ended for good."""
    return _wait_for(lambda: (info := _job(cluster, job))["JobState"] in FINISHED and info,
                     f"job {job} finished", timeout_s, log=lambda: _log(jobs, job))


def _requeued(cluster, jobs: Path, job: str, restarts: int = 1) -> dict:
    """The job's fields once it waits to start again for the `restarts`th time."""
    return _wait_for(lambda: ((info := _job(cluster, job))["JobState"] == "PENDING" and
                              info["Restarts"] == str(restarts) and info),
                     f"job {job} requeued", log=lambda: _log(jobs, job))


def _started_from(log: str) -> list[int]:
    """The step each attempt's training started from, in order."""
    return [int(step) for step in re.findall(r"^Training from step (\d+) of", log, re.M)]


# Real training.


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_dataset, tmp_path_factory):
    """The RESUMABLE run, uninterrupted, as 2 processes of 2 CPU devices on this machine
    (launch/local.sh), started in the background (it trains while jobs wait on SLURM): what
    a stopped and resumed job must equal, bitwise. Yields (process, workdir)."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    output = open(workdir.parent / "output.txt", "w+")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(LAUNCH / "local.sh"), "2", "train", "--config=tests/tiny_config.py",
         f"--config.dataset=folder:{tiny_dataset}", *RESUMABLE, f"--workdir={workdir}"],
        cwd=REPO, env=subprocess_env(2), stdout=output, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        yield process, workdir
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        output.close()


@pytest.fixture
def uninterrupted(uninterrupted_run) -> Path:
    """The finished run of `uninterrupted_run`."""
    process, workdir = uninterrupted_run
    code = process.wait(timeout=JOB_TIMEOUT_S)
    assert code == 0, (workdir.parent / "output.txt").read_text()[-3000:]
    return workdir


def test_two_nodes_train_like_one_process_of_four(cluster, tiny_dataset, uninterrupted_run,
                                                  tmp_path):
    jobs, two, one = tmp_path / "jobs", tmp_path / "two_nodes", tmp_path / "one_process"
    job = _train(cluster, jobs, tiny_dataset, two, *SHORT)
    alone = subprocess.run([sys.executable, "-m", "imagenet_jax", "train",
                            "--config=tests/tiny_config.py",
                            f"--config.dataset=folder:{tiny_dataset}", *SHORT, f"--workdir={one}"],
                           cwd=REPO, env=subprocess_env(4), capture_output=True, text=True,
                           timeout=JOB_TIMEOUT_S)
    assert alone.returncode == 0, alone.stderr[-3000:]
    info, log = _finished(cluster, jobs, job), _log(jobs, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    # One process on each node (its own host name), joined through node1; the submitter's
    # 8 devices in XLA_FLAGS replaced by the 2 asked for.
    assert "attempt 1, on 2 node(s) of 2 CPU devices" in log
    assert "--coordinator_address=node1:" in log
    assert re.search(r"^Log: \S+/train\.node1\.", log, re.M)
    assert re.search(r"^Log: \S+/train\.node2\.", log, re.M)
    (train_log,) = (two / "logs").glob("train.node1.*.log")
    assert "Devices: 4 over 2 process(es)" in train_log.read_text()

    records = [read_records(w) for w in (two, one)]
    assert [(r["step"], r["split"]) for r in records[0]] == [
        (r["step"], r["split"]) for r in records[1]]
    for a, b in zip(*records, strict=True):
        if a["split"] == "train":
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        else:
            assert a["num_examples"] == b["num_examples"] == 70
            assert a["top1"] == b["top1"]
    params = [final_params(w)["params"] for w in (two, one)]
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_preempted_job_is_requeued_and_resumes_to_the_same_parameters(
        cluster, tiny_dataset, uninterrupted, tmp_path):
    """`scancel --signal=TERM` signals the job's steps, as a preemption and the time limit's
    --signal=TERM@120 do: both processes save a checkpoint and exit 75, the script requeues
    the job, and the second attempt, appended to the same log, resumes."""
    jobs, workdir = tmp_path / "jobs", tmp_path / "run"
    job = _train(cluster, jobs, tiny_dataset, workdir, *RESUMABLE)
    _wait_for(lambda: checkpoint_steps(workdir), "a first checkpoint",
              log=lambda: _log(jobs, job))
    cluster.client("scancel", "--signal=TERM", job)
    _requeued(cluster, jobs, job)
    info, log = _finished(cluster, jobs, job), _log(jobs, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "node1: task 0: Exited with exit code 75" in log
    assert "node2: task 1: Exited with exit code 75" in log
    assert "requeueing job" in log
    assert "attempt 1," in log and "attempt 2," in log
    first, resumed = _started_from(log)
    assert first == 0 and 4 <= resumed < 24, log
    assert trees_equal(final_params(workdir), final_params(uninterrupted))


def test_a_bad_config_fails_the_job_without_a_requeue(cluster, tiny_dataset, tmp_path):
    jobs = tmp_path / "jobs"
    job = _train(cluster, jobs, tiny_dataset, tmp_path / "run", "--config.model=resnet_nope")
    info, log = _finished(cluster, jobs, job), _log(jobs, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    errors = [line for line in log.splitlines() if line.startswith("imagenet-jax:")]
    assert len(errors) == 2 and all("resnet_nope" in line for line in errors), log
    assert "requeue" not in log
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_lost_node_ends_the_other_process_and_the_job_resumes(cluster, tiny_dataset,
                                                                uninterrupted, tmp_path):
    """node2 loses power (everything in its namespace SIGKILLed): process 0 on node1 stops
    at the heartbeat timeout with JAX's line, SLURM sets node2 DOWN and requeues the job,
    and once node2 is back the job resumes from the last checkpoint."""
    jobs, workdir = tmp_path / "jobs", tmp_path / "run"
    job = _train(cluster, jobs, tiny_dataset, workdir, *RESUMABLE)
    _wait_for(lambda: checkpoint_steps(workdir), "a first checkpoint",
              log=lambda: _log(jobs, job))
    assert cluster.kill_node("node2")
    _wait_for(lambda: "detected fatal errors" in _log(jobs, job),
              "process 0's line on its lost peer", log=lambda: _log(jobs, job))
    _requeued(cluster, jobs, job)
    assert cluster.node_states()["node2"].startswith("down")
    cluster.start_node("node2")
    info, log = _finished(cluster, jobs, job), _log(jobs, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    # Process 0 ended by itself, at the heartbeat, before SLURM ended the job for the node.
    lost = log.index("Terminating process because the JAX distributed service detected fatal")
    assert "stopped sending heartbeats" in log[lost:lost + 1000]
    assert "not requeued by this script" not in log[:lost]
    first, resumed = _started_from(log)
    assert first == 0 and 4 <= resumed < 24, log
    assert trees_equal(final_params(workdir), final_params(uninterrupted))
