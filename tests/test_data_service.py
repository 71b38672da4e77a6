"""Input on tf.data service: real dispatchers and workers on 127.0.0.1, the same batches
as the in-process pipeline, whatever the service delivers, loses or repeats."""

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from chaos import RunWatcher, chaos, command, final_params, trees_equal
from conftest import REPO, resumable_flags, subprocess_env

from imagenet_jax.data import demo, order, pipeline, repair, service, sources
from imagenet_jax.run_dir import read_records
from imagenet_jax.spec import parse_data_service

SPEC = pipeline.TrainSpec(16, seed=3, crop_scale=(0.35, 1.0), image_sizes=(12, 16))
BATCH_SLICE = order.BatchSlice(32, process_index=1, process_count=2)  # one process's slice


@pytest.fixture(scope="module")
def local_service():
    with service.start_local(2) as started:
        yield started


def _ordered_train(source, target, start, stop, *, timeout_s=120.0, spec=SPEC):
    def here(step, repairs):
        return pipeline.skipping_train_batches(source, BATCH_SLICE, spec, step, repairs=repairs)

    return service.OrderedBatches(
        lambda step, repairs: service.distribute(pipeline.keyed_train_dataset(
            source, BATCH_SLICE, spec, step, stop, repairs), target),
        # A buffer for every position: no position is made here for being overtaken.
        here, start, stop, timeout_s=timeout_s, buffer_size=stop - start)


def _in_process(source, start, spec=SPEC, repairs=repair.Repairs()):
    return pipeline.train_dataset(source, BATCH_SLICE, spec, start, repairs).as_numpy_iterator()


def _assert_batches_equal(got, expected):
    for batch, reference in zip(got, expected, strict=False):
        assert batch.keys() == reference.keys()
        for key in reference:
            np.testing.assert_array_equal(batch[key], reference[key])


def test_service_batches_equal_the_in_process_pipeline(tiny_dataset, local_service):
    """Steps 10-29 of one process's slice, across an epoch boundary where the resolution
    changes (12 steps an epoch: 12 px, then 16): bitwise the in-process batches."""
    source = sources.open_folder(tiny_dataset)
    batches = _ordered_train(source, local_service.target, 10, 30)
    got = list(batches)
    batches.close()
    assert len(got) == 20 and {b["image"].shape[1] for b in got} == {12, 16}
    _assert_batches_equal(got, _in_process(source, 10))
    assert batches.counts.served == 20 and batches.counts.made_here == 0


def test_eval_batches_on_the_service_equal_the_in_process_ones(tiny_dataset, local_service):
    source = sources.open_folder(tiny_dataset)
    batch_slice = order.BatchSlice(16, process_index=0, process_count=2)
    num_batches = order.num_eval_batches(source, "val", 16)  # 70 examples: 5, the last padded

    def here(batch, repairs):
        return pipeline.skipping_eval_batches(source, batch_slice, image_size=16,
                                              start_batch=batch, repairs=repairs)

    batches = service.OrderedBatches(
        lambda batch, repairs: service.distribute(pipeline.keyed_eval_dataset(
            source, batch_slice, split="val", image_size=16, crop_ratio=0.875, start_batch=batch,
            stop_batch=num_batches, repairs=repairs), local_service.target),
        here, 0, num_batches, timeout_s=120, buffer_size=num_batches)
    got = list(batches)
    assert len(got) == num_batches == 5 and batches.counts.served == 5
    _assert_batches_equal(got, pipeline.eval_dataset(source, batch_slice,
                                                     image_size=16).as_numpy_iterator())


@pytest.mark.parametrize("spec, parsed", [
    ("", ("", "")), ("local:2", ("local", "2")), ("local:016", ("local", "16")),
    ("grpc://cpu-0:5050", ("grpc", "cpu-0:5050")), ("grpc://[::1]:5050", ("grpc", "[::1]:5050")),
    ("local:0", None), ("local", None), ("local:x", None), ("grpc://cpu-0", None),
    ("grpc://:5050", None), ("grpc://cpu-0:0", None), ("cpu-0:5050", None)])
def test_data_service_grammar(spec, parsed):
    if parsed is None:
        with pytest.raises(ValueError, match="expected '' .*'local:N'.*'grpc://HOST:PORT'"):
            parse_data_service(spec)
    else:
        assert parse_data_service(spec) == parsed


