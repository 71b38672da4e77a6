"""Where a run's time goes (imagenet_jax/train/goodput.py), on a fake clock: the categories
add up to the wall time, lost work and downtime across a kill, the input-bound alarm, and
the slowest of two processes' input wait."""

import io
import itertools
import json

import pytest

from imagenet_jax import run_dir
from imagenet_jax.console import Console
from imagenet_jax.metric_writers import MetricsLogger
from imagenet_jax.train import goodput
from imagenet_jax.train.goodput import (
    CATEGORIES,
    InputAlarm,
    Summary,
    TimeAccount,
    TimingReport,
    summarize,
)

BATCH = 32


class FakeClock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


class FakeDevice:
    """The account's device watch: runs each dispatched step for `step_s` on the fake clock,
    one after another, as soon as it is dispatched and the last is done; `sync` is the host
    waiting for the last (the clock moves on to then). `follow`: another FakeDevice whose
    steps this one's wait for (a peer process's, through the step's collectives)."""

    def __init__(self, clock, step_s, follow=None):
        self.clock, self.step_s, self.follow = clock, step_s, follow
        self.finished, self._free_at, self._last = {}, 0.0, None
        self.history = {}  # every step's finish (the account prunes `finished`)

    def put(self, index, outputs):
        start = max(self.clock.now, self._free_at)
        self._free_at = start + self.step_s
        if self.follow is not None:
            self._free_at = max(self._free_at, self.follow.history[index])
        self.finished[index] = self.history[index] = self._last = self._free_at

    def sync(self):
        if self._last is not None:
            self.clock.now = max(self.clock.now, self._last)


def slow_source(clock, seconds):
    """Batches that take `seconds` each to make: the sleep of a slowed pipeline."""
    for index in itertools.count():
        clock.now += seconds
        yield {"index": index}


def account_on(clock, device_step_s, start=0.0, unix_start=1e9, follow=None):
    clock.now = start
    device = FakeDevice(clock, device_step_s, follow)
    return TimeAccount(started=start, clock=clock,
                       unix_clock=lambda: unix_start + clock.now - start,
                       watch=device, listen=False), device


class Quiet:
    """The logger and console a TimingReport writes to, keeping what it was given."""

    def __init__(self, history=(), attempt=1):
        self.history, self.attempt = list(history), attempt
        self.records, self.notes = [], []

    def log(self, step, split, metrics, *, details=None):
        self.records.append({"step": step, "split": split, **metrics, **(details or {})})

    def note(self, text):
        self.notes.append(text)


def train(account, report, clock, batches, steps, *, log_every=5, checkpoint_every=None,
          dispatch_s=0.001, first=1, compile_s=0.0, closing=False):
    """The calls the train loop makes of the account, for steps first..first+steps-1: the
    batch, the dispatch (the first compiling for `compile_s`), the sync and interval at each
    log, a checkpoint's save (0.2 s), a record at each log and checkpoint (but the last
    step's when `closing`: the run records it once it has closed)."""
    account.switch("training")
    for step in range(first, first + steps):
        batch = account.next_batch(batches)
        assert "index" in batch
        if step == first and compile_s:
            account.compiled(clock.now, clock.now + compile_s)
            clock.now += compile_s
        clock.now += dispatch_s
        account.dispatched(None)
        logged = step % log_every == 0 or step == first
        if logged:
            account.sync()  # the drain: the host waits for the devices
            report.interval_ended(step)
        saved = checkpoint_every and step % checkpoint_every == 0
        if saved:
            account.sync()
            with account.charge("checkpoint"):
                clock.now += 0.2
        if (logged or saved) and not (closing and step == first + steps - 1):
            report.record(step)


