"""Where a run's time goes: goodput (the share of its wall time spent on training steps
whose work was kept) and badput, sorted by cause, from the run's own clock.

`TimeAccount` charges every moment of an attempt (one process's life on the run, from
its start to its last record) to exactly one category: it holds the current category and
each `switch` charges the time since the last switch to it, so the categories add up to
the attempt's wall time by construction, not by estimate:

  startup     process start to the first step: imports, jax.distributed, opening the
              dataset, building the state
  compile     tracing, lowering and compiling, wherever they happen (the train step's
              first call and each new resolution, the eval step): JAX's own events
  training    the steps: their dispatch, and the host waiting on the devices at the sync
              points (a log, before an evaluation or a checkpoint)
  input_wait  the host waiting for the next batch while the devices had nothing left to
              run (see `next_batch`)
  eval        evaluations
  checkpoint  the blocking part of checkpoint saves, and the wait for the last one
  restore     reading the checkpoint a resumed run starts from
  other       writing records and logs, closing the input

Across attempts, from what the workdir holds (`summarize`):

  lost_work   the training seconds of the steps a later attempt did again: those after
              the checkpoint it resumed from (moved out of `training`)
  downtime    from an attempt's last record to the next attempt's start

With several processes each keeps its own account, and at each log interval process 0
charges the slowest process's input wait (one small collective, `slowest_input_wait`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

CATEGORIES = ("startup", "compile", "training", "input_wait", "eval", "checkpoint", "restore",
              "other")
RUN_CATEGORIES = (*CATEGORIES, "lost_work", "downtime")
# How the console line and `imagenet-jax goodput` name each category.
NAMES = {"training": "goodput", "startup": "start-up", "compile": "compile",
         "input_wait": "input wait", "eval": "eval", "checkpoint": "checkpoints",
         "restore": "restore", "lost_work": "lost work", "downtime": "downtime",
         "other": "other"}
# JAX's events for tracing, lowering and compiling (or loading from the persistent cache).
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"})
INPUT_BOUND_SHARE = 0.10  # input wait over this share of a log interval's step time: warn


def process_start_time(clock: Callable[[], float] = time.perf_counter) -> float:
    """When this process started, on `clock`'s scale: from /proc/self/stat on Linux (so
    the interpreter's own start and the imports count as start-up), else now."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # (the name may hold spaces)
        started_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: since boot
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - started_s
    except (OSError, ValueError, IndexError, AttributeError):
        return clock()
    return clock() - max(0.0, age_s)


class DeviceWatch:
    """A thread that notes when the devices finish each dispatched step, so that the host
    never waits on them for it: `finished[index]` is the clock's time."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self.finished: dict[int, float] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="imagenet_jax.device_watch",
                                        daemon=True)
        self._thread.start()

    def put(self, index: int, outputs: Any) -> None:
        self._queue.put((index, jax.tree.leaves(outputs)[0]))

    def sync(self) -> None:
        """Returns once every step put so far has finished (and been timed)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=1.0)  # (a daemon: a step that never ends holds no exit)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            index, array = item
            with contextlib.suppress(Exception):  # a failed step is the loop's to report
                array.block_until_ready()  # (all of a step's outputs are ready together)
            self.finished[index] = self._clock()
            del item, array  # the step's outputs are not kept alive here


