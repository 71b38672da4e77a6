"""Restores never lose a run: a config mismatch changes nothing, damage is set aside only
when every process agrees, process 0 picks the step, commits are marked by a file."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, resumable_flags, subprocess_env

from imagenet_jax import checkpoint, errors
from imagenet_jax.checkpoint import Checkpointer


def _tree(workdir: Path) -> dict[str, bytes]:
    """Every file's relative path and bytes: the whole state of a workdir."""
    return {str(p.relative_to(workdir)): p.read_bytes()
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_another_model_on_a_finished_workdir_exits_2_and_changes_nothing(uninterrupted,
                                                                         tiny_dataset, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    before = _tree(workdir)
    result = subprocess.run(
        [sys.executable, "-m", "imagenet_jax", "train",
         *resumable_flags(tiny_dataset, "--config.model=resnet18"), f"--workdir={workdir}"],
        cwd=REPO, env=subprocess_env(4), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("imagenet-jax:")]
    assert len(errors) == 1, errors
    assert "was written by another config" in errors[0] and "new --workdir" in errors[0]
    assert "only in the checkpoint" in errors[0] or "differ in shape" in errors[0]
    assert _tree(workdir) == before  # every checkpoint folder, metrics.jsonl, config.json


def _save_steps(directory: Path, steps) -> None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpointer = Checkpointer(directory, every_steps=1, keep=5)
    for step in steps:
        state = {"step": np.int32(step), "w": np.full((64,), float(step), np.float32)}
        checkpointer.save(step, jax.device_put(state, sharding), force=True)
    checkpointer.wait()
    checkpointer.close()


def _template():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.device_put({"step": np.int32(0), "w": np.zeros((64,), np.float32)}, sharding)


def _wreck(step_dir: Path) -> None:
    for path in step_dir.rglob("*"):
        if path.is_file() and path.name != "commit_success.txt":
            path.write_bytes(b"garbage")


def test_a_save_without_its_commit_file_is_never_restored(tmp_path):
    """A run killed after writing a step's arrays but before its commit file: the step is
    not a checkpoint, whatever its folder holds."""
    _save_steps(tmp_path, (1, 2))
    for marker in (tmp_path / "2").rglob("commit_success.txt"):
        marker.unlink()
    checkpointer = Checkpointer(tmp_path, every_steps=1, keep=5)
    assert checkpointer.latest_step() == 1
    assert int(checkpointer.restore_latest(_template())["step"]) == 1
    checkpointer.close()


def test_damage_is_told_from_an_unreachable_store():
    damaged = [FileNotFoundError("Metadata file (named _METADATA) does not exist"),
               ValueError('NOT_FOUND: Error opening "zarr" driver: Error reading "w/.zarray"'),
               ValueError("DATA_LOSS: Error decoding chunk"),
               checkpoint.json.JSONDecodeError("Expecting value", "garbage", 0)]
    unreachable = [ValueError("UNAVAILABLE: Connection refused [http_response_code=503]"),
                   ValueError("DEADLINE_EXCEEDED: NOT_FOUND is not the point here"),
                   ConnectionRefusedError(111, "Connection refused"),
                   PermissionError(13, "Permission denied"),
                   RuntimeError("something nobody anticipated")]
    assert all(checkpoint.is_damage(e) for e in damaged)
    assert not any(checkpoint.is_damage(e) for e in unreachable)


def test_a_checkpoint_damaged_as_one_of_two_processes_sees_it_is_set_aside_by_all(tmp_path):
    """Process 1's view of step 3 is damaged (a stale mount); process 0's reads fine. Both
    restore step 2, the step process 0 picks after they agree; process 0 sets its step 3
    aside (renamed, not deleted), and process 1's view is left to process 0."""
    views = [tmp_path / "process0", tmp_path / "process1"]
    _save_steps(views[0], (1, 2, 3))
    shutil.copytree(views[0], views[1])
    _wreck(views[1] / "3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [subprocess.Popen(
        [sys.executable, "tests/restore_agreement.py", str(port), str(i), str(views[i])],
        cwd=REPO, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=180)
            assert process.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert all("restored step 2 w 2.0" in out for out in outputs), outputs
    assert (views[0] / "3.unreadable").is_dir() and not (views[0] / "3").exists()
    assert (views[1] / "3").is_dir()  # process 1 renames nothing


@pytest.mark.parametrize("damaged", [True, False])
def test_only_damage_moves_a_checkpoint_aside(tmp_path, damaged):
    """Damaged: set aside, the step before restored. Any failure not known as damage
    (here IsADirectoryError: a metadata file the store shows as a folder): after the
    retries, StorageUnavailable and nothing renamed; once the store answers, the same
    restore reads the same step."""
    _save_steps(tmp_path, (1, 2))
    checkpointer = Checkpointer(tmp_path, every_steps=1, keep=5, read_attempts=2,
                                retry_delay_s=0.01)
    if damaged:
        _wreck(tmp_path / "2")
        assert int(checkpointer.restore_latest(_template())["step"]) == 1
        assert (tmp_path / "2.unreadable").is_dir() and not (tmp_path / "2").exists()
    else:
        metadata = tmp_path / "2" / "default" / "_METADATA"
        held = tmp_path / "_METADATA.held"
        metadata.rename(held)
        metadata.mkdir()
        with pytest.raises(errors.StorageUnavailable, match="nothing was changed"):
            checkpointer.restore_latest(_template())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "_METADATA.held"]
        metadata.rmdir()
        held.rename(metadata)
        assert int(checkpointer.restore_latest(_template())["step"]) == 2
    checkpointer.close()