def test_every_second_is_charged_once_and_the_categories_add_up_to_the_wall_time():
    clock = FakeClock()
    account, _ = account_on(clock, device_step_s=1.0)
    clock.now = 3.0  # imports, the dataset opened
    with account.charge("restore"):
        clock.now += 2.0
    report = TimingReport(account, Quiet(), Console.silent(), 0, InputAlarm(BATCH, False))
    train(account, report, clock, slow_source(clock, 0.25), 20, compile_s=4.0, closing=True)
    with account.charge("eval"):
        clock.now += 1.5
    summary = report.record(20)  # the last record, once the run closed
    seconds = account.seconds
    assert sum(seconds.values()) == pytest.approx(clock.now, abs=1e-9)
    assert summary.wall_s == pytest.approx(clock.now, abs=1e-9)
    assert seconds["startup"] == pytest.approx(3.0)
    assert seconds["restore"] == pytest.approx(2.0)
    assert seconds["compile"] == pytest.approx(4.0)
    assert seconds["eval"] == pytest.approx(1.5)
    # The first batch, and the one after each log's sync (steps 2, 6, 11, 16), came while
    # the devices had nothing to run: input wait. Each other one came while they still ran
    # the step before (the host runs ahead): overlap, training.
    assert seconds["input_wait"] == pytest.approx(5 * 0.25)
    assert seconds["training"] >= 20 * 1.0
    record = report.logger.records[-1]
    assert record["goodput_pct"] == pytest.approx(100 * seconds["training"] / clock.now,
                                                  abs=1e-3)
    assert sum(record[f"{c}_s"] for c in CATEGORIES if c != "training") + \
        record["training_s"] == pytest.approx(record["wall_s"], abs=1e-3)


def test_a_slowed_pipeline_trips_the_alarm_once_and_a_fast_one_never():
    """A step takes 1 s on the devices. A batch of 1.5 s: after each log's sync the devices
    wait for the whole next batch, then 0.5 s a step (its first second overlaps the step
    before): 38% of steps 2-10, then 37.5% of each later interval, never twice the first
    share. A batch of 0.5 s: only the batch after each sync is waited for, 5%."""
    warnings = {}
    # The first batch, 5.5 s in steps 2-10, 6 s in each later interval; 0.5 s a sync.
    for input_s, input_wait in ((1.5, 1.5 + 5.5 + 3 * 6.0), (0.5, 5 * 0.5)):
        clock = FakeClock()
        account, _ = account_on(clock, device_step_s=1.0)
        console = Quiet()
        report = TimingReport(account, Quiet(), console, 0, InputAlarm(BATCH, False, cores=2))
        train(account, report, clock, slow_source(clock, input_s), 40, log_every=10)
        warnings[input_s] = console.notes
        assert account.seconds["input_wait"] == pytest.approx(input_wait, abs=1e-6)
        assert sum(account.seconds.values()) == pytest.approx(clock.now, abs=1e-9)
    assert warnings[0.5] == []
    (warning,) = warnings[1.5]
    assert "over steps 2-10 the devices waited for input 38% of the step time" in warning
    # 9 steps' images over 14.509 s of steps (5.5 s waiting), and over the 9.009 s left.
    assert f"input delivered {9 * BATCH / 14.509:,.0f} img/s" in warning
    assert f"when fed, ran at {9 * BATCH / 9.009:,.0f} img/s" in warning
    assert "2 CPU core(s)" in warning and "bench input" in warning
    assert "--max_size" in warning and "--config.data_service" in warning


def test_the_alarm_warns_again_only_when_the_share_doubles():
    alarm = InputAlarm(BATCH, on_data_service=True, cores=4)
    shares = [0.5, 0.2, 0.2, 0.3, 0.39, 0.41, 0.5, 0.9]  # the first interval is warm-up
    warned = [alarm.check({"training": 1 - s, "input_wait": s}, 10, 10 * (i + 1))
              for i, s in enumerate(shares)]
    assert [w is not None for w in warned] == [False, True, False, False, False, True, False,
                                               True]
    assert "more tf.data service workers" in warned[1]


