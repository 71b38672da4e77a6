"""ArrayRecord shards read by index, in this process and in reader processes."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from array_record.python import array_record_module
from conftest import REPO, subprocess_env

from imagenet_jax.data import records


def _write_shards(folder, lengths):
    """Shard files holding records b'<shard>:<position>' and then `position` bytes of
    padding (records of different lengths), as TFDS writes them (group_size 1)."""
    paths = []
    for shard, length in enumerate(lengths):
        path = str(folder / f"data.array_record-{shard:05d}-of-{len(lengths):05d}")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for position in range(length):
            writer.write(_record(shard, position))
        writer.close()
        paths.append(path)
    return paths


def _record(shard, position):
    return f"{shard}:{position}".encode() + bytes(range(position))


LENGTHS = [5, 1, 7, 3]
EXPECTED = [_record(s, p) for s, n in enumerate(LENGTHS) for p in range(n)]


@pytest.fixture
def shards(tmp_path):
    return records.ArrayRecordShards(_write_shards(tmp_path, LENGTHS), LENGTHS)


def test_shards_read_any_index_across_files(shards):
    assert len(shards) == 16
    indices = np.random.default_rng(0).integers(0, 16, 50)
    assert shards.read(indices) == [EXPECTED[i] for i in indices]
    assert shards.read([]) == [] and shards[15] == EXPECTED[15] and shards[5] == b"1:0"
    for bad in ([16], [-1]):
        with pytest.raises(IndexError, match=r"\[0, 16\)"):
            shards.read(bad)


def _read_slot(readers, indices):
    """What the pipeline does with a batch: read the slot file, split it, hand it back."""
    slot, lengths = readers.read(np.asarray(indices))
    with open(slot, "rb") as f:
        contents = f.read()
    assert readers.release(slot)
    starts = np.cumsum(lengths) - lengths
    assert len(contents) == lengths.sum()
    return [contents[start:start + n] for start, n in zip(starts, lengths, strict=True)]


def test_reader_processes_read_what_the_shards_hold(shards):
    readers = shards.processes(2)
    assert shards.processes(2) is readers  # one pool per count, shared by the pipelines
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 16, int(rng.integers(0, 9))) for _ in range(40)]
    with ThreadPoolExecutor(4) as threads:  # four batches in flight, as tf.data's calls
        read = list(threads.map(lambda indices: _read_slot(readers, indices), batches))
    assert read == [[EXPECTED[i] for i in indices] for indices in batches]
    # A slot per batch in flight at once, each rewritten by later batches.
    assert 1 <= len(os.listdir(readers.directory)) <= 4
    with pytest.raises(IndexError, match=r"\[0, 16\)"):  # raised in a worker, here
        readers.read(np.array([3, 16]))
    assert _read_slot(readers, [15, 0]) == [EXPECTED[15], EXPECTED[0]]  # still serving
    readers.close()
    assert readers.closed and not os.path.exists(readers.directory)
    assert shards.processes(2) is not readers  # a closed pool is not handed out again


def test_a_dead_reader_process_is_replaced(shards, caplog):
    readers = records.ReaderProcesses(shards.paths, shards.lengths, 1)
    try:
        assert _read_slot(readers, [2]) == [EXPECTED[2]]
        workers = _children(os.getpid(), readers)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        assert _read_slot(readers, [4, 9]) == [EXPECTED[4], EXPECTED[9]]
        assert "a reader process died; starting 1 again" in caplog.text
        assert _children(os.getpid(), readers) not in ([], workers)
    finally:
        readers.close()


def _children(parent, readers=None):
    """Running children of `parent` (read from /proc); with `readers`, only those holding
    its shard files open: its reader processes."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid = _stat(pid)
            if ppid == parent and state != "Z" and (readers is None or any(
                    os.readlink(f"/proc/{pid}/fd/{fd}") in readers._initargs[0]
                    for fd in os.listdir(f"/proc/{pid}/fd"))):
                found.append(int(pid))
        except OSError:  # ended meanwhile
            continue
    return found


def _stat(pid) -> tuple[str, int]:
    """(state, parent pid) of a process: 'Z' for one that ended and was not reaped."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return fields[0], int(fields[1])


_PARENT = """
import sys, time
import numpy as np
from imagenet_jax.data import records
readers = records.ReaderProcesses(sys.argv[1:-1], [int(sys.argv[-1])], 2)
slot, lengths = readers.read(np.arange(3))
print(readers.directory, flush=True)
time.sleep(600)
"""


def _alive(pid):
    try:
        return _stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def test_reader_processes_end_with_a_killed_input_process(tmp_path):
    paths = _write_shards(tmp_path, [5])
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, *paths, "5"], cwd=REPO,
                              env=subprocess_env(1), stdout=subprocess.PIPE, text=True)
    try:
        directory = parent.stdout.readline().strip()
        assert os.path.isdir(directory), directory
        workers = _children(parent.pid)  # the reader that served the read, at least
        assert workers
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers)), "reader processes outlived their input process"
    assert os.path.isdir(directory)  # SIGKILL: nothing could clean up ...
    records.remove_orphaned_slots()  # ... until the next pool starts
    assert not os.path.exists(directory)


def test_processes_by_core_count():
    assert [records.auto_processes(n) for n in (1, 2, 15, 16, 31, 32, 224)] == [
        0, 0, 0, 1, 1, 2, 14]
