"""The `imagenet-jax` command: flags and subcommands only; each calls one library function.

  imagenet-jax [train] [--config=configs/NAME.py] [--workdir=DIR] [--config.FIELD=VALUE ...]
      Train and evaluate; with no flags, the demo config into runs/demo. Any config field
      can be overridden, e.g. --config.model=resnet18 --config.num_epochs=30. Re-running
      on a workdir resumes from its latest checkpoint.
  imagenet-jax eval --workdir=DIR [--step=N] [--eval=SPEC[,SPEC...]] [--config.FIELD=VALUE]
                    [--json]
      Evaluates a run's checkpoint (the latest, or --step) with the run's own model,
      resolution and crop (any field overridable) on each evaluation set (default: the
      run's dataset): 'demo', 'folder:/path', 'tfds:NAME' (e.g. imagenet2012,
      imagenet_v2/matched-frequency, imagenet2012_real), 'real:/path/real.json'. Top-1,
      top-5, NLL, calibration (ECE), per-class top-1, WordNet mistake severity; writes
      DIR/eval/STEP.json and a reliability diagram per set; --json prints the JSON.
      Reads the workdir's checkpoints only: nothing there is changed.
  imagenet-jax import --model=NAME --weights=FILE --workdir=DIR [--config=...] [--config.F=V]
      Writes a step-0 checkpoint of model NAME with torchvision's weights (FILE: a state
      dict as .safetensors, or .pth/.pt when torch is installed) and its config into DIR:
      `train` on DIR fine-tunes from it, `eval` and `predict` read it. The config is
      --config's, else the ResNet-50 recipe's, at the model's native resolution.
  imagenet-jax export --workdir=DIR --out=FILE.safetensors [--step=N]
      A run's checkpoint as a torchvision state dict: torchvision's load_state_dict takes it.
  imagenet-jax predict --workdir=DIR IMAGE [IMAGE ...] [--top=5] [--step=N] [--json]
      The top classes of each image, with probabilities and WordNet names, through the
      run's eval transform. An unreadable file is one line naming it; the others are still
      predicted, and the exit status is then 1.
  imagenet-jax plot WORKDIR [WORKDIR ...] [--out=FILE.png]
      Loss, top-1/top-5 (train and val) and the learning rate against steps, and loss and
      top-1 against time, of each run's metrics.jsonl, several runs overlaid with their
      names. Default --out: the first WORKDIR's curves.png.
  imagenet-jax models [--json]
      The registered models: parameters (1000 classes), forward GMACs of one image at
      the native resolution, native resolution. --json prints a JSON list instead.
  imagenet-jax bench train [--mode=synthetic|pipeline] [--steps=20] [--warmup_steps=3]
                           [--config=...] [--config.FIELD=VALUE ...] [--json]
      Times the configured model's train step: compile time cold (a fresh compilation
      cache unless --compilation_cache_dir is given) and warm (a restarted run's, from
      that cache), step time (median, p10, p90), images/s, TFLOP/s from XLA's cost
      analysis, a dense-matmul rate measured in the same run and their ratio (MFU), peak
      memory. --mode=pipeline feeds the real input pipeline instead of one synthetic
      batch. --json prints one JSON object.
  imagenet-jax bench scaling [--device_counts=1,2,4,8] [--steps=20] [--warmup_steps=3]
                             [--config=...] [--config.FIELD=VALUE ...] [--json]
      Times the train step, data parallel, on the first n devices for each count, at a
      fixed per-device batch: --config.batch_size is the global batch at the largest
      count. A table of devices, global batch, step time (median), images/s and
      efficiency against linear scaling; --json prints one JSON object with "rows".
  imagenet-jax bench input [--steps=20] [--repeats=3] [--config=...] [--config.FIELD=...]
      Times the configured input pipeline alone on the first --steps global batches:
      images/s on the host and as global arrays on the devices, the eval pipeline, and
      two floors on the same files (read only; read and fully decode), each the median
      of --repeats passes after one warm-up pass; host memory. --json: one JSON object.
  imagenet-jax prepare --manual_dir=DIR [--data_dir=DIR] [--allow_partial]
                       [--max_size=N [--quality=Q]]
  imagenet-jax prepare --folder=DIR --out=NEW_DIR --max_size=N [--quality=Q]
      Prepares ImageNet-2012 for TensorFlow Datasets (ArrayRecord files) from the official
      ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in --manual_dir (download them
      from image-net.org after registering), offline; hours for the full dataset. Split
      sizes other than 1,281,167 train and 50,000 validation images are an error unless
      --allow_partial. Already prepared: only checks the counts. --max_size=N writes the
      images downscaled to at most N pixels on their longer side (JPEG --quality, default
      90), a smaller store that decodes faster, into its own --data_dir. With --folder,
      writes such a copy of an image folder to --out instead.
  imagenet-jax data-service dispatcher --port=P [--work_dir=DIR]
  imagenet-jax data-service worker --dispatcher=HOST:P [--port=P] [--worker_host=NAME]
                                   [--cpus=0,1,...]
      Runs a tf.data service server until killed, for --config.data_service=grpc://HOST:P:
      the dispatcher (with --work_dir, local or gs://, in fault-tolerant mode: its jobs
      survive a restart), or a worker that runs the input pipelines of the runs it serves
      (on CPU machines; clients reach it at --worker_host, default this host's name).

Exit status: 0 done (or already done); 2 a bad config or flag, before anything runs, with
one line saying what is wrong and what is valid; 3 a non-finite loss or gradient norm
(config.on_nonfinite=stop), the last good checkpoint kept; 75 preempted (SIGTERM): a
checkpoint was saved and the same command resumes; 4 could not join a multi-process job;
5 the workdir's checkpoints could not be read (storage unreachable, after retries): nothing
was changed, run the same command again later.

Multi-process: one process per host, joined with --coordinator_address, --num_processes
and --process_id (launch/local.sh does this on one machine), or automatically on a
detected cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging as std_logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
EXIT_BAD_CONFIG = 2
EXIT_NO_JOB = 4  # could not join the multi-process job
EXIT_STORAGE = 5  # checkpoints unreadable for a reason other than damage; nothing changed

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined on first use, not at import: config_flags reads --config.* overrides from
    sys.argv as soon as the flag exists, and a bad override must fail as a bad config."""
    config_flags.DEFINE_config_file(
        "config", str(DEFAULT_CONFIG),
        "Config file (configs/NAME.py). Override any field with --config.FIELD=VALUE, e.g. "
        "--config.model=resnet18 --config.batch_size=512 --config.dataset=folder:/data/imagenet",
        lock_config=True)
    flags.DEFINE_string(
        "workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events and the resolved "
        "config go here; re-running on it resumes. Default: runs/<config file name>, "
        "runs/<name>_<ARG> for --config=FILE:ARG.")
    flags.DEFINE_bool("json", False, "models, bench, eval: print JSON instead of a table.")
    flags.DEFINE_integer("step", None, "eval, predict, export: the checkpoint's step. "
                         "Default: the latest.")
    flags.DEFINE_string("model", None, "import: the torchvision architecture, e.g. resnet50.")
    flags.DEFINE_string("weights", None, "import: torchvision weights, .safetensors (or "
                        ".pth/.pt with torch installed).")
    flags.DEFINE_string("out", None, "export: the .safetensors file to write. plot: the PNG "
                        "(default: the first WORKDIR's curves.png). prepare --folder: the "
                        "new folder.")
    flags.DEFINE_integer("top", 5, "predict: classes shown per image.")
    flags.DEFINE_list("eval", None, "eval: the evaluation sets, comma-separated, e.g. "
                      "tfds:imagenet2012,tfds:imagenet_v2/matched-frequency. Default: the "
                      "run's own dataset.")
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-process: host:port of process 0 (needs --num_processes and "
                        "--process_id). Without it, a detected cluster (Cloud TPU pod, "
                        "SLURM, Open MPI) is joined automatically, else the run is alone.")
    flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's id, 0-based.")
    flags.DEFINE_integer("distributed_timeout_s", 300,
                         "Multi-process: give up joining the job after this long.")
    flags.DEFINE_integer("heartbeat_timeout_s", 100,
                         "Multi-process: a peer silent this long ends the job (no hang).")
    flags.DEFINE_string(
        "compilation_cache_dir", None, "Persistent XLA compilation cache: a restarted or "
        "repeated run loads its compiled steps instead of compiling them again. Default: "
        "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/imagenet_jax/xla; '' turns it off.")
    flags.DEFINE_string("mode", "synthetic", "bench train: 'synthetic' (one random batch, "
                        "the step alone) or 'pipeline' (the configured input pipeline).")
    flags.DEFINE_integer("steps", 20, "bench train: timed steps; the step time is their "
                         "median. bench input: global batches per timed pass.")
    flags.DEFINE_integer("repeats", 3, "bench input: timed passes; each figure is their median.")
    flags.DEFINE_integer("warmup_steps", 3, "bench: untimed steps after compilation.")
    flags.DEFINE_list("device_counts", None, "bench scaling: device counts to run, e.g. "
                      "1,2,4,8. Default: the powers of two up to the device count.")
    flags.DEFINE_string("manual_dir", None, "prepare: the folder holding the ImageNet-2012 "
                        "tars ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.")
    flags.DEFINE_string("data_dir", None, "prepare: where TFDS writes the prepared dataset. "
                        "Default: $TFDS_DATA_DIR, else ~/tensorflow_datasets.")
    flags.DEFINE_bool("allow_partial", False, "prepare: accept split sizes other than "
                      "ImageNet-2012's (a subset), with a warning instead of an error.")
    flags.DEFINE_integer("max_size", None, "prepare: downscale the images so their longer "
                         "side is at most this many pixels (a faster, smaller store).")
    flags.DEFINE_integer("quality", 90, "prepare: JPEG quality of the downscaled images.")
    flags.DEFINE_string("folder", None, "prepare: an image folder to copy downscaled "
                        "(with --out and --max_size) instead of preparing ImageNet for TFDS.")
    flags.DEFINE_integer("port", None, "data-service: the port to listen on (a worker's "
                         "default: any free one).")
    flags.DEFINE_string("work_dir", None, "data-service dispatcher: its journal (local or "
                        "gs://): fault-tolerant mode, jobs survive a restart.")
    flags.DEFINE_string("dispatcher", None, "data-service worker: the dispatcher's HOST:PORT.")
    flags.DEFINE_string("worker_host", None, "data-service worker: the name or address "
                        "clients reach this worker at. Default: this host's name.")
    flags.DEFINE_list("cpus", None, "data-service worker: run on these CPUs only, e.g. 0,1 "
                      "(its tf.data threads sized to them). Default: every CPU.")
    flags.DEFINE_integer("exit_with_parent", 0, "data-service worker: end when the process "
                         "of this pid ends (the workers a run starts for local:N).")


