"""Input on tf.data service: the pipeline's work spread over worker processes and machines,
with the order and exactness of the in-process pipeline.

`config.data_service` picks where the batches are made:
  ""                 in this process (pipeline.py), the default
  local:N            a dispatcher in this process and N worker processes on this host,
                     started with the run and ended with it (even on SIGKILL of the run)
  grpc://HOST:PORT   an external dispatcher (`imagenet-jax data-service dispatcher`) and
                     its workers (`imagenet-jax data-service worker`), on CPU machines

The service promises no order, and a worker that dies loses the splits it held (DYNAMIC
sharding is at most once). Neither reaches the model: every element a worker makes is one
process-local batch keyed by its position (a train step or an eval batch), a pure function
of (seed, position, process) as in pipeline.py, and `OrderedBatches` yields positions
start, start + 1, ... from a small reorder buffer. A position that has not arrived within
`data_service_timeout_s` is made here by the in-process pipeline instead, and a late copy
is dropped: each batch is consumed exactly once whatever the service does. A resumed run
asks for positions from its checkpoint's step on, under a new job name, so no dispatcher
state decides the data position (tensorflow#63079: a restored job skipped data when the
dispatcher's journal and the model's checkpoint disagreed). Unreadable images are found
and repaired by the in-process pipeline (repair.py) when the service reports the failing
batch, and the service carries on with the repairs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import tensorflow as tf

from imagenet_jax.data import repair
from imagenet_jax.errors import ConfigError
from imagenet_jax.spec import parse_data_service

_service = tf.data.experimental.service
_REACHABLE_TIMEOUT_S = 10.0
_WORKER_START_TIMEOUT_S = 120.0
READY = "data service worker ready"


@dataclasses.dataclass
class Service:
    """A dispatcher to send pipelines to: `target` is 'grpc://HOST:PORT'."""

    target: str
    dispatcher: _service.DispatchServer | None = None  # local:N: ours
    workers: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    def close(self) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        self.workers = []
        if self.dispatcher is not None:
            self.dispatcher.stop()
            self.dispatcher = None

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(spec: str) -> Service | None:
    """The service `spec` names, started when it is local:N; None for ''.

    grpc://HOST:PORT is checked for a listening dispatcher first: an address nothing
    answers on is a ConfigError naming it, before the run touches its workdir.
    """
    kind, argument = parse_data_service(spec)
    if kind == "":
        return None
    if kind == "grpc":
        check_reachable(argument)
        return Service(f"grpc://{argument}")
    return start_local(int(argument))


def check_reachable(address: str, timeout_s: float = _REACHABLE_TIMEOUT_S) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(
            f"data_service grpc://{address}: no dispatcher answers there ({e.strerror or e}); "
            "start one with `imagenet-jax data-service dispatcher --port=PORT`, or run "
            "without --config.data_service") from None


def start_local(num_workers: int, cpus: list[int] | None = None) -> Service:
    """A dispatcher in this process and `num_workers` worker processes on 127.0.0.1, each
    on its own share of `cpus` (default: those this process may use), so that N workers
    never run more threads than the host has cores; each ends when this process does."""
    dispatcher = _service.DispatchServer(_service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://", 1)[1]
    service = Service(dispatcher.target, dispatcher)
    try:
        for share in cpu_shares(num_workers, cpus):
            worker = subprocess.Popen(
                [sys.executable, "-m", "imagenet_jax", "data-service", "worker",
                 f"--dispatcher={address}", "--worker_host=127.0.0.1",
                 f"--cpus={','.join(map(str, share))}", f"--exit_with_parent={os.getpid()}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
            service.workers.append(worker)
            threading.Thread(target=_log_lines, args=(worker.stderr, f"worker {worker.pid}"),
                             daemon=True).start()
        for worker in service.workers:
            _wait_until_ready(worker)
    except BaseException:
        service.close()
        raise
    logging.info("data service: dispatcher %s with %d local workers", dispatcher.target,
                 num_workers)
    return service


def _log_lines(stream, name: str) -> None:
    """A local worker's stderr (TensorFlow's start-up lines, its own log) into this
    process's log, not onto the console; ends with the worker."""
    for line in stream:
        logging.info("data service %s: %s", name, line.rstrip())


