"""The flags of `imagenet-jax` and what each command does with them: the checks a library
function cannot make (which flags go together), one library call, and what is printed.

cli.py holds the table of commands (which command takes which flags, its help) and calls
these. A refusal is raised as an `errors.Error` (a usage mistake as ConfigError); cli.run
prints it and exits with its status. Heavy imports (JAX, TensorFlow) happen inside each
command, after its flags are checked, so that a mistake fails fast.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from imagenet_jax import errors, logfiles
from imagenet_jax.errors import ConfigError

FLAGS = flags.FLAGS
# Every flag the commands read, but --config (cli.py defines that one): (absl's definer,
# default, help). Which command takes which is cli.COMMANDS' business.
FLAG_DEFINITIONS = {
    "workdir": (flags.DEFINE_string, None, "Checkpoints, metrics.jsonl, TensorBoard events "
                "and the resolved config go here; re-running on it resumes. Default: "
                "runs/<config file name>, runs/<name>_<ARG> for --config=FILE:ARG."),
    "json": (flags.DEFINE_bool, False, "models, bench, eval, goodput: print JSON instead of "
             "a table."),
    "step": (flags.DEFINE_integer, None, "eval, predict, export: the checkpoint's step. "
             "Default: the latest."),
    "model": (flags.DEFINE_string, None, "import: the torchvision architecture, e.g. resnet50."),
    "weights": (flags.DEFINE_string, None, "import: torchvision weights, .safetensors (or "
                ".pth/.pt with torch installed)."),
    "out": (flags.DEFINE_string, None, "export: the .safetensors file to write. plot: the PNG "
            "(default: the first WORKDIR's curves.png). prepare --folder: the new folder."),
    "top": (flags.DEFINE_integer, 5, "predict: classes shown per image."),
    "eval": (flags.DEFINE_list, None, "eval: the evaluation sets, comma-separated, e.g. "
             "tfds:imagenet2012,tfds:imagenet_v2/matched-frequency. Default: the run's own "
             "dataset."),
    "coordinator_address": (flags.DEFINE_string, None, "Multi-process: host:port of process 0 "
                            "(needs --num_processes and --process_id). Without it, a detected "
                            "cluster (Cloud TPU pod, SLURM, Open MPI) is joined automatically, "
                            "else the run is alone."),
    "num_processes": (flags.DEFINE_integer, None, "Multi-process: the number of processes."),
    "process_id": (flags.DEFINE_integer, None, "Multi-process: this process's id, 0-based."),
    "distributed_timeout_s": (flags.DEFINE_integer, 300, "Multi-process: give up joining the "
                              "job after this long."),
    "heartbeat_timeout_s": (flags.DEFINE_integer, 100, "Multi-process: a peer silent this "
                            "long ends the job (no hang)."),
    "compilation_cache_dir": (flags.DEFINE_string, None, "Persistent XLA compilation cache: a "
                              "restarted or repeated run loads its compiled steps instead of "
                              "compiling them again. Default: $JAX_COMPILATION_CACHE_DIR, else "
                              "~/.cache/imagenet_jax/xla; '' turns it off."),
    "mode": (flags.DEFINE_string, "synthetic", "bench train: 'synthetic' (one random batch, "
             "the step alone) or 'pipeline' (the configured input pipeline)."),
    "steps": (flags.DEFINE_integer, 20, "bench train: timed steps; the step time is their "
              "median. bench input: global batches per timed pass."),
    "repeats": (flags.DEFINE_integer, 3, "bench input: timed passes; each figure is their "
                "median."),
    "warmup_steps": (flags.DEFINE_integer, 3, "bench: untimed steps after compilation."),
    "goodput": (flags.DEFINE_bool, False, "bench train: each step through the train loop's "
                "time accounting (goodput, input wait), to measure what it costs the step."),
    "device_counts": (flags.DEFINE_list, None, "bench scaling: device counts to run, e.g. "
                      "1,2,4,8. Default: the powers of two up to the device count."),
    "manual_dir": (flags.DEFINE_string, None, "prepare: the folder holding the ImageNet-2012 "
                   "tars ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar."),
    "data_dir": (flags.DEFINE_string, None, "prepare: where TFDS writes the prepared dataset. "
                 "Default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."),
    "allow_partial": (flags.DEFINE_bool, False, "prepare: accept split sizes other than "
                      "ImageNet-2012's (a subset), with a warning instead of an error."),
    "max_size": (flags.DEFINE_integer, None, "prepare: downscale the images so their longer "
                 "side is at most this many pixels (a faster, smaller store)."),
    "quality": (flags.DEFINE_integer, 90, "prepare: JPEG quality of the downscaled images."),
    "folder": (flags.DEFINE_string, None, "prepare: an image folder to copy downscaled (with "
               "--out and --max_size) instead of preparing ImageNet for TFDS."),
    "port": (flags.DEFINE_integer, None, "data-service: the port to listen on (a worker's "
             "default: any free one)."),
    "work_dir": (flags.DEFINE_string, None, "data-service dispatcher: its journal (local or "
                 "gs://): fault-tolerant mode, jobs survive a restart."),
    "dispatcher": (flags.DEFINE_string, None, "data-service worker: the dispatcher's HOST:PORT."),
    "worker_host": (flags.DEFINE_string, None, "data-service worker: the name or address "
                    "clients reach this worker at. Default: this host's name."),
    "cpus": (flags.DEFINE_list, None, "data-service worker: run on these CPUs only, e.g. 0,1 "
             "(its tf.data threads sized to them). Default: every CPU."),
    "exit_with_parent": (flags.DEFINE_integer, 0, "data-service worker: end when the process "
                         "of this pid ends (the workers a run starts for local:N)."),
}
BENCHMARKS = ("train", "input", "scaling")
DATA_SERVICE_ROLES = ("dispatcher", "worker")


def train(args: list[str]) -> None:
    if args:
        raise ConfigError(f"unexpected arguments {args}; flags look like --config.FIELD=VALUE")
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    log_file = _log_file("train")
    _join_job()
    import jax

    _use_compilation_cache()
    from imagenet_jax.console import Console
    from imagenet_jax.train import assemble

    if log_file:  # every process says where its log is
        print(f"Log: {log_file} (copied into {workdir}/logs/ once the run trains; "
              "--verbosity=0 prints it here instead)", flush=True)
    from imagenet_jax.train.goodput import process_start_time

    console = Console() if jax.process_index() == 0 else Console.silent()
    started = process_start_time()  # the run's clock: "Done in" and goodput alike
    with _as_bad_config(ConfigError, prefix="config: "):
        # Checked and planned before the loop imports TensorFlow (2-3 s): a config mistake
        # is reported in about a second. (Opening a tfds: dataset imports it.)
        with logfiles.native_stderr_to(log_file):
            planned = assemble.plan(config)
        logfiles.import_tensorflow_quietly(log_file)
        from imagenet_jax.train.loop import train_and_evaluate

        try:
            result = train_and_evaluate(config, workdir, console=console, planned=planned,
                                        started=started)
        except (errors.NonFiniteError, errors.Preempted):
            logfiles.keep_log(log_file, workdir)  # it trained: its log joins the run
            raise
    logfiles.keep_log(log_file, workdir)
    if result:
        from imagenet_jax import run_dir
        from imagenet_jax.train.goodput import summarize

        summary = summarize(run_dir.read_records(workdir, every_attempt=True))
        console.finish(result, workdir, time.perf_counter() - started,
                       goodput=summary.line() if summary else None)


def evaluate(args: list[str]) -> None:
    if args:
        raise ConfigError(f"unexpected arguments {args}; usage: imagenet-jax eval --workdir=DIR "
                          "[--step=N] [--eval=SPEC,...] [--config.FIELD=VALUE ...] [--json]")
    if not FLAGS.workdir:
        raise ConfigError("eval needs --workdir=DIR, the run to evaluate")
    log_file = _log_file("eval")  # (never copied: eval changes nothing in the run)
    _join_job()
    import jax

    _use_compilation_cache()
    logfiles.import_tensorflow_quietly(log_file)
    from imagenet_jax.evaluation import report
    from imagenet_jax.evaluation.run import evaluate_run

    result = evaluate_run(FLAGS.workdir, FLAGS.eval or (), step=FLAGS.step,
                          overrides=_config_overrides())
    if jax.process_index() == 0:
        print(json.dumps(report.json_safe(result)) if FLAGS.json else report.format_table(result))


def predict(args: list[str]) -> None:
    if not args or not FLAGS.workdir:
        raise ConfigError("usage: imagenet-jax predict --workdir=DIR IMAGE [IMAGE ...] [--top=5] "
                          "[--json]")
    _join_job()
    import jax

    _use_compilation_cache()
    from imagenet_jax.predict import predict_files

    result = predict_files(FLAGS.workdir, args, top=FLAGS.top, step=FLAGS.step,
                           overrides=_config_overrides())
    if jax.process_index() == 0:
        if FLAGS.json:
            print(json.dumps(result))
        for item in result["predictions"]:
            if "error" in item:
                print(f"imagenet-jax: error: {item['error']}", file=sys.stderr)
            elif not FLAGS.json:
                print(item["path"])
                for c in item["classes"]:
                    print(f"  {c['probability']:7.2%}  {c['name']} ({c['class']})")
    if any("error" in item for item in result["predictions"]):
        sys.exit(errors.ExitStatus.FAILED)


def import_weights(args: list[str]) -> None:
    if args or not (FLAGS.model and FLAGS.weights and FLAGS.workdir):
        raise ConfigError("usage: imagenet-jax import --model=NAME --weights=FILE --workdir=DIR "
                          "[--config=FILE] [--config.FIELD=VALUE ...]")
    _join_job()
    from imagenet_jax import models
    from imagenet_jax.config import base_config, set_field
    from imagenet_jax.transfer import import_to_workdir
    from imagenet_jax.weights import WeightsError

    explicit = FLAGS["config"].present
    config = FLAGS.config if explicit else base_config()
    overrides = _config_overrides()
    with _as_bad_config(WeightsError, ValueError):
        if not explicit:
            config.image_size = models.get_spec(FLAGS.model).resolution
        for name, value in overrides.items():
            set_field(config, name, value)
        # A dataset named on the command line is opened (its classes must match the
        # weights'); otherwise none is needed: ImageNet's classes for 1,000-class weights.
        named = explicit or "dataset" in overrides
        if not named:
            config.dataset = "tfds:imagenet2012"
        result = import_to_workdir(FLAGS.model, FLAGS.weights, FLAGS.workdir, config,
                                   open_dataset=named)
    print(f"Imported {result['model']} ({result['num_classes']} classes) into "
          f"{result['workdir']} as step 0.")


def export_weights(args: list[str]) -> None:
    if args or not (FLAGS.workdir and FLAGS.out):
        raise ConfigError("usage: imagenet-jax export --workdir=DIR --out=FILE.safetensors "
                          "[--step=N]")
    _join_job()
    from imagenet_jax.transfer import export_from_workdir
    from imagenet_jax.weights import WeightsError

    with _as_bad_config(WeightsError):
        result = export_from_workdir(FLAGS.workdir, FLAGS.out, step=FLAGS.step)
    print(f"Exported step {result['step']} of {FLAGS.workdir} ({result['model']}) to "
          f"{result['out']}.")


def plot(args: list[str]) -> None:
    if not args:
        raise ConfigError("usage: imagenet-jax plot WORKDIR [WORKDIR ...] [--out=FILE.png]")
    from imagenet_jax import run_dir
    from imagenet_jax.plot import plot_runs

    with _as_bad_config(ValueError):
        result = plot_runs(args, FLAGS.out or str(run_dir.curves(args[0])))
    runs = ", ".join(f"{name} ({count} records)" for name, count in result["runs"].items())
    print(f"Wrote {result['out']}: {runs}")


def goodput(args: list[str]) -> None:
    if not args:
        raise ConfigError("usage: imagenet-jax goodput WORKDIR [WORKDIR ...] [--json]")
    from imagenet_jax import run_dir
    from imagenet_jax.train.goodput import format_breakdown, summarize

    summaries = {}
    for workdir in args:
        summary = summarize(run_dir.read_records(workdir, every_attempt=True))
        if summary is None:
            raise ConfigError(f"{workdir} holds no goodput record (no metrics.jsonl, or one "
                              "written before runs timed their parts)")
        summaries[workdir] = summary
    if FLAGS.json:
        print(json.dumps({workdir: {"attempts": summary.attempts, **summary.scalars()}
                          for workdir, summary in summaries.items()}))
        return
    print("\n\n".join(format_breakdown(workdir, summary)
                       for workdir, summary in summaries.items()))


def list_models(args: list[str]) -> None:
    from imagenet_jax.models import summary

    rows = summary.describe_all()
    if FLAGS.json:
        print(json.dumps(rows))
        return
    print(f"{'name':<20} {'params':>14} {'GMACs':>8} {'resolution':>10}")
    for row in rows:
        print(f"{row['name']:<20} {row['params']:>14,} {row['gmacs']:>8.3f} "
              f"{row['resolution']:>10}")


def bench(args: list[str]) -> None:
    if len(args) != 1 or args[0] not in BENCHMARKS:
        raise ConfigError(f"bench takes one benchmark, got {args}; valid benchmarks: "
                          f"{', '.join(BENCHMARKS)}")
    benchmark = args[0]
    device_counts = _device_counts() if benchmark == "scaling" else None
    _join_job()
    import jax

    _use_compilation_cache(fresh=benchmark == "train")
    from imagenet_jax.bench.train import format_table

    with _as_bad_config(ConfigError, prefix="config: "):
        if benchmark == "train":
            from imagenet_jax.bench.train import bench_train

            result = bench_train(FLAGS.config, mode=FLAGS.mode,
                                 warmup_steps=FLAGS.warmup_steps, steps=FLAGS.steps,
                                 goodput=FLAGS.goodput)
        elif benchmark == "input":
            from imagenet_jax.bench.input import bench_input

            result = bench_input(FLAGS.config, batches=FLAGS.steps, repeats=FLAGS.repeats)
        else:
            from imagenet_jax.bench.scaling import bench_scaling
            from imagenet_jax.bench.scaling import format_scaling_table as format_table

            result = bench_scaling(FLAGS.config, device_counts=device_counts, steps=FLAGS.steps,
                                   warmup_steps=FLAGS.warmup_steps)
    if jax.process_index() == 0:
        print(json.dumps(result) if FLAGS.json else format_table(result))


def prepare(args: list[str]) -> None:
    if args:
        raise ConfigError(f"unexpected arguments {args}; usage: imagenet-jax prepare "
                          "--manual_dir=DIR [--data_dir=DIR] [--allow_partial] [--max_size=N], or "
                          "--folder=DIR --out=NEW_DIR --max_size=N")
    from imagenet_jax.data.downscale import Store, copy_folder

    store = None
    if FLAGS.max_size is not None or FLAGS["quality"].present:
        if FLAGS.max_size is None:
            raise ConfigError("--quality is the JPEG quality of downscaled images: give "
                              "--max_size=N too")
        with _as_bad_config(ValueError):
            store = Store(FLAGS.max_size, FLAGS.quality)
    if FLAGS.folder:
        if FLAGS.manual_dir or FLAGS.data_dir or FLAGS.allow_partial:
            raise ConfigError("--folder copies an image folder; --manual_dir, --data_dir and "
                              "--allow_partial prepare ImageNet for TFDS: give one or the other")
        if not FLAGS.out or store is None:
            raise ConfigError("prepare --folder=DIR needs --out=NEW_DIR and --max_size=N")
        with _as_bad_config(FileNotFoundError, FileExistsError):
            count = copy_folder(FLAGS.folder, FLAGS.out, store)
        print(f"{FLAGS.out}: {count:,} images from {FLAGS.folder} ({store.describe()})")
        return
    if FLAGS.out:
        raise ConfigError("--out is the new folder of `prepare --folder`; TFDS writes to "
                          "--data_dir")
    if not FLAGS.manual_dir:
        raise ConfigError("prepare needs --manual_dir=DIR, the folder holding "
                          "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (or --folder=DIR "
                          "to copy an image folder)")
    from imagenet_jax.data.prepare import PrepareError, prepare_imagenet2012

    with _as_bad_config(PrepareError):
        counts = prepare_imagenet2012(FLAGS.manual_dir, FLAGS.data_dir,
                                      allow_partial=FLAGS.allow_partial, store=store)
    how = f" ({store.describe()})" if store else ""
    print(f"imagenet2012 prepared{how}: "
          + ", ".join(f"{split} {n:,}" for split, n in counts.items()))


def data_service(args: list[str]) -> None:
    if len(args) != 1 or args[0] not in DATA_SERVICE_ROLES:
        raise ConfigError(f"data-service takes one role, got {args}; valid roles: "
                          f"{', '.join(DATA_SERVICE_ROLES)}")
    from imagenet_jax.data import service

    if args[0] == "dispatcher":
        if FLAGS.port is None:
            raise ConfigError("data-service dispatcher needs --port=P, the port workers and runs "
                              "reach it on")
        service.serve_dispatcher(FLAGS.port, FLAGS.work_dir or "")
        return
    if not FLAGS.dispatcher or ":" not in FLAGS.dispatcher:
        raise ConfigError(f"data-service worker needs --dispatcher=HOST:PORT, got "
                          f"{FLAGS.dispatcher!r}")
    if FLAGS.cpus:  # before TensorFlow sizes its thread pools
        try:
            os.sched_setaffinity(0, {int(cpu) for cpu in FLAGS.cpus})
        except (ValueError, OSError) as e:
            raise ConfigError(f"data-service worker --cpus={','.join(FLAGS.cpus)}: {e}") from None
    service.serve_worker(FLAGS.dispatcher, FLAGS.port or 0, FLAGS.worker_host or "",
                         FLAGS.exit_with_parent)


@contextlib.contextmanager
def _as_bad_config(*refusals: type[Exception], prefix: str = "") -> Iterator[None]:
    """A library's refusal of the given kinds (a WeightsError, a PrepareError, ...) becomes
    a ConfigError with the same message after `prefix`: one line, exit status 2."""
    try:
        yield
    except refusals as e:
        raise ConfigError(f"{prefix}{e}") from None


def default_workdir(config_argument: str) -> str:
    """runs/<config file name>, or runs/<name>_<ARG> for FILE:ARG, so that the variants of
    one parameterised config (configs/resnet.py:resnet101) do not share a workdir."""
    path, _, argument = config_argument.partition(":")
    name = Path(path).stem
    if argument:
        name += "_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in argument)
    return str(Path("runs") / name)


def _log_file(command: str) -> Path | None:
    """The command's log file (see logfiles.py); none with --verbosity (-v), which prints
    every log line on the console, as absl does."""
    return None if FLAGS["verbosity"].present else logfiles.log_to_file(command)


def _join_job() -> None:
    """jax.distributed set-up from the flags; before anything touches a device. Raises
    JobUnavailable."""
    from imagenet_jax.parallel import distributed

    distributed.initialize(distributed.JobSpec(
        coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id, initialization_timeout_s=FLAGS.distributed_timeout_s,
        heartbeat_timeout_s=FLAGS.heartbeat_timeout_s))


def _use_compilation_cache(fresh: bool = False) -> None:
    """Turns the persistent compilation cache on. `fresh` (bench train, without an explicit
    --compilation_cache_dir): a new empty directory, so the first compile is really cold
    and the second, warm one is a restarted run's, whatever was cached before."""
    import jax

    directory = FLAGS.compilation_cache_dir
    if directory is None and fresh:
        directory = tempfile.mkdtemp(prefix="imagenet_jax_bench_xla.")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
            Path.home() / ".cache" / "imagenet_jax" / "xla")
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)


def _config_overrides() -> dict:
    """{'FIELD': value} for each --config.FIELD=VALUE given, typed as config_flags parsed it."""
    names = [arg[len("--config."):].partition("=")[0] for arg in sys.argv
             if arg.startswith("--config.")]
    overrides = {}
    for name in names:
        value = FLAGS.config
        for part in name.split("."):
            value = value[part]
        overrides[name] = value
    return overrides


def _device_counts() -> list[int] | None:
    """--device_counts as integers (bench scaling checks their range)."""
    if FLAGS.device_counts is None:
        return None
    try:
        return [int(n) for n in FLAGS.device_counts]
    except ValueError:
        raise ConfigError("--device_counts must be integers, got "
                          f"{','.join(FLAGS.device_counts)}") from None