def _fail(message: str) -> None:
    print(f"imagenet-jax: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_CONFIG)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(_flag_error_message(e))
    return []


def _flag_error_message(error: flags.Error) -> str:
    """One line. A ConfigError raised by a config file's get_config (a bad ARCH in
    --config=FILE:ARCH) is reported as its own message: config_flags re-raises it with the
    traceback in the text, so the first one raised is the one that reads well."""
    from imagenet_jax.errors import ConfigError

    first_config_error = None
    cause = error.__context__
    while cause is not None:
        if isinstance(cause, ConfigError):
            first_config_error = cause
        cause = cause.__context__
    if first_config_error is not None:
        return f"config: {first_config_error}"
    return str(error).replace("\n", " ")


def _default_workdir(config_argument: str) -> str:
    """runs/<config file name>, or runs/<name>_<ARG> for FILE:ARG, so that the variants of
    one parameterised config (configs/resnet.py:resnet101) do not share a workdir."""
    path, _, argument = config_argument.partition(":")
    name = Path(path).stem
    if argument:
        name += "_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in argument)
    return str(Path("runs") / name)


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


def _join_job() -> None:
    """jax.distributed set-up from the flags; before anything touches a device."""
    from imagenet_jax.errors import JobUnavailable
    from imagenet_jax.parallel import distributed

    spec = distributed.JobSpec(
        coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id, initialization_timeout_s=FLAGS.distributed_timeout_s,
        heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)
    try:
        distributed.initialize(spec)
    except JobUnavailable as e:
        print(f"imagenet-jax: error: {e}", file=sys.stderr)
        sys.exit(EXIT_NO_JOB)


def _verbose() -> bool:
    """--verbosity (-v) given: every log line on the console, as absl prints them."""
    return FLAGS["verbosity"].present


def _log_to_file(command: str) -> Path | None:
    """Unless --verbosity is given, the console shows warnings, errors and the progress
    lines only, and every log line goes to TMPDIR/imagenet_jax_logs/COMMAND.HOST.PID.log
    (`_keep_log` copies it into the run once the run has trained). Returns the file."""
    if _verbose():
        return None
    folder = Path(tempfile.gettempdir()) / "imagenet_jax_logs"
    path = folder / f"{command}.{socket.gethostname()}.{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = std_logging.FileHandler(path)
    except OSError:
        return None
    handler.setFormatter(logging.PythonFormatter())
    handler.addFilter(_QuietCheckpointLibrary())
    std_logging.getLogger().addHandler(handler)
    logging.get_absl_handler().setLevel(std_logging.WARNING)
    return path


def _keep_log(log_file: Path | None, workdir: str) -> None:
    """The log joins the run, as WORKDIR/logs/NAME, once the run has trained (finished,
    preempted or stopped on a non-finite step). A run refused before (a bad config,
    another run's checkpoint) leaves the workdir exactly as it was, its log in TMPDIR."""
    if log_file is None:
        return
    from imagenet_jax import run_dir, storage

    try:
        for handler in std_logging.getLogger().handlers:
            handler.flush()
        target = run_dir.logs(workdir) / log_file.name
        if not storage.is_url(workdir):
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(log_file.read_text(errors="replace"))
    except Exception as e:  # noqa: BLE001 - the run's outcome matters more than its log
        logging.warning("Could not copy the log %s into %s: %s", log_file, workdir, e)


@contextlib.contextmanager
def _native_stderr_to(path: Path | None) -> Iterator[None]:
    """Sends what native code writes to stderr (TensorFlow's start-up lines: oneDNN, absl's
    'All log messages before absl::InitializeLog()') to `path` while the block runs."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as target:
        os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def train(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --config.FIELD=VALUE")
    config = FLAGS.config
    workdir = FLAGS.workdir or _default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    log_file = _log_to_file("train")
    _join_job()
    import jax

    _use_compilation_cache()

    from imagenet_jax import errors, models
    from imagenet_jax.config import validate
    from imagenet_jax.console import Console
    from imagenet_jax.errors import ConfigError, StorageUnavailable

    if log_file:  # every process says where its log is
        print(f"Log: {log_file} (copied into {workdir}/logs/ once the run trains; "
              "--verbosity=0 prints it here instead)", flush=True)
    console = Console() if jax.process_index() == 0 else Console.silent()
    began = time.monotonic()
    try:
        # Before importing the loop (and with it TensorFlow, 2-3 s): a config mistake is
        # reported in about a second.
        validate(config, model_names=models.names(), num_devices=jax.device_count(),
                 num_processes=jax.process_count())
        with _native_stderr_to(log_file):
            import tensorflow  # noqa: F401 - loaded here, its start-up lines to the log
        from imagenet_jax.train.loop import train_and_evaluate

        result = train_and_evaluate(config, workdir, console=console)
    except ConfigError as e:
        _fail(f"config: {e}")
    except errors.NonFiniteError as e:
        print(f"imagenet-jax: error: {e}", file=sys.stderr)
        _keep_log(log_file, workdir)
        sys.exit(errors.ExitStatus.NONFINITE)
    except errors.Preempted as e:
        print(f"imagenet-jax: {e}", file=sys.stderr)
        _keep_log(log_file, workdir)
        sys.exit(errors.ExitStatus.PREEMPTED)
    except StorageUnavailable as e:
        print(f"imagenet-jax: error: {e}", file=sys.stderr)
        sys.exit(EXIT_STORAGE)
    _keep_log(log_file, workdir)
    if result:
        console.finish(result, workdir, time.monotonic() - began)


def evaluate(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; usage: imagenet-jax eval --workdir=DIR "
              "[--step=N] [--eval=SPEC,...] [--config.FIELD=VALUE ...] [--json]")
    if not FLAGS.workdir:
        _fail("eval needs --workdir=DIR, the run to evaluate")
    if any(arg == "--config" or arg.startswith("--config=") for arg in sys.argv):
        _fail("eval uses the run's own config (DIR/config.json); change a field with "
              "--config.FIELD=VALUE instead of --config=FILE")
    log_file = _log_to_file("eval")  # (never copied: eval changes nothing in the run)
    _join_job()
    import jax

    _use_compilation_cache()
    with _native_stderr_to(log_file):
        import tensorflow  # noqa: F401 - loaded here, its start-up lines to the log
    from imagenet_jax.errors import ConfigError, StorageUnavailable
    from imagenet_jax.evaluation import report
    from imagenet_jax.evaluation.run import evaluate_run

    try:
        result = evaluate_run(FLAGS.workdir, FLAGS.eval or (), step=FLAGS.step,
                              overrides=_config_overrides(sys.argv))
    except ConfigError as e:
        _fail(str(e))
    except StorageUnavailable as e:
        print(f"imagenet-jax: error: {e}", file=sys.stderr)
        sys.exit(EXIT_STORAGE)
    if jax.process_index() == 0:
        print(json.dumps(report.json_safe(result)) if FLAGS.json else report.format_table(result))


def import_weights(argv: list[str]) -> None:
    if len(argv) > 1 or not (FLAGS.model and FLAGS.weights and FLAGS.workdir):
        _fail("usage: imagenet-jax import --model=NAME --weights=FILE --workdir=DIR "
              "[--config=FILE] [--config.FIELD=VALUE ...]")
    _join_job()
    from imagenet_jax import models
    from imagenet_jax.config import base_config, set_field
    from imagenet_jax.errors import ConfigError
    from imagenet_jax.weights import WeightsError, import_to_workdir

    explicit = any(a == "--config" or a.startswith("--config=") for a in sys.argv)
    config = FLAGS.config if explicit else base_config()
    overrides = _config_overrides(sys.argv)
    try:
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
    except (ConfigError, WeightsError, ValueError) as e:
        _fail(str(e))
    print(f"Imported {result['model']} ({result['num_classes']} classes) into "
          f"{result['workdir']} as step 0.")


def export_weights(argv: list[str]) -> None:
    if len(argv) > 1 or not (FLAGS.workdir and FLAGS.out):
        _fail("usage: imagenet-jax export --workdir=DIR --out=FILE.safetensors [--step=N]")
    _join_job()
    from imagenet_jax.errors import ConfigError
    from imagenet_jax.weights import WeightsError, export_from_workdir

    try:
        result = export_from_workdir(FLAGS.workdir, FLAGS.out, step=FLAGS.step)
    except (ConfigError, WeightsError) as e:
        _fail(str(e))
    print(f"Exported step {result['step']} of {FLAGS.workdir} ({result['model']}) to "
          f"{result['out']}.")


def predict(argv: list[str]) -> None:
    images = argv[1:]
    if not images or not FLAGS.workdir:
        _fail("usage: imagenet-jax predict --workdir=DIR IMAGE [IMAGE ...] [--top=5] [--json]")
    _join_job()
    import jax

    _use_compilation_cache()
    from imagenet_jax.errors import ConfigError
    from imagenet_jax.predict import predict_files

    try:
        result = predict_files(FLAGS.workdir, images, top=FLAGS.top, step=FLAGS.step,
                               overrides=_config_overrides(sys.argv))
    except ConfigError as e:
        _fail(str(e))
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
        sys.exit(1)


def plot(argv: list[str]) -> None:
    workdirs = argv[1:]
    if not workdirs:
        _fail("usage: imagenet-jax plot WORKDIR [WORKDIR ...] [--out=FILE.png]")
    from imagenet_jax import run_dir
    from imagenet_jax.plot import plot_runs

    out = FLAGS.out or str(run_dir.curves(workdirs[0]))
    try:
        result = plot_runs(workdirs, out)
    except ValueError as e:
        _fail(str(e))
    runs = ", ".join(f"{name} ({count} records)" for name, count in result["runs"].items())
    print(f"Wrote {result['out']}: {runs}")


def _config_overrides(argv: list[str]) -> dict:
    """{'FIELD': value} for each --config.FIELD=VALUE given, typed as config_flags parsed it."""
    names = [arg[len("--config."):].partition("=")[0] for arg in argv
             if arg.startswith("--config.")]
    overrides = {}
    for name in names:
        value = FLAGS.config
        for part in name.split("."):
            value = value[part]
        overrides[name] = value
    return overrides


def list_models(argv: list[str]) -> None:
    from imagenet_jax.models import summary

    rows = summary.describe_all()
    if FLAGS.json:
        print(json.dumps(rows))
        return
    print(f"{'name':<20} {'params':>14} {'GMACs':>8} {'resolution':>10}")
    for row in rows:
        print(f"{row['name']:<20} {row['params']:>14,} {row['gmacs']:>8.3f} "
              f"{row['resolution']:>10}")


BENCHMARKS = ("train", "input", "scaling")


def bench(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        _fail(f"bench takes one benchmark, got {argv[1:]}; valid benchmarks: "
              f"{', '.join(BENCHMARKS)}")
    _join_job()
    import jax

    _use_compilation_cache(fresh=argv[1] == "train")
    from imagenet_jax.bench.train import bench_train, format_table
    from imagenet_jax.errors import ConfigError

    try:
        if argv[1] == "input":
            from imagenet_jax.bench.input import bench_input

            result = bench_input(FLAGS.config, batches=FLAGS.steps, repeats=FLAGS.repeats)
        elif argv[1] == "scaling":
            _bench_scaling()
            return
        else:
            result = bench_train(FLAGS.config, mode=FLAGS.mode,
                                 warmup_steps=FLAGS.warmup_steps, steps=FLAGS.steps)
    except ConfigError as e:
        _fail(f"config: {e}")
    if jax.process_index() == 0:
        print(json.dumps(result) if FLAGS.json else format_table(result))


def _bench_scaling() -> None:
    """`bench scaling`: its own table; ConfigError propagates to bench's handler."""
    import jax

    from imagenet_jax.bench.scaling import bench_scaling, format_scaling_table

    try:
        counts = None if FLAGS.device_counts is None else [int(n) for n in FLAGS.device_counts]
    except ValueError:
        _fail(f"--device_counts must be integers, got {','.join(FLAGS.device_counts)}")
    result = bench_scaling(FLAGS.config, device_counts=counts, steps=FLAGS.steps,
                           warmup_steps=FLAGS.warmup_steps)
    if jax.process_index() == 0:
        print(json.dumps(result) if FLAGS.json else format_scaling_table(result))


def prepare(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; usage: imagenet-jax prepare "
              "--manual_dir=DIR [--data_dir=DIR] [--allow_partial] [--max_size=N], or "
              "--folder=DIR --out=NEW_DIR --max_size=N")
    from imagenet_jax.data.downscale import Store, copy_folder

    store = None
    if FLAGS.max_size is not None or FLAGS["quality"].present:
        if FLAGS.max_size is None:
            _fail("--quality is the JPEG quality of downscaled images: give --max_size=N too")
        try:
            store = Store(FLAGS.max_size, FLAGS.quality)
        except ValueError as e:
            _fail(str(e))
    if FLAGS.folder:
        if FLAGS.manual_dir or FLAGS.data_dir or FLAGS.allow_partial:
            _fail("--folder copies an image folder; --manual_dir, --data_dir and "
                  "--allow_partial prepare ImageNet for TFDS: give one or the other")
        if not FLAGS.out or store is None:
            _fail("prepare --folder=DIR needs --out=NEW_DIR and --max_size=N")
        try:
            count = copy_folder(FLAGS.folder, FLAGS.out, store)
        except (FileNotFoundError, FileExistsError) as e:
            _fail(str(e))
        print(f"{FLAGS.out}: {count:,} images from {FLAGS.folder} ({store.describe()})")
        return
    if FLAGS.out:
        _fail("--out is the new folder of `prepare --folder`; TFDS writes to --data_dir")
    if not FLAGS.manual_dir:
        _fail("prepare needs --manual_dir=DIR, the folder holding ILSVRC2012_img_train.tar "
              "and ILSVRC2012_img_val.tar (or --folder=DIR to copy an image folder)")
    from imagenet_jax.data.prepare import PrepareError, prepare_imagenet2012

    try:
        counts = prepare_imagenet2012(FLAGS.manual_dir, FLAGS.data_dir,
                                      allow_partial=FLAGS.allow_partial, store=store)
    except PrepareError as e:
        _fail(str(e))
    how = f" ({store.describe()})" if store else ""
    print(f"imagenet2012 prepared{how}: "
          + ", ".join(f"{split} {n:,}" for split, n in counts.items()))


DATA_SERVICE_ROLES = ("dispatcher", "worker")


def data_service(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in DATA_SERVICE_ROLES:
        _fail(f"data-service takes one role, got {argv[1:]}; valid roles: "
              f"{', '.join(DATA_SERVICE_ROLES)}")
    from imagenet_jax.data import service

    if argv[1] == "dispatcher":
        if FLAGS.port is None:
            _fail("data-service dispatcher needs --port=P, the port workers and runs reach it on")
        service.serve_dispatcher(FLAGS.port, FLAGS.work_dir or "")
        return
    if not FLAGS.dispatcher or ":" not in FLAGS.dispatcher:
        _fail(f"data-service worker needs --dispatcher=HOST:PORT, got {FLAGS.dispatcher!r}")
    if FLAGS.cpus:  # before TensorFlow sizes its thread pools
        try:
            os.sched_setaffinity(0, {int(cpu) for cpu in FLAGS.cpus})
        except (ValueError, OSError) as e:
            _fail(f"data-service worker --cpus={','.join(FLAGS.cpus)}: {e}")
    service.serve_worker(FLAGS.dispatcher, FLAGS.port or 0, FLAGS.worker_host or "",
                         FLAGS.exit_with_parent)


COMMANDS = {"train": train, "eval": evaluate, "predict": predict, "import": import_weights,
            "export": export_weights, "plot": plot, "models": list_models, "bench": bench,
            "prepare": prepare, "data-service": data_service}

_JOB = ("coordinator_address", "num_processes", "process_id", "distributed_timeout_s",
        "heartbeat_timeout_s", "compilation_cache_dir")
# The flags of each command ("config.*": --config.FIELD=VALUE overrides); absl's own
# (--verbosity, ...) are everyone's.
COMMAND_FLAGS = {
    "train": ("config", "config.*", "workdir", *_JOB),
    "eval": ("workdir", "step", "eval", "json", "config.*", *_JOB),
    "predict": ("workdir", "step", "top", "json", "config.*", *_JOB),
    "import": ("model", "weights", "workdir", "config", "config.*", *_JOB),
    "export": ("workdir", "out", "step", *_JOB),
    "plot": ("out",),
    "models": ("json",),
    "bench": ("config", "config.*", "mode", "steps", "warmup_steps", "repeats",
              "device_counts", "json", *_JOB),
    "prepare": ("manual_dir", "data_dir", "allow_partial", "max_size", "quality", "folder",
                "out"),
    "data-service": ("port", "work_dir", "dispatcher", "worker_host", "cpus",
                     "exit_with_parent"),
}


def _takes(command: str, flag: str) -> bool:
    allowed = COMMAND_FLAGS[command]
    return flag in allowed or (flag.startswith("config.") and "config.*" in allowed)


def _check_flags_belong(command: str) -> None:
    """A flag given to a command that does not take it is an error naming who takes it
    (`train --steps=5`: steps is bench's), not a flag silently ignored."""
    for name in FLAGS:
        flag = FLAGS[name]
        if not flag.present or name != flag.name or not _is_imagenet_jax_flag(name):
            continue  # (absl's own flags, and short names, which alias a full one)
        if not _takes(command, name):
            owners = [c for c in COMMAND_FLAGS if _takes(c, name)]
            _fail(f"{command} takes no --{name}; it is a flag of {', '.join(owners)}. "
                  f"`imagenet-jax {command} --help` lists {command}'s flags")


def _command_help(command: str) -> str:
    """The command's paragraph of the module docstring and its flags, only its own."""
    paragraphs, current = {}, None
    for line in __doc__.splitlines():
        if line.startswith("  imagenet-jax "):
            word = line.split()[1].strip("[]")
            current = word if word in COMMANDS else None
            paragraphs.setdefault(current, [])
        elif not line.startswith("  "):
            current = None
        if current:
            paragraphs[current].append(line)
    lines = [*paragraphs.get(command, []), "", "Flags:"]
    for name in COMMAND_FLAGS[command]:
        if name == "config.*":
            lines.append("  --config.FIELD=VALUE: any field of the config "
                         "(imagenet_jax/config.py lists them), e.g. --config.num_epochs=30")
            continue
        flag = FLAGS[name]
        lines.append(f"  --{name}: {flag.help} (default: {flag.default_as_str or 'none'})")
    lines.append("  --verbosity (-v): every log line on the console, not only in the log file")
    return "\n".join(lines)


def _is_imagenet_jax_flag(name: str) -> bool:
    return name.startswith("config.") or any(name in flags for flags in COMMAND_FLAGS.values())


class _QuietCheckpointLibrary(std_logging.Filter):
    """Orbax logs several INFO lines per save; keep its warnings and errors only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def run() -> None:
    """Console entry point: `imagenet-jax COMMAND [flags]`, COMMAND defaulting to train."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data.
    from imagenet_jax.data import allocator

    allocator.keep_freed_memory()  # while this is the process's only thread (mallopt(3))
    from imagenet_jax import storage

    storage.configure()  # before any storage client is loaded
    args = sys.argv[1:]
    command = "train"
    explicit_command = bool(args) and not args[0].startswith("-")
    if explicit_command:
        command, args = args[0], args[1:]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
    try:
        _define_flags()
    except (KeyError, AttributeError) as e:
        from imagenet_jax.config import base_config

        field = str(e).strip("\"'")
        _fail(f"config: unknown field {field!r}; valid fields: {', '.join(sorted(base_config()))}")
    except (ValueError, flags.Error) as e:
        _fail(f"config: {e}".replace("\n", " "))
    if "--help" in args or "-h" in args:
        print(_command_help(command) if explicit_command else __doc__)
        sys.exit(0)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietCheckpointLibrary())

    def main(argv: list[str]) -> None:
        _check_flags_belong(command)
        COMMANDS[command](argv)

    app.run(main, argv=[f"imagenet-jax {command}", *args], flags_parser=_parse_flags)