def cpu_shares(num_workers: int, cpus: list[int] | None = None) -> list[list[int]]:
    """`cpus` (default: this process's) in `num_workers` contiguous shares as even as can
    be; with more workers than cores, each worker one core, round robin."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus)
    if num_workers >= len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(num_workers)]
    bounds = [round(i * len(cpus) / num_workers) for i in range(num_workers + 1)]
    return [cpus[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _wait_until_ready(worker: subprocess.Popen) -> None:
    """Waits for the worker's READY line: it has started and registered."""
    ready, _, _ = select.select([worker.stdout], [], [], _WORKER_START_TIMEOUT_S)
    line = worker.stdout.readline() if ready else ""
    if line.strip() != READY:
        code = worker.poll()
        raise RuntimeError(
            f"a data service worker ({' '.join(worker.args)}) "
            + (f"exited with status {code} at start (its output: the log)" if code is not None else
               f"did not start within {_WORKER_START_TIMEOUT_S:.0f} s"))
    worker.stdout.close()


def serve_dispatcher(port: int, work_dir: str = "") -> None:
    """Runs a dispatcher until killed; with `work_dir` (local or gs://) in fault-tolerant
    mode: its jobs survive a restart on the same work_dir."""
    config = _service.DispatcherConfig(port=port, work_dir=work_dir or None,
                                       fault_tolerant_mode=bool(work_dir))
    server = _service.DispatchServer(config)
    logging.info("data service dispatcher on %s%s", server.target,
                 f", journal in {work_dir}" if work_dir else "")
    server.join()


def serve_worker(dispatcher: str, port: int = 0, worker_host: str = "",
                 exit_with_parent: int = 0) -> None:
    """Runs a worker for `dispatcher` (HOST:PORT) until killed; clients reach it at
    `worker_host` (default: this machine's host name). `exit_with_parent`: a pid whose
    end ends this worker too (local:N's workers)."""
    from imagenet_jax.data import named_reads, pipeline

    pipeline.set_up_host()
    named_reads.install()  # the pipelines it runs may read TFDS records or gs:// objects
    if exit_with_parent:
        threading.Thread(target=_exit_with, args=(exit_with_parent,), daemon=True).start()
    host = worker_host or socket.gethostname()
    config = _service.WorkerConfig(dispatcher_address=dispatcher, port=port,
                                   worker_address=f"{host}:%port%",
                                   data_transfer_address=f"{host}:%dts_port%")
    server = _service.WorkerServer(config)
    logging.info("data service worker for %s", dispatcher)
    print(READY, flush=True)
    server.join()


def _describe_error(error: BaseException) -> str:
    """The error's type and the end of its message, where TensorFlow puts the cause."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message[-600:]}"


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def distribute(dataset: tf.data.Dataset, target: str) -> tf.data.Dataset:
    """`dataset` made by the service's workers, each split (one position) by one worker,
    under a job name of its own: a new stream never inherits another's position."""
    return dataset.apply(_service.distribute(
        processing_mode=_service.ShardingPolicy.DYNAMIC, service=target,
        job_name=f"imagenet_jax-{uuid.uuid4().hex}", compression=None))


@dataclasses.dataclass
class Counts:
    served: int = 0      # positions the service delivered in time
    made_here: int = 0   # positions made by the in-process pipeline instead
    late: int = 0        # copies that arrived after their position was made here