class TimeAccount:
    """One attempt's wall time, charged to CATEGORIES (module docstring).

    `clock` (seconds, monotonic) and `unix_clock` are injectable for tests, and so is
    `watch` (a DeviceWatch's `put`, `sync` and `finished`); `started` is when the attempt
    began on `clock`'s scale (default: now). Compilation is taken from JAX's events unless
    `listen=False` (tests call `compiled`).
    """

    def __init__(self, *, started: float | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 unix_clock: Callable[[], float] = time.time, watch: Any = None,
                 listen: bool = True):
        now = clock()
        self._clock = clock
        self.started = now if started is None else min(started, now)
        self.started_unix = unix_clock() - (now - self.started)
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.category, self._since = "startup", self.started
        self._compile_spans: list[tuple[float, float]] = []
        self._watch = DeviceWatch(clock) if watch is None else watch
        self._owns_watch = watch is None
        self._dispatched = 0  # steps dispatched; each input wait names the last one
        self._waits: list[tuple[float, float, int]] = []  # (began, ended, last step)
        self._interval_start = dict(self.seconds)
        self._listening = listen
        if listen:
            jax.monitoring.register_event_time_span_listener(self._on_time_span)

    def switch(self, category: str) -> float:
        """Charges the time since the last switch to the current category (its compiling
        to `compile`) and makes `category` current; returns the clock's time."""
        now = self._clock()
        elapsed = now - self._since
        if self._compile_spans:
            compiling = min(elapsed, _union_length(self._compile_spans))
            self._compile_spans.clear()
            self.seconds["compile"] += compiling
            elapsed -= compiling
        self.seconds[self.category] += elapsed
        self.category, self._since = category, now
        return now

    @contextlib.contextmanager
    def charge(self, category: str) -> Iterator[None]:
        """The block's time goes to `category`; then the category before it goes on."""
        previous = self.category
        self.switch(category)
        try:
            yield
        finally:
            self.switch(previous)

    def compiled(self, start: float, end: float) -> None:
        """A span of compiling, in any clock's seconds (only its length is used); spans
        nested in one another count once."""
        self._compile_spans.append((start, end))

    def _on_time_span(self, event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.compiled(start, end)

    def next_batch(self, batches: Iterator) -> Any:
        """`next(batches)`, its wait charged to `input_wait`. The part of the wait during
        which the devices were still running the last step dispatched is overlap, not a
        loss: `settle` moves it to `training`, once the watch has timed that step. No
        device sync on the way."""
        previous = self.category
        began = self.switch("input_wait")
        try:
            batch = next(batches)
        finally:
            ended = self.switch(previous)
        self._waits.append((began, ended, self._dispatched))
        return batch

    def dispatched(self, outputs: Any) -> None:
        """A step was dispatched with these outputs (the watch times when they are ready)."""
        self._dispatched += 1
        self._watch.put(self._dispatched, outputs)

    def sync(self) -> None:
        """Waits for the devices to finish every dispatched step (charged to the current
        category): before an evaluation, whose own time would otherwise hold theirs."""
        self._watch.sync()

    def settle(self) -> None:
        """Waits until the watch has timed every dispatched step (at a sync point: at
        once), and moves the overlapped part of each input wait to `training`."""
        if not self._waits:
            return
        self._watch.sync()
        finished = self._watch.finished
        overlap = 0.0
        for began, ended, last_step in self._waits:
            done = finished.get(last_step, -math.inf)  # (none before the first step)
            overlap += max(0.0, min(ended, done) - began)
        self._waits.clear()
        for index in [i for i in finished if i < self._dispatched]:
            del finished[index]  # the next wait names the last step only
        overlap = min(overlap, self.seconds["input_wait"])
        self.seconds["input_wait"] -= overlap
        self.seconds["training"] += overlap

    def interval(self) -> dict[str, float]:
        """Each category's seconds since the last call (after `settle`)."""
        self.switch(self.category)
        since = {c: self.seconds[c] - self._interval_start[c] for c in CATEGORIES}
        self._interval_start = dict(self.seconds)
        return since

    def charge_slower_input(self, slowest_wait: float, interval: dict[str, float]) -> None:
        """Over `interval` another process waited `slowest_wait` s for input, longer than
        this one: this process spent the difference waiting on the devices for it (in
        `training`), and that is input wait."""
        extra = min(max(0.0, slowest_wait - interval["input_wait"]), interval["training"])
        self.seconds["training"] -= extra
        self.seconds["input_wait"] += extra
        self._interval_start["training"] -= extra
        self._interval_start["input_wait"] += extra
        interval["training"] -= extra
        interval["input_wait"] += extra

    def wall_seconds(self) -> float:
        """The attempt's wall time so far, all of it charged."""
        now = self.switch(self.category)
        return now - self.started

    def unix_time(self) -> float:
        """Now, as Unix time on the attempt's own clock (immune to clock steps)."""
        return self.started_unix + (self._since - self.started)

    def close(self) -> None:
        if self._listening:
            jax.monitoring.unregister_event_time_span_listener(self._on_time_span)
            self._listening = False
        if self._owns_watch:
            self._watch.close()


def _union_length(spans: Sequence[tuple[float, float]]) -> float:
    """The length of the union of the intervals: a trace nested in another counts once."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def slowest_input_wait(own_wait: float) -> tuple[float, int]:
    """(the largest input wait over the processes this interval, the process that had
    it): one allgather of a scalar; this process's own with one process."""
    if jax.process_count() == 1:
        return own_wait, jax.process_index()
    from jax.experimental import multihost_utils

    waits = np.asarray(multihost_utils.process_allgather(np.float32(own_wait))).ravel()
    slowest = int(np.argmax(waits))
    return float(waits[slowest]), slowest


@dataclasses.dataclass
class Summary:
    """A run's breakdown: seconds per RUN_CATEGORIES, over `attempts` attempts."""

    seconds: dict[str, float]
    attempts: int = 1

    @property
    def wall_s(self) -> float:
        return sum(self.seconds.values())

    def percent(self, category: str) -> float:
        wall = self.wall_s
        return 100.0 * self.seconds[category] / wall if wall > 0 else 0.0

    def scalars(self) -> dict[str, float]:
        """The record's figures: goodput %, the wall time, and each category in s and %."""
        figures = {"goodput_pct": self.percent("training"), "wall_s": self.wall_s,
                   "training_s": self.seconds["training"]}
        for category in RUN_CATEGORIES:
            if category != "training":
                figures[f"{category}_s"] = self.seconds[category]
                figures[f"{category}_pct"] = self.percent(category)
        return {name: round(value, 4) for name, value in figures.items()}

    def line(self) -> str:
        """'goodput 87% (compile 4%, input wait 6%, eval 2%, checkpoints 1%)': the
        categories that round to 1% or more, checkpoint saves and restores together."""
        shares = {NAMES[c]: self.percent(c) for c in RUN_CATEGORIES
                  if c not in ("training", "checkpoint", "restore")}
        shares["checkpoints"] = self.percent("checkpoint") + self.percent("restore")
        order = ["start-up", "compile", "input wait", "eval", "checkpoints", "lost work",
                 "downtime", "other"]
        shown = [f"{name} {shares[name]:.0f}%" for name in order if round(shares[name]) >= 1]
        return (f"goodput {self.percent('training'):.0f}%"
                + (f" ({', '.join(shown)})" if shown else ""))


def attempt_record(account: TimeAccount) -> dict:
    """What a goodput record holds of its own attempt (JSON only, not TensorBoard): its
    seconds per category, its wall time and the Unix time of the record."""
    wall = account.wall_seconds()
    return {"attempt_seconds": {c: round(s, 4) for c, s in account.seconds.items()},
            "attempt_wall_s": round(wall, 4), "unix_time": round(account.unix_time(), 3)}


def summarize(records: Sequence[Mapping]) -> Summary | None:
    """The breakdown of a run from its records of every attempt (`run_dir.read_records(
    workdir, every_attempt=True)`, in file order), or None if none has a goodput record.

    Each attempt counts as its last goodput record says. An attempt that a later one
    resumed before its end lost the training seconds after the checkpoint resumed from
    (its goodput record at that step, written after the save, says how many it had
    then); the time from its last record to the next attempt's start is downtime.
    """
    attempts: dict[int, dict] = {}
    for record in records:
        entry = attempts.setdefault(record.get("attempt", 0), {
            "resumed_from": record.get("resumed_from", 0), "goodput": []})
        if record["split"] == "goodput" and "attempt_seconds" in record:
            entry["goodput"].append(record)
    numbers = sorted(attempts)
    timed = [n for n in numbers if attempts[n]["goodput"]]
    if not timed:
        return None
    totals = dict.fromkeys(RUN_CATEGORIES, 0.0)
    for i, number in enumerate(timed):
        goodput = attempts[number]["goodput"]
        last = goodput[-1]
        for category, seconds in last["attempt_seconds"].items():
            totals[category] += seconds
        later = [attempts[n]["resumed_from"] for n in numbers if n > number]
        if later:
            kept = [r for r in goodput if r["step"] <= min(later)]
            baseline = kept[-1]["attempt_seconds"]["training"] if kept else 0.0
            lost = max(0.0, last["attempt_seconds"]["training"] - baseline)
            totals["training"] -= lost
            totals["lost_work"] += lost
        if i + 1 < len(timed):
            following = attempts[timed[i + 1]]["goodput"][-1]
            next_start = following["unix_time"] - following["attempt_wall_s"]
            totals["downtime"] += max(0.0, next_start - last["unix_time"])
    return Summary(totals, len(timed))


class InputAlarm:
    """One console warning when the input holds the devices back: input wait over
    INPUT_BOUND_SHARE of a log interval's step time (the first interval aside, which
    holds the pipeline's warm-up); once per run, and again only if the share doubles."""

    def __init__(self, global_batch_size: int, on_data_service: bool,
                 cores: int | None = None):
        self.global_batch_size, self.on_data_service = global_batch_size, on_data_service
        self.cores = cores or _cores_in_use()
        self._intervals, self._warned_share = 0, 0.0

    def check(self, interval: Mapping[str, float], steps: int, last_step: int) -> str | None:
        """The warning for a log interval of `steps` steps ending at `last_step`, or None."""
        self._intervals += 1
        stepping = interval["training"] + interval["input_wait"]
        if self._intervals == 1 or steps <= 0 or stepping <= 0:
            return None
        share = interval["input_wait"] / stepping
        if share <= INPUT_BOUND_SHARE or (self._warned_share and share < 2 * self._warned_share):
            return None
        self._warned_share = share
        images = steps * self.global_batch_size
        fed = images / interval["training"] if interval["training"] > 0 else math.inf
        more = ("more tf.data service workers (docs/data_service.md)" if self.on_data_service
                else "tf.data service workers (--config.data_service, docs/data_service.md)")
        return (f"warning: input-bound: over steps {last_step - steps + 1}-{last_step} the "
                f"devices waited for input {share:.0%} of the step time. The input delivered "
                f"{images / stepping:,.0f} img/s; the devices, when fed, ran at {fed:,.0f} "
                f"img/s ({self.cores} CPU core(s) in use for the input). Try: `imagenet-jax "
                "bench input` (the pipeline alone), a downscaled store (`imagenet-jax prepare "
                f"--max_size=N`), more cores, or {more}.")


def _cores_in_use() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class TimingReport:
    """The train loop's side of the account: at each log interval, the slowest process's
    input wait and the input-bound alarm; goodput records of the whole run so far (the
    attempts before this one included, from `logger.history`) in metrics.jsonl and
    TensorBoard, written by process 0. `gather` is injectable for tests."""

    def __init__(self, account: TimeAccount, logger: Any, console: Any, start_step: int,
                 alarm: InputAlarm,
                 gather: Callable[[float], tuple[float, int]] = slowest_input_wait):
        self.account, self.logger, self.console, self.alarm = account, logger, console, alarm
        self.start_step, self._gather = start_step, gather
        self._last_logged, self._slowest_process = start_step, None
        # What summarize needs of the attempts before: their goodput records and the step
        # each resumed from.
        self._history = [r for r in logger.history
                         if r["split"] == "goodput" or "resumed_from" in r]

    def interval_ended(self, step: int) -> str | None:
        """At a log step, on every process (one collective): charges the slowest process's
        input wait over the interval, and warns if it held the devices back. Returns the
        warning, if any."""
        self.account.settle()
        interval = self.account.interval()
        slowest, self._slowest_process = self._gather(interval["input_wait"])
        self.account.charge_slower_input(slowest, interval)
        warning = self.alarm.check(interval, step - self._last_logged, step)
        self._last_logged = step
        if warning:  # (on the console once, by process 0; the log file has it too)
            with self.account.charge("other"):
                logging.info("%s", warning)
                self.console.note(warning)
        return warning

    def record(self, step: int) -> Summary:
        """Logs the run's breakdown so far as a 'goodput' record at `step`; returns it."""
        self.account.settle()
        attempt = attempt_record(self.account)
        if self._slowest_process is not None:
            attempt["input_wait_process"] = self._slowest_process  # the last interval's
        summary = summarize([*self._history, {
            "step": step, "split": "goodput", "attempt": self.logger.attempt,
            "resumed_from": self.start_step, **attempt}])
        with self.account.charge("other"):
            self.logger.log(step, "goodput", summary.scalars(), details=attempt)
        return summary


def format_breakdown(name: str, summary: Summary) -> str:
    """`imagenet-jax goodput`'s table of one run: each category in seconds and %."""
    from imagenet_jax.console import format_duration

    rows = [(NAMES[c], f"{summary.seconds[c]:,.1f} s", f"{summary.percent(c):.1f}%")
            for c in RUN_CATEGORIES]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"  {a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    return (f"{name}: {format_duration(summary.wall_s)} of wall time over "
            f"{summary.attempts} attempt(s)\n" + "\n".join(lines))
