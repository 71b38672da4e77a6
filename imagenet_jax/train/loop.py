"""The training loop: the run `assemble` builds, trained, evaluated and checkpointed.

`train_and_evaluate(config, workdir)` is the whole run; the CLI only parses flags
and calls it. Re-running on the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from imagenet_jax import run_dir, storage
from imagenet_jax.checkpoint import Checkpointer
from imagenet_jax.config import Derived
from imagenet_jax.console import Console
from imagenet_jax.data import loader, sources, wordnet
from imagenet_jax.data import service as data_service
from imagenet_jax.errors import Preempted
from imagenet_jax.evaluation.predictions import collect_predictions
from imagenet_jax.metric_writers import MetricsLogger
from imagenet_jax.parallel import describe_grid, mesh_from_shape
from imagenet_jax.train import assemble, init_from
from imagenet_jax.train.goodput import InputAlarm, TimeAccount, TimingReport
from imagenet_jax.train.preemption import PreemptionWatcher
from imagenet_jax.train.state import TrainState
from imagenet_jax.train.step_metrics import TrainMetricsBuffer
from imagenet_jax.train.steps import ClassMap


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       console: Console | None = None,
                       planned: tuple[sources.Source, Derived] | None = None,
                       started: float | None = None) -> dict:
    """Trains `config` in `workdir` (a path or gs:// URL) to the end and returns the final
    validation metrics. `console` (the CLI's, on process 0) shows the progress to a person;
    everything is logged through absl either way. `planned`: `assemble.plan(config)` where
    the caller made it already (the CLI does, before TensorFlow is imported). `started`:
    when the run began on time.perf_counter's scale (the CLI's process start), for the
    goodput records (train/goodput.py); default now.

    Nothing in the workdir is written before its checkpoint is known to fit `config`: a
    mistaken config on a workdir stops with CheckpointMismatch and leaves it as it was.
    """
    account = TimeAccount(started=started)
    storage.configure()
    console = Console.silent() if console is None else console
    workdir = storage.as_path(workdir)
    source, derived = planned or assemble.plan(config)
    run_dir.check_writable(workdir)  # before the minutes of building; creates nothing
    service = data_service.connect(config.data_service)  # an unreachable one: before the workdir
    try:
        return _train_and_evaluate(config, workdir, console, source, derived, service, account)
    finally:
        account.close()
        if service is not None:
            service.close()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path, console: Console,
                        source, derived: Derived, service: data_service.Service | None,
                        account: TimeAccount) -> dict:
    mesh = mesh_from_shape(derived.mesh_shape, derived.dcn_data)
    logging.info("Devices: %d over %d process(es): %s; %s", derived.num_devices,
                 derived.num_processes, describe_grid(mesh), derived)
    logging.info("%d classes: %s", source.num_classes, describe_classes(source.class_names))

    with account.charge("restore"):  # (reading init_from's weights, as a checkpoint's)
        fitted = start_from(config, workdir, derived, source.class_names, console)
    run = assemble.build(config, derived, mesh)
    initial = run.state if fitted is None else init_from.apply(fitted, run.state)
    run_dir.create(workdir)  # checked above; init_from refused: the workdir is as it was
    checkpointer = Checkpointer(
        run_dir.checkpoints(workdir), every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints, read_attempts=config.read_attempts,
        retry_delay_s=config.read_retry_delay_s)
    try:
        with account.charge("restore"):
            state = checkpointer.restore_latest(initial)
    except BaseException:
        checkpointer.close()
        raise
    start_step = int(state.step)
    reached = target_reached_before(workdir, config.target_top1, start_step)
    if start_step >= derived.num_train_steps or reached:
        message = (f"The run in {workdir} already finished (step {start_step}"
                   f"{', target top-1 reached' if reached else ''}).")
        logging.info(message)
        console.note(message)
        checkpointer.close()
        return last_record(workdir, "val")
    if jax.process_index() == 0:
        run_dir.write_config(workdir, config, source.class_names, derived)
        if start_step == 0:
            parameter_overview.log_parameter_overview(state.params)

    logger = MetricsLogger(workdir, resume_step=start_step)
    evaluate = functools.partial(run_eval, run.eval_step, source=source, config=config, mesh=mesh,
                                 service=service)
    console.start(first_step=start_step, total_steps=derived.num_train_steps,
                  steps_per_epoch=derived.steps_per_epoch,
                  description=f"{config.model} on {config.dataset}, {source.num_classes} "
                  f"classes, batch {config.batch_size} over {derived.num_devices} device(s)")

    train_batches = loader.train_batches(source, config, mesh, start_step, service,
                                             stop_step=derived.num_train_steps)
    profiler = StepProfiler(os.fspath(run_dir.profile(workdir)), config.profile_start_step,
                            config.profile_num_steps, start_step, derived.num_train_steps)
    timing = TimingReport(account, logger, console, start_step,
                          InputAlarm(config.batch_size, on_data_service=service is not None))
    ended_at = None  # the step this attempt ends at, done or preempted: its last record
    try:
        try:
            last_step, val_metrics = _train_loop(config, derived, run.train_step, state,
                                                 train_batches, start_step, checkpointer,
                                                 logger, evaluate, profiler, console, timing)
            ended_at = last_step
        except Preempted as stop:
            ended_at = stop.step
            raise
        finally:
            with account.charge("other"):
                train_batches.close()
            with account.charge("checkpoint"):
                checkpointer.close()  # waits for the last save to be written
            if ended_at is not None:
                timing.record(ended_at)
    finally:
        logger.close()
    return {"step": last_step, "split": "val", **val_metrics}


def start_from(config: ml_collections.ConfigDict, workdir: epath.Path, derived: Derived,
               class_names: tuple[str, ...], console: Console) -> init_from.Fitted | None:
    """config.init_from's weights fitted to the model's shapes, before the model is built;
    None where there is none or the workdir has a checkpoint of its own (which it resumes
    from instead, saying so)."""
    if not config.init_from:
        return None
    own = own_checkpoint_steps(workdir)
    if own:
        message = (f"Resuming from this workdir's own checkpoint (step {own[0]}); init_from "
                   f"{config.init_from!r} gave only its first weights.")
        logging.info(message)
        console.note(message)
        return None
    fitted = init_from.fit(init_from.read(config.init_from, config),
                           assemble.weight_shapes(config, derived), config, class_names)
    init_from.log_report(fitted.report)
    console.note(fitted.report.summary())
    return fitted


def own_checkpoint_steps(workdir: epath.Path) -> list[int]:
    """The finished checkpoints in `workdir`, newest first, read without writing anything."""
    folder = run_dir.checkpoints(workdir)
    if not folder.exists():
        return []
    checkpointer = Checkpointer(folder, read_only=True)
    try:
        return checkpointer.steps()
    finally:
        checkpointer.close()


def _train_loop(config, derived, train_step, state, train_batches, start_step, checkpointer,
                logger, evaluate, profiler, console, timing: TimingReport) -> tuple[int, dict]:
    """Steps from `start_step` to the end (or the target top-1), with logs, evals,
    checkpoints and early stops; returns the last step and its evaluation.

    The host only waits on the device at sync points: a log, an eval, a checkpoint.
    Before every checkpoint the steps since the last sync are checked for non-finite
    numbers, so a saved state is always one the run would have kept. Where the time goes
    is charged to `timing.account`'s categories (train/goodput.py): `training` unless
    said otherwise.
    """
    account = timing.account
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=derived.num_train_steps, writer=logger.writer)
    buffer = TrainMetricsBuffer(config.on_nonfinite, checkpointer.latest_step)
    preemption = PreemptionWatcher()
    val_metrics: dict = {}
    throughput = Throughput(config.batch_size, start_step)
    account.switch("training")
    try:
        for step in range(start_step + 1, derived.num_train_steps + 1):
            profiler.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, account.next_batch(train_batches))
            account.dispatched(metrics)
            profiler.after(step, state)
            buffer.add(step, metrics)
            report_progress(step)
            is_last = step == derived.num_train_steps
            # Step 1 is logged on its own: the initial loss (about ln(classes)) at once, and
            # a loss every device and process count computes from the same parameters, so
            # equal to rounding, before differences in the gradient sums compound.
            logged = step % config.log_every_steps == 0 or is_last or step == 1
            if logged:
                train_metrics = buffer.drain()
                train_metrics["images_per_sec"] = throughput.images_per_sec(step)
                if counts := train_batches.service_counts:  # since the run (re)started
                    train_metrics.update(input_served=counts.served,
                                         input_made_here=counts.made_here,
                                         input_late=counts.late)
                timing.interval_ended(step)
                if not is_last:  # (before the train record: a run killed once a step is
                    timing.record(step)  # logged has the time of its steps up to it)
                with account.charge("other"):
                    logger.log(step, "train", train_metrics)
                    console.train(step, train_metrics)
            if step % derived.steps_per_epoch == 0 or is_last:
                epoch = step / derived.steps_per_epoch
                report_skipped(train_batches.take_report(), f"epoch {epoch:g}")
            reached = False
            if step % derived.eval_every_steps == 0 or is_last:
                account.sync()  # the steps' own time is not the evaluation's
                with throughput.paused(), account.charge("eval"):
                    val_metrics = evaluate_all(evaluate, state, step, logger, console)
                reached = reached_target(config.target_top1, val_metrics, step, derived, logger,
                                         console)
                is_last = is_last or reached
            preempted = preemption.reached(step)
            saved = is_last or preempted or checkpointer.should_save(step)
            if saved:
                buffer.check()
                with account.charge("checkpoint"):
                    checkpointer.save(step, state, force=True)
                console.checkpoint(step, checkpointer.directory)
            if preempted:
                raise Preempted(step)
            if reached:
                break
            if saved and not logged and not is_last:  # (the last: once the saves are done)
                timing.record(step)
    finally:
        try:
            preemption.close()
        finally:
            profiler.close(quietly=True)  # a failing trace write must not hide why we stop
    return step, val_metrics


def target_reached_before(workdir: epath.Path, target_top1: float, step: int) -> bool:
    """Whether the run stopped at `step` because it reached `target_top1` (a 'target'
    record there). Process 0's answer, which writes the records, is every process's."""
    if not target_top1:
        return False
    target = last_record(workdir, "target")
    reached = target.get("step") == step and target["top1"] >= target_top1
    if jax.process_count() > 1:
        reached = bool(multihost_utils.broadcast_one_to_all(np.asarray(reached)))
    return reached


def evaluate_all(evaluate: Callable, state: TrainState, step: int, logger: MetricsLogger,
                 console: Console) -> dict:
    """The validation metrics of the weights, and of their EMA when the run keeps one
    ('val_ema', also returned under 'ema_' names)."""
    metrics = evaluate(state)
    logger.log(step, "val", metrics)
    console.evaluation(step, "val", metrics)
    if state.ema is None:
        return metrics
    ema_metrics = evaluate(state.with_ema_weights())
    logger.log(step, "val_ema", ema_metrics)
    console.evaluation(step, "val_ema", ema_metrics)
    return {**metrics, **{f"ema_{name}": value for name, value in ema_metrics.items()}}


def reached_target(target_top1: float, metrics: dict, step: int, derived: Derived,
                   logger: MetricsLogger, console: Console) -> bool:
    """Whether this evaluation reaches `target_top1` (the EMA's top-1 when there is one);
    if so logs the time-to-accuracy record ('target': steps, epochs, seconds in 'time')."""
    top1 = metrics.get("ema_top1", metrics["top1"])
    if not target_top1 or top1 < target_top1:
        return False
    logger.log(step, "target", {"target_top1": target_top1, "top1": top1, "steps": step,
                                "epochs": step / derived.steps_per_epoch})
    message = (f"Reached top-1 {top1:.4f} >= target {target_top1:.4f} at step {step} "
               f"(epoch {step / derived.steps_per_epoch:.2f}): stopping.")
    logging.info(message)
    console.note(message)
    return True


class Throughput:
    """Training images per second between two logs: the time spent evaluating is left
    out of the window, and so are the images of no step (the clock is injectable)."""

    def __init__(self, global_batch_size: int, start_step: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.global_batch_size, self._clock = global_batch_size, clock
        self._step, self._start, self._paused = start_step, clock(), 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - began

    def images_per_sec(self, step: int) -> float:
        """Over the steps since the last call; starts the next window."""
        now = self._clock()
        seconds = now - self._start - self._paused
        images = (step - self._step) * self.global_batch_size
        self._step, self._start, self._paused = step, now, 0.0
        return images / seconds if seconds > 0 else float("nan")


class StepProfiler:
    """Traces steps [first, first + count) with jax.profiler into `log_dir`, on process 0.

    Only the steps this run will take are traced: a resumed run traces what is left of
    the window, and a window starting past the run's end is warned about. The trace
    waits for its last step to finish on the devices, so it holds their work, not only
    its dispatch: one sync point, only when profiling.
    """

    def __init__(self, log_dir: str, first: int, count: int, start_step: int,
                 num_train_steps: int):
        self.log_dir = log_dir
        self.steps = range(max(first, start_step + 1), min(first + count, num_train_steps + 1))
        self.enabled = bool(self.steps) and jax.process_index() == 0
        self.tracing = False
        if count and first > num_train_steps and jax.process_index() == 0:
            # (A window a resumed run has passed was traced by the run before: no warning.)
            logging.warning("profile_start_step=%d is past the run's last step (%d): "
                            "nothing will be traced.", first, num_train_steps)

    def before(self, step: int) -> None:
        if self.enabled and step == self.steps.start:
            jax.profiler.start_trace(self.log_dir)
            self.tracing = True

    def after(self, step: int, state) -> None:
        if self.tracing and step == self.steps[-1]:
            jax.block_until_ready(state)
            self.close()
            logging.info("Profile of steps %d-%d written under %s (TensorBoard's profile "
                         "plugin or xprof reads it).", self.steps.start, step, self.log_dir)

    def close(self, quietly: bool = False) -> None:
        """Stops a trace in progress; `quietly` logs a failure to write it instead."""
        if not self.tracing:
            return
        self.tracing = False
        try:
            jax.profiler.stop_trace()
        except Exception as e:  # noqa: BLE001 - the run's own outcome matters more
            if not quietly:
                raise
            logging.warning("Could not write the profile under %s: %s", self.log_dir, e)


def run_eval(eval_step, state: TrainState, *, source, config: ml_collections.ConfigDict,
             mesh, service: data_service.Service | None = None) -> dict:
    """Exact metrics over the whole validation split, whatever the batch and device count
    (made in this process or by `service`'s workers)."""
    batches = loader.eval_batches(source, config, mesh, data_service=service)
    try:
        result = collect_predictions(eval_step, state, batches,
                                     ClassMap.identity(source.num_classes)).summary()
    finally:
        batches.close()
    report_skipped(batches.take_report(), "evaluation (not counted in num_examples)")
    return result


def describe_classes(class_names: tuple[str, ...], shown: int = 5) -> str:
    """'n01440764 (tench), n01443537 (goldfish), ...': ids with their WordNet names."""
    named = [f"{c} ({wordnet.class_name(c)})" if c in wordnet.load() else c
             for c in class_names[:shown]]
    return ", ".join(named) + (", ..." if len(class_names) > shown else "")


def report_skipped(skipped: dict[int, str], when: str) -> None:
    """Logs the unreadable images this process skipped, with where each one lives."""
    if skipped:
        logging.warning("%s: skipped %d unreadable image(s) on process %d:\n  %s", when,
                        len(skipped), jax.process_index(), "\n  ".join(skipped.values()))


def last_record(workdir: epath.Path, split: str) -> dict:
    records = [r for r in run_dir.read_records(workdir) if r["split"] == split]
    return records[-1] if records else {}
