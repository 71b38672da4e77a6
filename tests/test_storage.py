"""Cloud Storage: metrics.jsonl and folder datasets on gs://, against the emulator.

The emulator (tests/gcs_emulator.py) runs in memory on 127.0.0.1; the clients find it
through STORAGE_EMULATOR_HOST, as a user's rehearsal would (storage.configure).
"""

import os
import socket
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest
from chaos import chaos, run_to_end
from conftest import REPO, subprocess_env, tiny_config
from gcs_emulator import BUCKET

from imagenet_jax import run_dir, storage
from imagenet_jax.data import sources
from imagenet_jax.errors import ConfigError
from imagenet_jax.metric_writers import MetricsLogger
from imagenet_jax.run_dir import read_records
from imagenet_jax.train import loop


@pytest.fixture(scope="module")
def bucket():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emulator = subprocess.Popen([sys.executable, "tests/gcs_emulator.py", str(port)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    previous = os.environ.get(storage.EMULATOR_ENV)
    os.environ[storage.EMULATOR_ENV] = f"http://127.0.0.1:{port}"
    storage.configure()
    try:
        yield f"gs://{BUCKET}"
    finally:
        emulator.terminate()
        emulator.wait(timeout=30)
        if previous is None:
            os.environ.pop(storage.EMULATOR_ENV)
        else:
            os.environ[storage.EMULATOR_ENV] = previous


def test_metrics_jsonl_on_gs_holds_each_record_once_after_a_resume(bucket):
    workdir = f"{bucket}/metrics_run"
    logger = MetricsLogger(workdir, resume_step=0)
    for step in range(1, 11):
        logger.log(step, "train", {"loss": 1.0 / step})
    logger.close()
    assert [r["step"] for r in read_records(workdir)] == list(range(1, 11))
    # A run killed after step 10 resumes from its checkpoint of step 6: the resumed run
    # writes the records past it again, and the run's history holds each once (the
    # file keeps both attempts').
    logger = MetricsLogger(workdir, resume_step=6)
    for step in range(7, 11):
        logger.log(step, "train", {"loss": 1.0 / step})
    logger.close()
    records = read_records(workdir)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["attempt"] for r in records] == [1] * 6 + [2] * 4
    assert len(read_records(workdir, every_attempt=True)) == 14
    assert records[-1] == {"step": 10, "split": "train", "loss": 0.1,
                           "time": records[-1]["time"], "attempt": 2}
    times = [r["time"] for r in records]
    assert times == sorted(times)  # the resumed run went on from step 6's time


def test_a_gs_workdir_is_probed_at_start(bucket):
    run_dir.check_writable(storage.as_path(f"{bucket}/probed"))
    with pytest.raises(ConfigError, match="is not writable"):
        run_dir.check_writable(storage.as_path("gs://no-such-bucket-anywhere/run"))


def test_a_folder_dataset_on_gs_trains_like_its_local_copy(bucket, tiny_dataset, tmp_path):
    """The tiny dataset uploaded: listed the same (classes, files, labels, fingerprint), and
    a run on it gives the local run's losses and eval exactly (same bytes, same batches)."""
    fsspec.filesystem("gs").put(f"{tiny_dataset}/", f"{bucket}/tiny/", recursive=True)
    remote, local = sources.open_folder(f"{bucket}/tiny"), sources.open_folder(tiny_dataset)
    assert remote.class_names == local.class_names
    assert remote.fingerprint() == local.fingerprint()
    for split in ("train", "val"):
        np.testing.assert_array_equal(remote.labels[split], local.labels[split])
    results = []
    for dataset, name in ((f"{bucket}/tiny", "remote"), (tiny_dataset, "local")):
        config = tiny_config(tiny_dataset, num_epochs=1.0, checkpoint_every_steps=100)
        config.mesh.data = 1  # the reads are under test, not the sharding
        config.dataset = f"folder:{dataset}"
        result = loop.train_and_evaluate(config, tmp_path / name)
        # (The goodput records time this machine's work: they differ run to run.)
        results.append((result, [r["loss"] for r in read_records(tmp_path / name)
                                 if r["split"] != "goodput"]))
    assert results[0] == results[1]
    assert results[0][0]["num_examples"] == 70


# Each checkpoint of the tiny state is ~500 objects through the emulator's one-request-
# at-a-time Python server: 20-75 s apiece, minutes a run; so out of the default suite.
@pytest.mark.slow
def test_a_gs_run_killed_and_resumed_equals_an_uninterrupted_one(bucket, tiny_dataset,
                                                                  tmp_path):
    flags = ["--config=tests/tiny_config.py", f"--config.dataset=folder:{tiny_dataset}",
             "--config.num_epochs=2", "--config.checkpoint_every_steps=8"]
    env = dict(subprocess_env(4), **{storage.EMULATOR_ENV: os.environ[storage.EMULATOR_ENV]})
    local = tmp_path / "uninterrupted"
    run_to_end(flags, local, env)
    report = chaos(flags, f"{bucket}/chaos", kills=1, seed=0, env=env,
                   uninterrupted=local)
    assert report.kills == 1 and report.params_equal, report
    workdir = f"{bucket}/chaos/killed"
    keys = [(r["step"], r["split"]) for r in read_records(workdir)]
    assert len(keys) == len(set(keys)) and keys[-2:] == [(24, "val"), (24, "goodput")]
    assert keys == [(r["step"], r["split"]) for r in read_records(local)]
    assert storage.as_path(f"{workdir}/config.json").exists()
    assert "already finished" in run_to_end(flags, workdir, env).stdout