def test_a_killed_run_resumed_counts_the_steps_it_did_again_as_lost_work(tmp_path):
    """Killed after step 10 with its last checkpoint at 8: the resumed run's lost work is
    the training time the records give steps 9-10, and the time from the killed run's
    last record to the resumed start is downtime."""
    clock = FakeClock()
    # Attempt 1: steps 1-10, a record at each step (log every step) and checkpoint (4, 8).
    account, device = account_on(clock, device_step_s=0.5, unix_start=1e9)
    clock.now = 2.0
    logger = MetricsLogger(tmp_path, resume_step=0)
    report = TimingReport(account, logger, Console.silent(), 0, InputAlarm(BATCH, False))
    device.step_s = 0.5
    train(account, report, clock, slow_source(clock, 0.01), 10, log_every=1,
          checkpoint_every=4)
    logger.writer.close()  # killed: no final record; the file holds what was written
    records = run_dir.read_records(tmp_path, every_attempt=True)
    goodput_records = {r["step"]: r for r in records if r["split"] == "goodput"}
    recorded_9_10 = (goodput_records[10]["attempt_seconds"]["training"]
                     - goodput_records[8]["attempt_seconds"]["training"])
    assert recorded_9_10 == pytest.approx(2 * 0.5, abs=0.02)  # two steps of 0.5 s
    killed_at = goodput_records[10]["unix_time"]
    wall_1 = goodput_records[10]["attempt_wall_s"]

    # Attempt 2, 30 s after the last record: resumes from checkpoint 8, trains 9-12.
    clock2 = FakeClock()
    account2, _ = account_on(clock2, device_step_s=0.5, unix_start=killed_at + 30.0)
    clock2.now = 1.0
    logger2 = MetricsLogger(tmp_path, resume_step=8)
    assert logger2.attempt == 2
    report2 = TimingReport(account2, logger2, Console.silent(), 8, InputAlarm(BATCH, False))
    train(account2, report2, clock2, slow_source(clock2, 0.01), 4, log_every=1, first=9,
          closing=True)
    final = report2.record(12)
    logger2.close()

    summary = summarize(run_dir.read_records(tmp_path, every_attempt=True))
    assert summary.attempts == 2
    assert summary.seconds["lost_work"] == pytest.approx(recorded_9_10, abs=1e-3)
    assert summary.seconds["downtime"] == pytest.approx(30.0, abs=1e-3)
    assert summary.wall_s == pytest.approx(wall_1 + 30.0 + clock2.now, abs=1e-2)
    assert final.seconds == pytest.approx(summary.seconds, abs=1e-3)  # the run's own record
    last = run_dir.read_records(tmp_path)[-1]
    assert last["split"] == "goodput" and last["lost_work_s"] == pytest.approx(
        recorded_9_10, abs=1e-3)
    # metrics.jsonl kept attempt 1's steps 9 and 10; the run's history reads each once.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["attempt"]) for r in lines if r["split"] == "goodput"
            and r["step"] in (9, 10)] == [(9, 1), (10, 1), (9, 2), (10, 2)]
    kept = [(r["step"], r["split"]) for r in run_dir.read_records(tmp_path)]
    assert len(kept) == len(set(kept))
    assert [r["attempt"] for r in run_dir.read_records(tmp_path) if r["step"] > 8] == [2] * 4


