"""TFDS-style reads in reader processes against threads, without TensorFlow: how reads of
ArrayRecord files scale with a host's cores (`tfds_read_processes`, data/records.py).

Writes --shards ArrayRecord files of random records of --record_kb KB, one record a group
as TFDS writes them, then reads --reads random records in batches of 64, for each count
in --counts (default 1, 2, 4, ... up to the host's cores):

  threads     `ArrayRecordShards.read` in that many threads, one batch each at a time:
              the pipeline's reads with `tfds_read_processes=0`, less the copy of each
              record into a string tensor (also made holding the GIL), so an upper bound;
  processes   `ReaderProcesses(count)` with as many batches in flight, each slot file read
              back into one buffer, as the pipeline's `tf.io.read_file` reads it.

The rounds alternate the two over every count after one untimed pass; each figure is the
median of the rounds. Needs numpy and array_record only, so it also runs on a host whose
Python has no TensorFlow. Prints a table, then one JSON line.

  python benchmarks/reader_processes.py --out /tmp/records --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from array_record.python import array_record_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imagenet_jax.data import allocator, records  # noqa: E402

BATCH = 64  # the pipeline's READ_BATCH


def write_shards(out: Path, shards: int, per_shard: int, record_bytes: int
                 ) -> records.ArrayRecordShards:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for shard in range(shards):
        path = out / f"records.array_record-{shard:05d}-of-{shards:05d}"
        writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
        for _ in range(per_shard):
            writer.write(rng.integers(0, 256, record_bytes, np.uint8).tobytes())
        writer.close()
        paths.append(path)
    return records.ArrayRecordShards(paths, [per_shard] * shards)


def read_in_threads(shards: records.ArrayRecordShards, batches: list[np.ndarray],
                    threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        for _ in pool.map(shards.read, batches):
            pass
        return time.perf_counter() - start


def read_in_processes(readers: records.ReaderProcesses, batches: list[np.ndarray],
                      in_flight: int, batch_bytes: int) -> float:
    buffer = bytearray(batch_bytes)

    def read(indices: np.ndarray) -> int:
        slot, lengths = readers.read(indices)
        fd = os.open(slot, os.O_RDONLY)
        try:
            size = os.readv(fd, [buffer])  # one buffer for every thread: only the cost counts
        finally:
            os.close(fd)
            readers.release(slot)
        if size != lengths.sum():
            raise RuntimeError(f"slot held {size} bytes, expected {lengths.sum()}")
        return size

    with ThreadPoolExecutor(in_flight) as pool:
        start = time.perf_counter()
        for _ in pool.map(read, batches):
            pass
        return time.perf_counter() - start


def counts_up_to(cores: int) -> list[int]:
    """1, 2, 4, ... below `cores`, then `cores` itself."""
    return sorted({2**i for i in range(cores.bit_length()) if 2**i < cores} | {cores})


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the shards")
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--records", type=int, default=4096, help="records in all")
    parser.add_argument("--record_kb", type=int, default=118)
    parser.add_argument("--reads", type=int, default=8192)
    parser.add_argument("--counts", type=int, nargs="+",
                        default=counts_up_to(cores))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    allocator.keep_freed_memory()  # as the CLI does, before any thread starts

    shards = write_shards(args.out, args.shards, args.records // args.shards,
                          args.record_kb * 1024)
    rng = np.random.default_rng(1)
    indices = rng.integers(0, len(shards), args.reads)
    batches = [indices[i:i + BATCH] for i in range(0, len(indices), BATCH)]
    readers = {count: records.ReaderProcesses(shards.paths, shards.lengths, count)
               for count in args.counts}
    seconds: dict[tuple[str, int], list[float]] = {}
    try:
        for round_ in range(args.rounds + 1):  # the first round is untimed: page cache, pools
            for count in args.counts:
                for kind, elapsed in (
                        ("threads", read_in_threads(shards, batches, count)),
                        ("processes", read_in_processes(readers[count], batches, count,
                                                        BATCH * args.record_kb * 1024))):
                    if round_:
                        seconds.setdefault((kind, count), []).append(elapsed)
    finally:
        for reader in readers.values():
            reader.close()

    rate = {key: args.reads / statistics.median(values) for key, values in seconds.items()}
    first = args.counts[0]
    print(f"count | threads rec/s | x{first:<4} | processes rec/s | x{first:<4}")
    for count in args.counts:
        threads, processes = rate[("threads", count)], rate[("processes", count)]
        print(f"{count:>5} | {threads:>13,.0f} | {threads / rate[('threads', first)]:>5.2f} | "
              f"{processes:>15,.0f} | {processes / rate[('processes', first)]:>5.2f}")
    print(json.dumps({"cores": cores, "record_kb": args.record_kb, "reads": args.reads,
                      "rounds": args.rounds, "counts": args.counts,
                      "threads_records_per_sec": [rate[("threads", c)] for c in args.counts],
                      "processes_records_per_sec": [rate[("processes", c)]
                                                    for c in args.counts]}))


if __name__ == "__main__":
    main()
