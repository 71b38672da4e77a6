"""What a host's cores give for plain file reads: the ceiling of `bench input`'s `read_scaling`.

Reads every file of a folder of images (e.g. benchmarks/photo_folder.py's) with no
TensorFlow and no Python object per file (`os.readv` into one reused buffer a process),
first in one process, then in `--processes` (default: every core), the files split
between them; rounds alternate the two, after one untimed pass that brings the files
into the page cache. A process's rate is files over the time its own reads took, so
starting processes is not counted. Prints each round and the medians, then one JSON line.

  python benchmarks/raw_reads.py --folder /tmp/noise --rounds 6
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

MAX_FILE_BYTES = 16 << 20


def read_files(paths: list[str], seconds) -> None:
    buffer = bytearray(MAX_FILE_BYTES)
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.readv(fd, [buffer])
        finally:
            os.close(fd)
    seconds.put(time.perf_counter() - start)


def files_per_sec(paths: list[str], processes: int) -> float:
    """All of `paths` read by `processes` processes, each its share; files/s of the whole."""
    context = multiprocessing.get_context("spawn")
    seconds = context.Queue()
    workers = [context.Process(target=read_files, args=(paths[i::processes], seconds))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    elapsed = [seconds.get() for _ in workers]
    for worker in workers:
        worker.join()
    return len(paths) / max(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--passes", type=int, default=8,
                        help="times each round reads every file (short passes are noise)")
    args = parser.parse_args()
    files = sorted(str(p) for p in args.folder.rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"{args.folder} holds no files")
    paths = files * args.passes
    files_per_sec(paths, args.processes)  # into the page cache, untimed
    one, many = [], []
    for round_ in range(args.rounds):
        one.append(files_per_sec(paths, 1))
        many.append(files_per_sec(paths, args.processes))
        print(f"round {round_}: 1 process {one[-1]:,.0f} files/s, {args.processes} processes "
              f"{many[-1]:,.0f} files/s, x{many[-1] / one[-1]:.2f}")
    scaling = [m / o for o, m in zip(one, many, strict=True)]
    result = {"folder": str(args.folder), "files": len(files), "processes": args.processes,
              "cores": os.cpu_count(), "one_process_files_per_sec": statistics.median(one),
              "all_processes_files_per_sec": statistics.median(many),
              "scaling": statistics.median(scaling), "scaling_runs": scaling}
    print(f"median: 1 process {result['one_process_files_per_sec']:,.0f} files/s, "
          f"{args.processes} processes {result['all_processes_files_per_sec']:,.0f} files/s, "
          f"scaling x{result['scaling']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