def test_local_workers_share_the_cores_without_overlap():
    assert service.cpu_shares(2, [0, 1]) == [[0], [1]]
    assert service.cpu_shares(3, list(range(8))) == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert service.cpu_shares(1, [4, 5]) == [[4, 5]]
    assert service.cpu_shares(3, [0, 1]) == [[0], [1], [0]]  # more workers than cores


def _stream_of(positions):
    """A stream that delivers `positions` in the order given (any order, repeats, gaps)."""
    def stream(start, repairs):
        kept = [p for p in positions if p >= start]
        return tf.data.Dataset.from_tensor_slices(
            {"position": tf.constant(kept, tf.int64),
             "value": tf.constant(kept, tf.int64) * 10})
    return stream


class _Here:
    """In-process batches {'value': 10 * position}, with the positions asked for."""

    def __init__(self):
        self.asked = []

    def __call__(self, start, repairs):
        self.asked.append(start)
        skipping = repair.SkippingBatches(
            lambda position, _: tf.data.Dataset.range(position, 100).map(
                lambda p: {"value": p * 10}),
            lambda position: [], None, None, str, start)
        return skipping


def test_order_is_restored_late_copies_dropped_and_gaps_made_here():
    """Out of order, a repeated position and a lost one (5): each position once, in order;
    the lost one made here after the timeout, the repeat and the late ones dropped."""
    here = _Here()
    batches = service.OrderedBatches(_stream_of([1, 0, 3, 2, 3, 6, 4, 7, 8, 9]), here, 0, 10,
                                     timeout_s=0.5, buffer_size=4)
    assert [int(b["value"]) for b in batches] == [10 * p for p in range(10)]
    assert batches.counts.made_here == 1 and batches.counts.served == 9
    assert batches.counts.late == 1  # the second 3
    assert here.asked == [5]  # the stream had ended: made here at once, not after a wait


def _fail_at_3(position):
    with tf.control_dependencies([tf.debugging.assert_none_equal(
            position, tf.constant(3, tf.int64), message="unreadable")]):
        return tf.identity(position)


def test_a_position_overtaken_by_a_full_buffer_is_made_here_at_once():
    """Position 0 held up behind four later ones, with a buffer of four: made here without
    waiting out the timeout, and its late copy dropped."""
    here = _Here()
    batches = service.OrderedBatches(_stream_of([1, 2, 3, 4, 5, 0, 6, 7]), here, 0, 8,
                                     timeout_s=3600, buffer_size=4)
    assert [int(b["value"]) for b in batches] == [10 * p for p in range(8)]
    assert here.asked == [0] and batches.counts.made_here == 1 and batches.counts.late == 1


def test_a_stream_that_fails_is_replaced_from_the_next_position():
    """A stream that fails at position 3 (an unreadable image on a worker, say): 3 is made
    here, and a new stream serves from 4 on."""
    def stream(start, repairs):
        positions = tf.data.Dataset.range(start, 8)
        if start == 0:  # the first stream fails on its fourth element
            positions = positions.map(_fail_at_3)
        return positions.map(lambda p: {"position": p, "value": p * 10})

    here = _Here()
    batches = service.OrderedBatches(stream, here, 0, 8, timeout_s=30, buffer_size=4)
    assert [int(b["value"]) for b in batches] == [10 * p for p in range(8)]
    assert here.asked == [3] and batches.counts.made_here == 1 and batches.counts.served == 7


