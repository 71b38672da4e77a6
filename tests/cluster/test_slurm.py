"""launch/slurm.sbatch, unchanged, under a real SLURM (tests/cluster/slurm_cluster.py): two
nodes training like one process, a preempted job requeued and resumed to the same
parameters, a bad config not requeued, a node lost mid-run; and, with a stand-in for
imagenet-jax where only the launcher and SLURM are under test (GPUs, the data service, how
each way of stopping a job ends), the commands the script runs on each node and when it
requeues. `make test-cluster` runs them (as root: the nodes are network namespaces).

SLURM schedules both nodes as GPU nodes of 8 GPUs, so the script's own #SBATCH lines
(--gpus-per-node=8, --exclusive, --requeue, --open-mode=append) all apply; the trainings run
on CPU devices (GPUS_PER_NODE=cpu:2)."""

import json
import os
import re
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

pytestmark = pytest.mark.cluster  # left out of the default run (pyproject.toml)

LAUNCH = REPO / "launch"
# Every variable launch/slurm.sbatch reads, dropped from the environment jobs are submitted in.
LAUNCHER_VARIABLES = ("CONFIG WORKDIR VENV EXTRA_ARGS COORDINATOR_PORT GPUS_PER_NODE "
                      "DATA_SERVICE_NODES DATA_SERVICE_PORT").split()
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT_S = 240
# The tiny recipe for 10 steps, each logged, a checkpoint every 5: long enough to stop in the
# middle. At this learning rate 2 processes and 1 agree to 2e-7 in every step's loss, so one
# uninterrupted job is both what a 1-process run must match within the bounds of
# tests/test_multiprocess.py (which at the recipe's 0.4 holds them for 3 steps only) and what
# a stopped and resumed job must equal bitwise.
RECIPE = ["--config.num_epochs=0.8", "--config.learning_rate=0.05",
          "--config.checkpoint_every_steps=5", "--config.log_every_steps=1"]
NUM_STEPS = 10


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
    return [int(step) for step in re.findall(r"^(?:Training from|Resuming at) step (\d+) of",
                                             log, re.M)]


# Real training.


