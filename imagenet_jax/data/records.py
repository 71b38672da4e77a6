"""Random access to ArrayRecord files (TFDS's random-access format), in the input
process or in reader processes of its own.

`ArrayRecordShards` reads records in the calling thread, through array_record's C++
reader, which releases the GIL while it reads; copying each record into a Python `bytes`
and then into a string tensor holds it, so however many cores a host has, one process
reads at most a fixed number of records a second this way (BENCHMARKS.md, "Input at pod
scale").

`ReaderProcesses` lifts that cap: worker processes read each batch of records into a file
in shared memory (/dev/shm), and the input pipeline reads that file with
`tf.io.read_file`, outside Python; what is left in the input process's Python is a few
calls per batch instead of two copies per record. It costs more CPU per record (one more
copy, and a hand-over between processes), so on a few cores, where decoding is the limit
long before reading, reading in the pipeline's own threads is faster (BENCHMARKS.md, "TFDS
reads in reader processes"): `auto_processes` picks by core count.

Reader processes and the data service (service.py) both take work out of the input
process, for different cases. Reader processes move the reads only, hand records over
through this host's memory, and serve a host whose own cores decode enough. The service
moves the whole pipeline, decoding included, to worker processes on this host or on
other machines, and serves a run that needs more cores than its host has. On the same
cores, TFDS through local service workers is the slower of the two (BENCHMARKS.md,
"Input on tf.data service"), so both stay; a run on the service reads in
its workers' own threads, never in reader processes (assemble.plan).

This module imports no TensorFlow: the workers are started fresh (multiprocessing's
spawn, never a fork of a process running TensorFlow's and JAX's threads) and load only
numpy and array_record. Like any spawned worker they import the program's main module
again: the CLI's is guarded; a script of one's own that builds TFDS pipelines with reader
processes needs its `if __name__ == "__main__":` guard too (or `tfds_read_processes=0`).
"""

from __future__ import annotations

import glob
import itertools
import logging
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from array_record.python import array_record_module

from imagenet_jax.data import allocator

SLOTS_PREFIX = "imagenet_jax_records."  # + "<pid>.<random>": one folder of slots per pool
# Below this many cores, reads in the pipeline's threads are cheaper than reader processes
# and never the limit: that many cores decode about what one process reads in its own
# threads (BENCHMARKS.md, "TFDS reads in reader processes", has the rates).
CORES_PER_READER_PROCESS = 16


def auto_processes(cores: int | None = None) -> int:
    """Reader processes for a host of `cores` cores (this one's by default): none below
    CORES_PER_READER_PROCESS, then one per CORES_PER_READER_PROCESS cores (each reads
    more records than that many cores decode)."""
    cores = (os.cpu_count() or 1) if cores is None else cores
    return cores // CORES_PER_READER_PROCESS


class ArrayRecordShards:
    """Random access to the records of one split's ArrayRecord shard files.

    `read(indices)` returns the serialized records at those positions of the split (the
    shards in order), one C++ reader call per record, which reads without holding the
    GIL. Readers open on first use (a host touches the 1,024 shards of ImageNet's train
    split within its first batches) and are safe to share between threads.
    """

    # Random access: no read-ahead and no thread pool inside a call (tf.data's threads
    # are the parallelism), as array_record advises for random reads.
    READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"

    def __init__(self, paths: list[str], lengths: list[int]):
        self.paths = [os.fspath(path) for path in paths]
        self.lengths = [int(length) for length in lengths]
        self._starts = np.cumsum([0, *self.lengths], dtype=np.int64)
        self._readers: list[Any] = [None] * len(self.paths)
        self._lock = threading.Lock()
        self._processes: dict[int, ReaderProcesses] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, indices: np.ndarray | list[int]) -> list[bytes]:
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"record indices must be in [0, {len(self)}); got "
                             f"{indices.min()}..{indices.max()}")
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        positions = (indices - self._starts[shards]).tolist()
        # One record per call: the reader's batched read hands the records to its own
        # thread pool and reads at a fraction of the rate, without scaling across threads.
        return [self._reader(shard).read([position])[0]
                for shard, position in zip(shards.tolist(), positions, strict=True)]

    def __getitem__(self, index: int) -> bytes:
        return self.read([index])[0]

    def processes(self, count: int) -> ReaderProcesses:
        """`count` reader processes over these shards, started on first use and shared by
        every pipeline of this process that asks for as many."""
        with self._lock:
            if count not in self._processes or self._processes[count].closed:
                self._processes[count] = ReaderProcesses(self.paths, self.lengths, count)
            return self._processes[count]

    def _reader(self, shard: int):
        reader = self._readers[shard]
        if reader is None:
            with self._lock:
                if (reader := self._readers[shard]) is None:
                    reader = array_record_module.ArrayRecordReader(
                        self.paths[shard], self.READER_OPTIONS)
                    self._readers[shard] = reader
        return reader