@pytest.fixture(scope="module")
def bad_folder(tiny_dataset, tmp_path_factory):
    """The tiny dataset with a truncated JPEG and a PNG named .JPEG in train/."""
    root = tmp_path_factory.mktemp("service_bad") / "data"
    shutil.copytree(tiny_dataset, root)
    class_dir = root / "train" / demo.WNIDS[0]
    good = (class_dir / f"{demo.WNIDS[0]}_0.JPEG").read_bytes()
    (class_dir / "zz_truncated.JPEG").write_bytes(good[: len(good) // 3])
    png = tf.io.encode_png(tf.io.decode_jpeg(good)).numpy()
    (class_dir / "zz_png.JPEG").write_bytes(png)
    return root


def test_unreadable_images_on_the_service_are_repaired_and_reported(bad_folder, local_service):
    """The workers' stream fails on the batch holding a bad file; that batch is made here,
    which repairs it and names the file; the new stream carries the repairs."""
    source = sources.open_folder(bad_folder)
    steps = 2 * order.steps_per_epoch(source, BATCH_SLICE.global_batch_size)
    batches = _ordered_train(source, local_service.target, 0, steps)
    got = list(batches)
    reference = pipeline.skipping_train_batches(source, BATCH_SLICE, SPEC)
    _assert_batches_equal(got, (next(reference) for _ in range(steps)))
    report = batches.take_report()
    assert [where.split(" (")[0] for where in report.values()] == [
        str(bad_folder / "train" / demo.WNIDS[0] / "zz_truncated.JPEG")]
    assert batches.counts.made_here >= 1 and batches.counts.served >= 1
    assert sum(int((~b["mask"]).sum()) for b in got) >= 1  # the truncated one, masked


def _worker_pids(parent: int) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")  # noqa: SIM115
        except OSError:
            continue
        if f"--exit_with_parent={parent}".encode() in cmdline:
            pids.append(int(pid))
    return pids


def test_a_worker_killed_mid_stream_loses_no_batch(tiny_dataset):
    source = sources.open_folder(tiny_dataset)
    with service.start_local(2) as own:
        batches = _ordered_train(source, own.target, 0, 36, timeout_s=3.0)
        got = [next(batches) for _ in range(6)]
        own.workers[0].kill()
        got += list(batches)
    _assert_batches_equal(got, _in_process(source, 0))
    assert len(got) == 36 and batches.counts.served + batches.counts.made_here == 36


def _start_service_process(*args) -> subprocess.Popen:
    """`imagenet-jax data-service ARGS` (a dispatcher or a worker) on this machine."""
    return subprocess.Popen([sys.executable, "-m", "imagenet_jax", "data-service", *args],
                            cwd=REPO, env=subprocess_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_a_worker_and_the_dispatcher_killed_mid_stream_lose_no_batch(tiny_dataset, tmp_path):
    """The stream of the run-level test below (marked slow): an external dispatcher with a
    journal and two workers, one worker SIGKILLed after 6 batches, the dispatcher SIGKILLed
    after 12 and restarted on its journal: every batch arrives, bitwise the in-process one."""
    source = sources.open_folder(tiny_dataset)
    port, journal = _free_port(), tmp_path / "journal"
    dispatcher = _start_service_process("dispatcher", f"--port={port}", f"--work_dir={journal}")
    workers = [_start_service_process("worker", f"--dispatcher=127.0.0.1:{port}",
                                      "--worker_host=127.0.0.1") for _ in range(2)]
    try:
        batches = _ordered_train(source, f"grpc://127.0.0.1:{port}", 0, 36, timeout_s=5.0)
        got = [next(batches) for _ in range(6)]
        workers[0].kill()
        got += [next(batches) for _ in range(6)]
        dispatcher.kill()
        dispatcher.wait()
        dispatcher = _start_service_process("dispatcher", f"--port={port}",
                                            f"--work_dir={journal}")
        got += list(batches)
    finally:
        for process in (dispatcher, *workers):
            process.kill()
    _assert_batches_equal(got, _in_process(source, 0))
    assert len(got) == 36 and batches.counts.served + batches.counts.made_here == 36
    assert batches.counts.served > 0


def test_local_workers_end_with_a_run_killed_by_sigkill(tiny_dataset, tmp_path):
    """SIGKILL of the run leaves no worker behind."""
    script = ("import sys, time\nfrom imagenet_jax.data import service\n"
              "service.start_local(2)\nprint('ready', flush=True)\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                               env=subprocess_env(1), text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        workers = _worker_pids(process.pid)
        assert len(workers) == 2
        process.kill()
        process.wait()
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{pid}") and _is_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "workers outlived their run"
            time.sleep(0.2)
    finally:
        process.kill()


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_dispatcher_is_one_line_and_exit_2(tiny_dataset, tmp_path):
    port = _free_port()
    workdir = tmp_path / "run"
    result = subprocess.run(
        command(["--config=tests/tiny_config.py", f"--config.dataset=folder:{tiny_dataset}",
                 f"--config.data_service=grpc://127.0.0.1:{port}"], workdir),
        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and f"grpc://127.0.0.1:{port}" in lines[0], result.stderr[-2000:]
    assert not workdir.exists()


def _evaluations(workdir) -> list[dict]:
    """Every evaluation record of the run in `workdir`, but for the time it was taken."""
    return [{k: v for k, v in r.items() if k != "time"} for r in read_records(workdir)
            if r["split"].startswith("val")]


def _service_counts(workdir) -> tuple[int, int]:
    """(served, made here) of the last run that trained in `workdir`: its last train
    record counts the batches since that run started."""
    records = [r for r in read_records(workdir) if r["split"] == "train"]
    return records[-1]["input_served"], records[-1]["input_made_here"]


# Slow (40 s): the default run has a service stream from a resumed step (10) equal to the
# in-process one, the kill-and-resume of the same recipe without the service, and a run on
# the service through a killed worker and a restarted dispatcher.
@pytest.mark.slow
def test_a_run_on_local_workers_killed_and_resumed_equals_the_uninterrupted_one(
        tiny_dataset, uninterrupted, tmp_path):
    """The resumable recipe (4 devices, 48 steps) with its batches from two local workers,
    SIGKILLed once and resumed on a new service: the parameters of the run without it."""
    flags = resumable_flags(tiny_dataset, "--config.data_service=local:2",
                            "--config.log_every_steps=1")
    report = chaos(flags, tmp_path, kills=1, seed=1, env=subprocess_env(4),
                   uninterrupted=uninterrupted)
    assert report.kills == 1 and report.params_equal, report.describe()
    served, made_here = _service_counts(tmp_path / "killed")
    assert served + made_here == 48 - report.landed[0].resumed_from and served > 0


# Slow (70 s on two cores): the stream of it, a worker and the dispatcher killed and the
# dispatcher restarted on its journal, is checked batch by batch in the default run (above),
# and the resumable recipe without the service is killed and resumed there too
# (test_fault_tolerance); this is the two together, through the CLI.
@pytest.mark.slow
def test_a_worker_and_the_dispatcher_killed_mid_run_lose_nothing(tiny_dataset, uninterrupted,
                                                                 tmp_path):
    """An external dispatcher (fault-tolerant, with a journal) and two workers started with
    `imagenet-jax data-service`: one worker SIGKILLed at step 12, the dispatcher SIGKILLed at
    step 24 and restarted on its journal. The run ends with the uninterrupted parameters,
    each step's batch consumed once."""
    port, journal = _free_port(), tmp_path / "journal"
    start = _start_service_process
    dispatcher = start("dispatcher", f"--port={port}", f"--work_dir={journal}")
    workers = [start("worker", f"--dispatcher=127.0.0.1:{port}", "--worker_host=127.0.0.1")
               for _ in range(2)]
    workdir = tmp_path / "run"
    flags = resumable_flags(tiny_dataset, f"--config.data_service=grpc://127.0.0.1:{port}",
                            "--config.data_service_timeout_s=5", "--config.log_every_steps=1")
    try:
        run = subprocess.Popen(command(flags, workdir), cwd=REPO, env=subprocess_env(4),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watcher, done = RunWatcher(workdir), []
        deadline = time.monotonic() + 600
        while run.poll() is None and time.monotonic() < deadline:
            step = watcher.last_step() or 0
            if step >= 12 and "worker" not in done:
                workers[0].kill()
                done.append("worker")
            if step >= 24 and "dispatcher" not in done:
                dispatcher.kill()
                dispatcher.wait()
                dispatcher = start("dispatcher", f"--port={port}", f"--work_dir={journal}")
                done.append("dispatcher")
            time.sleep(0.01)
        output = run.communicate(timeout=60)[0]
        assert run.returncode == 0, output[-3000:]
    finally:
        for process in (dispatcher, *workers):
            process.kill()
    assert done == ["worker", "dispatcher"]
    assert trees_equal(final_params(workdir), final_params(uninterrupted))
    assert _evaluations(workdir) == _evaluations(uninterrupted)  # evaluated on the service too
    served, made_here = _service_counts(workdir)
    assert served + made_here == 48 and served > 0
    steps = [r["step"] for r in read_records(workdir) if r["split"] == "train"]
    assert steps == list(range(1, 49))  # each step once, in order