def test_process_0_records_the_slowest_process_input_wait():
    """Two processes step together (the step's collectives tie their devices); process 1's
    input is slow. Process 0 waits on its devices, which wait on process 1's batches: its
    own input wait is nil, and it records process 1's."""
    clock_1 = FakeClock()
    account_1, device_1 = account_on(clock_1, device_step_s=1.0)
    report_1 = TimingReport(account_1, Quiet(), Console.silent(), 0, InputAlarm(BATCH, False))
    intervals_1 = []
    report_1._gather = lambda wait: (intervals_1.append(wait) or (wait, 1))
    train(account_1, report_1, clock_1, slow_source(clock_1, 1.5), 20, log_every=10)

    clock_0 = FakeClock()
    account_0, _ = account_on(clock_0, device_step_s=1.0, follow=device_1)
    own = []

    def gather(wait):  # the allgather: this interval's waits of process 0 and process 1
        own.append(wait)
        waits = [wait, intervals_1[len(own) - 1]]
        return max(waits), waits.index(max(waits))

    report_0 = TimingReport(account_0, Quiet(), Console.silent(), 0, InputAlarm(BATCH, False),
                            gather=gather)
    train(account_0, report_0, clock_0, slow_source(clock_0, 0.1), 20, log_every=10)
    assert sum(own) == pytest.approx(3 * 0.1, abs=1e-6)
    assert account_0.seconds["input_wait"] == pytest.approx(account_1.seconds["input_wait"],
                                                            abs=1e-6)
    # Process 1 waits for its first batch and the one after each log's sync whole, for
    # the others 0.5 s; process 0 only for the same three batches, 0.1 s each.
    assert account_1.seconds["input_wait"] == pytest.approx(3 * 1.5 + 17 * 0.5, abs=1e-6)
    record = report_0.logger.records[-1]
    assert record["input_wait_process"] == 1
    assert sum(account_0.seconds.values()) == pytest.approx(clock_0.now, abs=1e-9)


def test_compile_spans_nested_in_one_another_count_once():
    clock = FakeClock()
    account, _ = account_on(clock, device_step_s=0.0)
    account.switch("training")
    account.compiled(10.0, 14.0)  # a trace holding another trace and a lowering
    account.compiled(11.0, 12.0)
    account.compiled(13.5, 15.0)
    clock.now = 20.0
    account.switch("other")
    assert account.seconds["compile"] == pytest.approx(5.0)
    assert account.seconds["training"] == pytest.approx(15.0)


def test_the_console_line_names_the_categories_of_1_percent_or_more():
    seconds = dict.fromkeys(goodput.RUN_CATEGORIES, 0.0)
    seconds.update(training=87.0, compile=4.0, input_wait=6.0, eval=2.0, checkpoint=0.6,
                   restore=0.5, other=0.3)
    summary = Summary(seconds)
    assert summary.wall_s == pytest.approx(100.4)
    assert Summary({**seconds, "other": 0.4}).line() == (
        "goodput 87% (compile 4%, input wait 6%, eval 2%, checkpoints 1%)")
    stream = io.StringIO()
    Console(stream, live=False).finish(
        {"step": 9, "top1": 0.5, "top5": 0.9, "loss": 1.0, "num_examples": 70}, "runs/x",
        42.0, goodput=summary.line())
    assert stream.getvalue().splitlines()[-2].startswith("goodput 87% (compile 4%")


def test_records_of_attempts_a_resumed_run_did_again_are_left_out_of_the_history():
    records = [{"step": s, "split": "train", "attempt": 1, **({"resumed_from": 0} if s == 1
                                                              else {})} for s in range(1, 8)]
    records += [{"step": s, "split": "train", "attempt": 2, **({"resumed_from": 4} if s == 5
                                                               else {})} for s in (5, 6)]
    records += [{"step": 3, "split": "train", "attempt": 3, "resumed_from": 2}]  # damaged 4
    records += [{"step": 3, "split": "goodput", "attempt": 3, "n": n} for n in (1, 2)]
    kept = run_dir.kept_records(records)
    assert [(r["step"], r["attempt"]) for r in kept] == [(1, 1), (2, 1), (3, 3), (3, 3)]
    assert kept[-1] == {"step": 3, "split": "goodput", "attempt": 3, "n": 2}  # the last
    old = [{"step": s, "split": "train"} for s in (1, 2)]  # written before attempts
    assert run_dir.kept_records(old) == old


def test_the_process_start_is_before_now():
    start = goodput.process_start_time()
    import time

    assert start <= time.perf_counter()