class ReaderProcesses:
    """Reads batches of records in `count` worker processes, each batch into a slot file.

    `read(indices)` returns (slot path, record lengths): the slot file holds the records
    one after the other. The caller reads the file, then hands the slot back with
    `release(slot)`, and a later batch rewrites it. Slots are rewritten rather than
    created each time: writing tmpfs pages that are already allocated cost a third of
    writing fresh ones here. There are as many slots as batches were ever in flight at
    once (tf.data's parallel calls), each the size of a batch of records.

    A worker that dies (e.g. killed for memory) breaks the pool: it is started again and
    the batch tried once more; workers exit when the input process does, even on SIGKILL,
    and the slots of a process that died are removed by the next pool started.
    """

    def __init__(self, paths: list[str], lengths: list[int], count: int):
        if count < 1:
            raise ValueError(f"reader processes: need at least 1, got {count}")
        remove_orphaned_slots()
        self.count = count
        self._initargs = (list(paths), list(lengths), os.getpid())
        self.directory = tempfile.mkdtemp(prefix=f"{SLOTS_PREFIX}{os.getpid()}.",
                                          dir=shared_memory_dir())
        self._free: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._pools = [self._start()]  # the live pool is the last; a list the finalizer sees
        self._finalizer = weakref.finalize(self, _close, self._pools, self.directory)

    def read(self, indices: np.ndarray) -> tuple[bytes, np.ndarray]:
        """(slot path, int64 lengths) of the records at `indices`; raises what the worker
        raised (IndexError for an index out of range, OSError for an unreadable file)."""
        indices = np.asarray(indices, np.int64)
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            slot = os.path.join(self.directory, str(next(self._names)))
        try:
            lengths = self._submit(indices, slot)
        except BaseException:
            self._free.put(slot)
            raise
        return slot.encode(), lengths

    def release(self, slot: bytes | np.ndarray) -> bool:
        """Hands a slot back once its file has been read (`slot` as `read` returned it, or
        as tf.numpy_function passes it back: a 0-d array)."""
        self._free.put(os.fsdecode(np.asarray(slot).item()))
        return True

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _submit(self, indices: np.ndarray, slot: str) -> np.ndarray:
        pool = self._pools[-1]
        try:
            return pool.submit(_read_into_slot, indices, slot).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pools[-1] is pool:
                    logging.warning("a reader process died; starting %d again", self.count)
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pools.append(self._start())
            return self._pools[-1].submit(_read_into_slot, indices, slot).result()

    def _start(self) -> ProcessPoolExecutor:
        # Started fresh, not forked: the input process runs TensorFlow's and JAX's threads.
        return ProcessPoolExecutor(self.count, multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=self._initargs)


def shared_memory_dir() -> str:
    """/dev/shm where there is one (memory, never a disk), else the temp folder."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


def remove_orphaned_slots() -> None:
    """Removes slot folders left by input processes that are no longer running (killed
    before they could clean up)."""
    for folder in glob.glob(os.path.join(shared_memory_dir(), f"{SLOTS_PREFIX}*")):
        pid = os.path.basename(folder)[len(SLOTS_PREFIX):].partition(".")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _close(pools: list[ProcessPoolExecutor], directory: str) -> None:
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(directory, ignore_errors=True)


# The worker side: one ArrayRecordShards and one open file per slot, per worker process.
_worker: dict[str, Any] = {}


def _start_worker(paths: list[str], lengths: list[int], parent: int) -> None:
    allocator.keep_freed_memory()  # before any thread starts
    _worker["shards"] = ArrayRecordShards(paths, lengths)
    _worker["slots"] = {}
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """Ends this worker when the input process is gone: its executor never tells a worker
    whose parent was killed, which would wait for work forever."""
    while os.getppid() == parent:
        threading.Event().wait(1.0)
    os._exit(0)


def _read_into_slot(indices: np.ndarray, slot: str) -> np.ndarray:
    slots = _worker["slots"]
    if (fd := slots.get(slot)) is None:
        fd = slots[slot] = os.open(slot, os.O_RDWR | os.O_CREAT, 0o600)
    records = _worker["shards"].read(indices)
    offset = 0
    for record in records:
        written = os.pwrite(fd, record, offset)
        if written != len(record):
            raise OSError(f"short write to {slot} ({written} of {len(record)} bytes): is "
                          f"{os.path.dirname(slot)} full?")
        offset += written
    os.ftruncate(fd, offset)
    return np.fromiter(map(len, records), np.int64, len(records))