class OrderedBatches(Iterator[dict]):
    """Positions start, start + 1, ..., stop - 1 in order, each exactly once: from the
    service's stream when it arrives within `timeout_s`, else from the in-process pipeline.

    `stream(position, repairs)` is the service's dataset of keyed batches from `position`
    on; `local(position, repairs)` the in-process batches (SkippingBatches) from there. A
    failed stream (an unreadable image, a lost dispatcher) is replaced, from the next
    position, by a new one that carries the repairs the in-process pipeline found.
    """

    def __init__(self, stream: Callable[[int, repair.Repairs], tf.data.Dataset],
                 local: Callable[[int, repair.Repairs], repair.SkippingBatches],
                 start: int, stop: int, *, timeout_s: float, buffer_size: int):
        self._stream, self._local_at = stream, local
        self._next, self._stop = start, stop
        self._timeout_s, self._buffer_size = timeout_s, buffer_size
        self._cond = threading.Condition()
        self._arrived: dict[int, dict] = {}
        self._local: repair.SkippingBatches | None = None
        self._local_position = -1
        self._repairs = repair.Repairs()
        self._report: dict[int, str] = {}
        self.counts = Counts()
        self._generation = 0
        self._ended = False
        self._error: BaseException | None = None
        self._closed = False
        self._start_stream(start)

    def _start_stream(self, position: int) -> None:
        with self._cond:
            self._generation += 1
            self._ended, self._error = position >= self._stop, None
        if position >= self._stop:
            return
        threading.Thread(target=self._pull, args=(position, self._repairs, self._generation),
                         daemon=True, name="imagenet_jax-data-service").start()

    def _pull(self, start: int, repairs: repair.Repairs, generation: int) -> None:
        """Fills the reorder buffer from a new stream from `start` on. The stream is made
        here too: registering it waits for the dispatcher, which must never hold up the
        consumer (it makes the batches itself meanwhile)."""
        error = None
        try:
            for element in self._stream(start, repairs).as_numpy_iterator():
                position = int(element.pop("position"))
                with self._cond:
                    while (len(self._arrived) >= self._buffer_size and position != self._next
                           and self._current(generation)):
                        self._cond.wait()
                    if not self._current(generation):
                        return
                    if position < self._next or position in self._arrived:
                        self.counts.late += 1
                    else:
                        self._arrived[position] = element
                    self._cond.notify_all()
        except Exception as e:  # noqa: BLE001 - any failure of the stream: made here instead
            error = e
        with self._cond:
            if self._current(generation):
                self._ended, self._error = True, error
                self._cond.notify_all()

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self._closed

    def __next__(self) -> dict:
        position = self._next
        if position >= self._stop:
            raise StopIteration
        deadline = time.monotonic() + self._timeout_s
        with self._cond:
            # A full buffer holds only later positions: the stream is blocked behind them
            # (its client fetches no more while its own buffer is full), so waiting longer
            # would not bring this one.
            while (position not in self._arrived and not self._ended
                   and len(self._arrived) < self._buffer_size):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = self._arrived.pop(position, None)
            failed, error = self._ended and batch is None, self._error
            overtaken = len(self._arrived) >= self._buffer_size
            self._next = position + 1
            for late in [p for p in self._arrived if p < self._next]:
                del self._arrived[late]
                self.counts.late += 1
            self._cond.notify_all()
        if batch is not None:
            self.counts.served += 1
            self._local = None  # the service delivers again: stop the in-process pipeline
            return batch
        if error is not None:
            reason = f"the service's stream failed ({_describe_error(error)})"
        elif failed:
            reason = "the service's stream ended without it (a worker that died held it)"
        elif overtaken:
            reason = f"the service delivered {self._buffer_size} later positions first"
        else:
            reason = f"the service did not deliver it within {self._timeout_s:g} s"
        # A warning for the first of a run of positions made here, then one line each in
        # the log file only: a service that is down must not flood the console. Overtaken
        # positions are the service's usual disorder (a worker slower for a while): logged.
        level = logging.INFO if self._local is not None or overtaken else logging.WARNING
        logging.log(level, "data service: position %d made in this process: %s", position,
                    reason)
        batch = self._make_here(position)
        if error is not None and position + 1 < self._stop:
            self._start_stream(position + 1)  # carrying the repairs made here
        return batch

    def _make_here(self, position: int) -> dict:
        if self._local is None or self._local_position != position:
            self._local = self._local_at(position, self._repairs)
        batch = next(self._local)
        self._local_position = position + 1
        self._repairs = self._local.repairs
        self._report.update(self._local.take_report())
        self.counts.made_here += 1
        return batch

    def take_report(self) -> dict[int, str]:
        """The unreadable examples skipped since the last report (found in this process)."""
        report, self._report = self._report, {}
        return report

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._arrived.clear()
            self._cond.notify_all()