@pytest.fixture(scope="module")
def uninterrupted_job(cluster, tiny_dataset, tmp_path_factory) -> tuple[Path, str, Path]:
    """RECIPE submitted on both nodes, not waited for: (its jobs folder, its id, its workdir)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    jobs, workdir = root / "jobs", root / "run"
    return jobs, _train(cluster, jobs, tiny_dataset, workdir, *RECIPE), workdir


@pytest.fixture(scope="module")
def uninterrupted(cluster, uninterrupted_job) -> Path:
    """The workdir of `uninterrupted_job`, finished."""
    jobs, job, workdir = uninterrupted_job
    info = _finished(cluster, jobs, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), \
        _log(jobs, job)
    return workdir


def test_two_nodes_train_like_one_process_of_four(cluster, tiny_dataset, uninterrupted_job,
                                                  tmp_path):
    jobs, job, two = uninterrupted_job
    one = tmp_path / "one_process"
    alone = subprocess.run([sys.executable, "-m", "imagenet_jax", "train",
                            "--config=tests/tiny_config.py",
                            f"--config.dataset=folder:{tiny_dataset}", *RECIPE, f"--workdir={one}"],
                           cwd=REPO, env=subprocess_env(4), capture_output=True, text=True,
                           timeout=JOB_TIMEOUT_S)  # while the job trains
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
    assert records[0][-1]["step"] == NUM_STEPS
    for a, b in zip(*records, strict=True):
        if a["split"] == "train":
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        elif a["split"] != "goodput":  # (goodput records time each machine's work)
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
    job = _train(cluster, jobs, tiny_dataset, workdir, *RECIPE)
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
    assert first == 0 and 0 < resumed < NUM_STEPS, log
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
    job = _train(cluster, jobs, tiny_dataset, workdir, *RECIPE)
    _wait_for(lambda: checkpoint_steps(workdir), "a first checkpoint",
              log=lambda: _log(jobs, job))
    assert cluster.kill_node("node2")
    ended = re.compile(r"^srun: error: node1: task 0: (Aborted|Exited with exit code \d+)", re.M)
    # Far above the 5 s heartbeat: a bound on a hang, not on the speed of this machine.
    _wait_for(lambda: ended.search(_log(jobs, job)), "process 0 ended", timeout_s=60,
              log=lambda: _log(jobs, job))
    _requeued(cluster, jobs, job)
    assert cluster.node_states()["node2"].startswith("down")
    cluster.start_node("node2")
    info, log = _finished(cluster, jobs, job), _log(jobs, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    # Process 0 ended by itself, naming the heartbeat, before SLURM ended the job for the node.
    lost = ended.search(log).start()
    assert "Terminating process because the JAX distributed service detected fatal errors" \
        in log[:lost]
    assert "heartbeat" in log[:lost]  # "Task 1 heartbeat timeout" or "stopped sending heartbeats"
    assert log.index("srun: error: Node failure on node2") > lost
    first, resumed = _started_from(log)
    assert first == 0 and 0 < resumed < NUM_STEPS, log
    assert trees_equal(final_params(workdir), final_params(uninterrupted))


# The launcher under SLURM, with a stand-in for imagenet-jax: what each node is given to run
# (GPUs cannot run here), and how each way of stopping a job ends.

STAND_IN = '''#!{python}
"""imagenet-jax's stand-in: records how it was started in $STAND_IN_DIR/ROLE.HOST.json, then
trains for $STAND_IN_SECONDS and exits $STAND_IN_EXIT, or serves as a data service
dispatcher (listening) or worker until a SIGTERM; a SIGTERM, recorded in ROLE.HOST.stopped,
makes a trainer exit 75 as imagenet-jax does after its checkpoint."""
import json, os, signal, socket, sys, time
from pathlib import Path

out = Path(os.environ["STAND_IN_DIR"])
role = sys.argv[2] if sys.argv[1] == "data-service" else sys.argv[1]
host = socket.gethostname()
variables = ("JAX_LOCAL_DEVICE_IDS", "JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
             "SLURM_CPUS_PER_TASK", "SLURM_NODEID", "SLURM_RESTART_COUNT")
(out / f"{{role}}.{{host}}.json").write_text(json.dumps(
    {{"argv": sys.argv[1:], "env": {{name: os.environ.get(name) for name in variables}}}}))


def stop(signum, frame):
    (out / f"{{role}}.{{host}}.stopped").write_text(str(signum))
    sys.exit(75 if role == "train" else 143)


signal.signal(signal.SIGTERM, stop)
if role == "dispatcher":
    if os.environ.get("STAND_IN_DISPATCHER_FAILS"):
        sys.exit(1)
    server = socket.create_server(("127.0.0.1", int(sys.argv[3].split("=")[1])))
if role == "train":
    deadline = time.monotonic() + float(os.environ.get("STAND_IN_SECONDS", "0"))
    if any(arg.startswith("--config.data_service=") for arg in sys.argv):
        deadline = time.monotonic() + 60  # until a worker serves: a run outlasts its start
        while not list(out.glob("worker.*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        while time.monotonic() < deadline:
            time.sleep(0.05)
    sys.exit(int(os.environ.get("STAND_IN_EXIT", "0")))
time.sleep(120)
'''


@pytest.fixture
def stand_in(tmp_path) -> dict:
    """A venv whose imagenet-jax is the stand-in, and where it records: the variables that
    give them to a job."""
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    program = tmp_path / "venv" / "bin" / "imagenet-jax"
    program.write_text(STAND_IN.format(python=sys.executable))
    program.chmod(0o755)
    (tmp_path / "calls").mkdir()
    return {"VENV": str(tmp_path / "venv"), "STAND_IN_DIR": str(tmp_path / "calls")}


def _calls(stand_in: dict) -> dict[str, dict]:
    """ROLE.HOST -> how the stand-in was started there."""
    return {path.name.removesuffix(".json"): json.loads(path.read_text())
            for path in Path(stand_in["STAND_IN_DIR"]).glob("*.json")}


def test_gpu_nodes_run_one_process_each_on_all_their_gpus(cluster, stand_in, tmp_path):
    """The script's defaults on nodes of 8 GPUs (SLURM's own --gpus-per-node=8): one process
    per node, each given all of the node's GPUs and CPUs, joined through the first node."""
    jobs = tmp_path / "jobs"
    job = _sbatch(cluster, jobs, "slurm.sbatch", "--config.num_epochs=90", **stand_in,
                  EXTRA_ARGS="--config.batch_size=2048 --config.dataset=folder:/d")
    info, log = _finished(cluster, jobs, job), _log(jobs, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "attempt 1, on 2 node(s) of 8 GPUs" in log
    calls = _calls(stand_in)
    assert sorted(calls) == ["train.node1", "train.node2"]
    for process, node in enumerate(("node1", "node2")):
        call = calls[f"train.{node}"]
        assert call["argv"] == [
            "train", "--config=configs/resnet.py:resnet50",
            f"--workdir={REPO}/runs/resnet_resnet50",
            f"--coordinator_address=node1:{20000 + int(job) % 10000}", "--num_processes=2",
            "--config.batch_size=2048", "--config.dataset=folder:/d", "--config.num_epochs=90",
            f"--process_id={process}"]
        assert call["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
        assert call["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # SLURM's
        assert call["env"]["SLURM_CPUS_PER_TASK"] == str(os.cpu_count())
        assert call["env"]["JAX_PLATFORMS"] is None


@pytest.mark.parametrize("stop, requeued_by", [
    # The steps alone are signalled, as by a preemption or the time limit's --signal.
    (["scancel", "--signal=TERM"], "this script"),
    # srun too, which SIGKILLs the tasks: no checkpoint, but the job comes back.
    (["scancel", "--signal=TERM", "--full"], "this script"),
    (["scontrol", "requeue"], "SLURM"),
    (["scancel"], None),  # the user ends the job: the tasks' exit 75 must not bring it back
], ids=["signal_steps", "signal_full", "scontrol_requeue", "scancel"])
def test_how_a_stopped_job_is_requeued(cluster, stand_in, tmp_path, stop, requeued_by):
    jobs = tmp_path / "jobs"
    job = _sbatch(cluster, jobs, "slurm.sbatch", **stand_in, GPUS_PER_NODE="cpu:2",
                  STAND_IN_SECONDS="120")
    calls = Path(stand_in["STAND_IN_DIR"])
    _wait_for(lambda: len(list(calls.glob("train.*.json"))) == 2, "both tasks started",
              log=lambda: _log(jobs, job))
    cluster.client(*stop, job)
    if requeued_by is None:
        info = _finished(cluster, jobs, job)
        assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")
    else:
        info = _requeued(cluster, jobs, job)
        cluster.client("scancel", job)  # before the second attempt starts (cred_expire)
    log = _log(jobs, job).split("attempt 2,")[0]  # the first attempt's (a second may start)
    assert log.count("attempt 1,") == 1
    if "--full" in stop:
        assert "srun: forcing job termination" in log and "task 0: Killed" in log
        assert not list(calls.glob("train.*.stopped"))  # no chance to save a checkpoint
    else:
        assert sorted(p.name for p in calls.glob("train.*.stopped")) == [
            "train.node1.stopped", "train.node2.stopped"]
        assert "node1: task 0: Exited with exit code 75" in log
    assert ("requeueing job" in log) == (requeued_by == "this script"), log
    assert ("not requeued by this script" in log) == (requeued_by != "this script"), log


def test_non_finite_numbers_end_the_job_without_a_requeue(cluster, stand_in, tmp_path):
    jobs = tmp_path / "jobs"
    job = _sbatch(cluster, jobs, "slurm.sbatch", **stand_in, GPUS_PER_NODE="cpu:2",
                  STAND_IN_EXIT="3")
    info, log = _finished(cluster, jobs, job), _log(jobs, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "3:0", "0"), log
    assert "requeue" not in log


def test_data_service_node_serves_the_trainer(cluster, stand_in, tmp_path):
    """DATA_SERVICE_NODES=1 on 2 nodes: node2 runs a worker (an srun step), node1 the
    dispatcher (the batch script's own child) and the training; both stop with the job."""
    jobs = tmp_path / "jobs"
    job = _sbatch(cluster, jobs, "slurm.sbatch", **stand_in, GPUS_PER_NODE="cpu:2",
                  DATA_SERVICE_NODES="1", DATA_SERVICE_PORT="7070")
    info, log = _finished(cluster, jobs, job), _log(jobs, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    calls = _calls(stand_in)
    assert sorted(calls) == ["dispatcher.node1", "train.node1", "worker.node2"]
    assert calls["dispatcher.node1"]["argv"] == ["data-service", "dispatcher", "--port=7070"]
    assert calls["worker.node2"]["argv"] == ["data-service", "worker", "--dispatcher=node1:7070"]
    train = calls["train.node1"]["argv"]
    assert "--num_processes=1" in train and "--process_id=0" in train
    assert "--config.data_service=grpc://node1:7070" in train
    # The dispatcher is stopped by the script; the workers' srun, stopped by it too, ends
    # its tasks with SIGKILL.
    assert (Path(stand_in["STAND_IN_DIR"]) / "dispatcher.node1.stopped").exists()


@pytest.mark.parametrize("variables, message", [
    ({"DATA_SERVICE_NODES": "2"}, "DATA_SERVICE_NODES=2 leaves none of the job's 2 node(s)"),
    ({"DATA_SERVICE_NODES": "1", "STAND_IN_DISPATCHER_FAILS": "1"},
     "the data service dispatcher (port 7070) exited at start"),
], ids=["no_node_left", "dispatcher_fails"])
def test_data_service_refusals_train_nothing(cluster, stand_in, tmp_path, variables, message):
    jobs = tmp_path / "jobs"
    job = _sbatch(cluster, jobs, "slurm.sbatch", **stand_in, GPUS_PER_NODE="cpu:2",
                  DATA_SERVICE_PORT="7070", **variables)
    info, log = _finished(cluster, jobs, job), _log(jobs, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert message in log
    assert not list(Path(stand_in["STAND_IN_DIR"]).glob("train.*"))
