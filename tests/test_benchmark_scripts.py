"""The benchmark scripts that call the library still run against it."""

import json
import subprocess
import sys

from conftest import REPO


def test_reader_processes_benchmark_runs_against_the_library(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/reader_processes.py", f"--out={tmp_path}", "--shards=2",
         "--records=16", "--record_kb=4", "--reads=128", "--rounds=1", "--counts", "1", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["counts"] == [1, 2] and figures["reads"] == 128
    assert all(rate > 0 for rate in figures["threads_records_per_sec"] +
               figures["processes_records_per_sec"])
    assert len(list(tmp_path.glob("records.array_record-*-of-00002"))) == 2
