"""Several processes on 127.0.0.1: the same training as one process, and no hang on a dead peer."""

import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from chaos import final_params
from conftest import REPO, subprocess_env, tiny_config

from imagenet_jax.run_dir import read_records
from imagenet_jax.train.loop import train_and_evaluate


def _flags(dataset, workdir, *extra):
    """Three steps, each logged. Free-running training amplifies rounding step by step: here
    the two runs' losses agree to 1e-7 in steps 1-4, then 3e-6 and 4e-4 (lr 0.4; the
    order of the reductions differs with the process count), so the comparison stops
    where it is well-conditioned and still sees every step's batch and gradients."""
    return ["train", "--config=tests/tiny_config.py", f"--config.dataset=folder:{dataset}",
            *(f"--config.{name}={value}" for name, value in THREE_STEPS.items()),
            f"--workdir={workdir}", *extra]


THREE_STEPS = {"num_epochs": 0.25, "log_every_steps": 1}


@pytest.mark.parametrize("recipe, service", [
    ({}, ()),
    # BatchNorm over groups of 8 examples (2 per device), at a learning rate where such
    # small groups do not make training chaotic (tests/test_train.py says why). Slow (40 s
    # more): groups need no collective across processes, and 1 vs 8 devices with groups
    # is in the default run (test_train); `make test-slow` runs it.
    pytest.param({"batchnorm_group_examples": 8, "learning_rate": 0.05}, (),
                 marks=pytest.mark.slow),
    # Each of the two processes on its own local data service worker, against one process
    # reading in-process. Slow (50 s more): one process on the service against the pipeline
    # is in the default run (tests/test_data_service.py), and so is 2 x 2 against 1 x 4.
    pytest.param({}, ("--config.data_service=local:1",), marks=pytest.mark.slow)],
    ids=["batch_norm", "batch_norm_groups", "data_service"])
def test_two_processes_of_two_devices_train_like_one_process_of_four(tiny_dataset, tmp_path,
                                                                     recipe, service):
    """2 processes x 2 devices (launch/local.sh) against 4 of this process's 8 devices: the
    program a process of 4 devices compiles and runs."""
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    recipe_flags = [f"--config.{name}={value}" for name, value in recipe.items()]
    launched = subprocess.run([str(REPO / "launch" / "local.sh"), "2",
                               *_flags(tiny_dataset, two, *recipe_flags, *service)], cwd=REPO,
                              env=subprocess_env(2), capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    _assert_console_is_for_people(launched, two)
    config = tiny_config(tiny_dataset, **THREE_STEPS, **recipe)
    config.mesh.data = 4
    train_and_evaluate(config, one)

    records = [read_records(w) for w in (two, one)]
    assert [(r["step"], r["split"]) for r in records[0]] == [
        (r["step"], r["split"]) for r in records[1]]
    for a, b in zip(*records, strict=True):
        if a["split"] == "train":
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        elif a["split"] == "val":
            assert a["num_examples"] == b["num_examples"] == 70
            assert a["top1"] == b["top1"]
    # Process 0's goodput records name the process whose input wait they charge: the
    # slowest of the two at each log (one allgather a log, which neither process hung on).
    timed = [r for r in records[0] if r["split"] == "goodput"]
    assert [r["step"] for r in timed] == [1, 2, 3]
    assert all(r["input_wait_process"] in (0, 1) for r in timed)
    assert timed[-1]["wall_s"] == pytest.approx(sum(timed[-1]["attempt_seconds"].values()),
                                                abs=1e-2)
    if service:  # process 0's batches, each step's once, through the service
        last = [r for r in records[0] if r["split"] == "train"][-1]
        assert last["input_served"] + last["input_made_here"] == last["step"]
        assert last["input_served"] > 0
    params = [final_params(w)["params"] for w in (two, one)]
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _assert_console_is_for_people(result: subprocess.CompletedProcess, workdir) -> None:
    """No start-up noise of TensorFlow, XLA or absl on either process's console, all of it
    in their log files; process 0's progress lines with an ETA, one line per evaluation,
    the final table; process 1 says only where its log is."""
    console = result.stdout + result.stderr
    for noise in ("Unable to initialize backend", "oneDNN", "absl::InitializeLog"):
        assert noise not in console
    assert not re.search(r"^\[\d\] [IW]\d{4} ", console, re.MULTILINE), "absl-prefixed lines"
    lines = result.stdout.splitlines()
    first = "\n".join(line[4:] for line in lines if line.startswith("[0] "))
    assert re.search(r"^epoch 0\.\d+/0\.25 \| step \d+/3 \| .* \| ETA \S+$", first,
                     re.MULTILINE), first
    assert re.search(r"^eval at step 3 .*\(70 examples\)$", first, re.MULTILINE)
    assert re.search(r"^  final\s+\d\.\d{4}\s+\d\.\d{4}", first, re.MULTILINE)
    # Gloo's C++ prints "[Gloo] Rank N is connected to ..." to stdout, below Python: the one
    # native noise left on a multi-process console (docs/reliability.md).
    second = [line for line in lines if line.startswith("[1] ") and "[Gloo] Rank" not in line]
    assert len(second) == 1 and second[0].startswith("[1] Log: "), second
    logs = sorted((workdir / "logs").glob("train.*.log"))
    assert len(logs) == 2, logs
    for log in logs:
        assert "oneDNN" in log.read_text() and "Devices: 4 over 2 process(es)" in log.read_text()


def test_a_dead_peer_ends_the_others_within_the_heartbeat(tiny_dataset, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "run"
    processes = [
        subprocess.Popen([sys.executable, "-m", "imagenet_jax",
                          *_flags(tiny_dataset, workdir, "--config.num_epochs=200"),
                          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}", "--heartbeat_timeout_s=5"],
                         cwd=REPO, env=subprocess_env(2), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes[0].poll() is None, "the job ended before the peer could be killed"
        processes[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = processes[0].wait(timeout=60)  # heartbeat 5 s: far inside this bound
        assert code != 0
        assert time.monotonic() - killed_at < 60
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def test_processes_that_list_different_files_stop_with_one_line(tiny_dataset, tmp_path):
    """Process 1 sees one more training image than process 0 (a stale mount, a partial
    copy): every index and label after it would shift, so both stop before training."""
    other = tmp_path / "other_view"
    shutil.copytree(tiny_dataset, other)
    first_class = sorted((other / "train").iterdir())[0]
    shutil.copy(next(first_class.iterdir()), first_class / "zz_extra.JPEG")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [
        subprocess.Popen([sys.executable, "-m", "imagenet_jax",
                          *_flags(dataset, tmp_path / "run"),
                          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}", "--heartbeat_timeout_s=5"],
                         cwd=REPO, env=subprocess_env(2), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for i, dataset in enumerate((tiny_dataset, other))]
    try:
        results = [(p.wait(timeout=240), p.stderr.read()) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for code, stderr in results:
        assert code == 2, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("imagenet-jax:")]
        assert len(errors) == 1 and "do not list the same files" in errors[0], errors
        assert "process 1 has 401 train / 70 val examples against process 0's 400 / 70" \
            in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
