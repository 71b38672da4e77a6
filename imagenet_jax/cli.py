"""The `imagenet-jax` command line: a table of commands, and the parsing it drives.

Each row of COMMANDS is one command: its name, usage and help (user text, which `--help`
prints), the flags it takes, and the function in commands.py that runs it. Everything
else comes from the table: each command's help, the refusal of a flag a command does not
take, the list of valid commands. Every error ends the command in one place, `run`, with
the exit status errors.ExitStatus gives it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from imagenet_jax import commands, errors, logfiles
from imagenet_jax.errors import ConfigError, ExitStatus

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
FLAGS = flags.FLAGS
CONFIG_HELP = ("Config file (configs/NAME.py). Override any field with --config.FIELD=VALUE, "
               "e.g. --config.model=resnet18 --config.batch_size=512 "
               "--config.dataset=folder:/data/imagenet")
JOB = ("coordinator_address", "num_processes", "process_id", "distributed_timeout_s",
       "heartbeat_timeout_s", "compilation_cache_dir")


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    function: Callable[[list[str]], None]  # given the positional arguments
    usage: tuple[str, ...]  # each a way to call it, after "imagenet-jax "
    help: str
    flags: tuple[str, ...]  # "config.*": --config.FIELD=VALUE overrides; absl's are everyone's

    def takes(self, flag: str) -> bool:
        return flag in self.flags or (flag.startswith("config.") and "config.*" in self.flags)


COMMANDS = {command.name: command for command in (
    Command("train", commands.train,
            ("[train] [--config=configs/NAME.py] [--workdir=DIR] [--config.FIELD=VALUE ...]",),
            "Train and evaluate; with no flags, the demo config into runs/demo. Any config "
            "field can be overridden, e.g. --config.model=resnet18 --config.num_epochs=30. "
            "Re-running on a workdir resumes from its latest checkpoint.",
            ("config", "config.*", "workdir", *JOB)),
    Command("eval", commands.evaluate,
            ("eval --workdir=DIR [--step=N] [--eval=SPEC[,SPEC...]] [--config.FIELD=VALUE] "
             "[--json]",),
            "Evaluates a run's checkpoint (the latest, or --step) with the run's own model, "
            "resolution and crop (any field overridable) on each evaluation set (default: the "
            "run's dataset): 'demo', 'folder:/path', 'tfds:NAME' (e.g. imagenet2012, "
            "imagenet_v2/matched-frequency, imagenet2012_real), 'real:/path/real.json'. Top-1, "
            "top-5, NLL, calibration (ECE), per-class top-1, WordNet mistake severity; writes "
            "DIR/eval/STEP.json and a reliability diagram per set; --json prints the JSON. "
            "Reads the workdir's checkpoints only: nothing there is changed.",
            ("workdir", "step", "eval", "json", "config.*", *JOB)),
    Command("predict", commands.predict,
            ("predict --workdir=DIR IMAGE [IMAGE ...] [--top=5] [--step=N] [--json]",),
            "The top classes of each image, with probabilities and WordNet names, through the "
            "run's eval transform. An unreadable file is one line naming it; the others are "
            "still predicted, and the exit status is then 1.",
            ("workdir", "step", "top", "json", "config.*", *JOB)),
    Command("import", commands.import_weights,
            ("import --model=NAME --weights=FILE --workdir=DIR [--config=...] [--config.F=V]",),
            "Writes a step-0 checkpoint of model NAME with torchvision's weights (FILE: a state "
            "dict as .safetensors, or .pth/.pt when torch is installed) and its config into "
            "DIR: `train` on DIR fine-tunes from it, `eval` and `predict` read it. The config "
            "is --config's, else the ResNet-50 recipe's, at the model's native resolution.",
            ("model", "weights", "workdir", "config", "config.*", *JOB)),
    Command("export", commands.export_weights,
            ("export --workdir=DIR --out=FILE.safetensors [--step=N]",),
            "A run's checkpoint as a torchvision state dict: torchvision's load_state_dict "
            "takes it.",
            ("workdir", "out", "step", *JOB)),
    Command("plot", commands.plot, ("plot WORKDIR [WORKDIR ...] [--out=FILE.png]",),
            "Loss, top-1/top-5 (train and val) and the learning rate against steps, and loss "
            "and top-1 against time, of each run's metrics.jsonl, several runs overlaid with "
            "their names. Default --out: the first WORKDIR's curves.png.",
            ("out",)),
    Command("goodput", commands.goodput, ("goodput WORKDIR [WORKDIR ...] [--json]",),
            "Where each run's wall time went, all its attempts included: goodput (the share "
            "spent on training steps whose work was kept) and badput by cause (start-up, "
            "compilation, input wait, evaluation, checkpoint saves and restores, work lost "
            "to restarts, downtime between attempts, other), in seconds and %, from the "
            "run's metrics.jsonl. --json prints one JSON object.",
            ("json",)),
    Command("models", commands.list_models, ("models [--json]",),
            "The registered models: parameters (1000 classes), forward GMACs of one image at "
            "the native resolution, native resolution. --json prints a JSON list instead.",
            ("json",)),
    Command("bench", commands.bench,
            ("bench train [--mode=synthetic|pipeline] [--steps=20] [--warmup_steps=3] "
             "[--goodput] [--config=...] [--config.FIELD=VALUE ...] [--json]",
             "bench scaling [--device_counts=1,2,4,8] [--steps=20] [--warmup_steps=3] "
             "[--config=...] [--config.FIELD=VALUE ...] [--json]",
             "bench input [--steps=20] [--repeats=3] [--config=...] [--config.FIELD=...]"),
            "train: times the configured model's train step: compile time cold (a fresh "
            "compilation cache unless --compilation_cache_dir is given) and warm (a restarted "
            "run's, from that cache), step time (median, p10, p90), images/s, TFLOP/s from "
            "XLA's cost analysis, a dense-matmul rate measured in the same run and their ratio "
            "(MFU), peak memory. --mode=pipeline feeds the real input pipeline instead of one "
            "synthetic batch. --goodput steps through the train loop's time accounting, to "
            "measure its cost. --json prints one JSON object.\n"
            "scaling: times the train step, data parallel, on the first n devices for each "
            "count, at a fixed per-device batch: --config.batch_size is the global batch at the "
            "largest count. A table of devices, global batch, step time (median), images/s and "
            "efficiency against linear scaling; --json prints one JSON object with \"rows\".\n"
            "input: times the configured input pipeline alone on the first --steps global "
            "batches: images/s on the host and as global arrays on the devices, the eval "
            "pipeline, and two floors on the same files (read only; read and fully decode), each "
            "the median of --repeats passes after one warm-up pass; host memory. --json: one "
            "JSON object.",
            ("config", "config.*", "mode", "steps", "warmup_steps", "goodput", "repeats",
             "device_counts", "json", *JOB)),
    Command("prepare", commands.prepare,
            ("prepare --manual_dir=DIR [--data_dir=DIR] [--allow_partial] "
             "[--max_size=N [--quality=Q]]",
             "prepare --folder=DIR --out=NEW_DIR --max_size=N [--quality=Q]"),
            "Prepares ImageNet-2012 for TensorFlow Datasets (ArrayRecord files) from the "
            "official ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in --manual_dir "
            "(download them from image-net.org after registering), offline; hours for the full "
            "dataset. Split sizes other than 1,281,167 train and 50,000 validation images are "
            "an error unless --allow_partial. Already prepared: only checks the counts. "
            "--max_size=N writes the images downscaled to at most N pixels on their longer "
            "side (JPEG --quality, default 90), a smaller store that decodes faster, into its "
            "own --data_dir. With --folder, writes such a copy of an image folder to --out "
            "instead.",
            ("manual_dir", "data_dir", "allow_partial", "max_size", "quality", "folder", "out")),
    Command("data-service", commands.data_service,
            ("data-service dispatcher --port=P [--work_dir=DIR]",
             "data-service worker --dispatcher=HOST:P [--port=P] [--worker_host=NAME] "
             "[--cpus=0,1,...]"),
            "Runs a tf.data service server until killed, for --config.data_service=grpc://HOST:P: "
            "the dispatcher (with --work_dir, local or gs://, in fault-tolerant mode: its jobs "
            "survive a restart), or a worker that runs the input pipelines of the runs it "
            "serves (on CPU machines; clients reach it at --worker_host, default this host's "
            "name).",
            ("port", "work_dir", "dispatcher", "worker_host", "cpus", "exit_with_parent")),
)}

INTRO = ("Trains and evaluates image classifiers on ImageNet with JAX. COMMAND defaults to "
         "train; `imagenet-jax COMMAND --help` lists its flags.")
MULTI_PROCESS = ("Multi-process: one process per host, joined with --coordinator_address, "
                 "--num_processes and --process_id (launch/local.sh does this on one machine), "
                 "or automatically on a detected cluster.")
WIDTH = 92


def run() -> None:
    """Console entry point: `imagenet-jax COMMAND [flags]`, COMMAND defaulting to train."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data.
    from imagenet_jax.data import allocator

    allocator.keep_freed_memory()  # while this is the process's only thread (mallopt(3))
    from imagenet_jax import storage

    storage.configure()  # before any storage client is loaded
    try:
        _run_command(sys.argv[1:])
    except errors.Error as e:
        # Preempted is no failure: the run stopped as asked, and the same command resumes it.
        print(f"imagenet-jax: {'' if isinstance(e, errors.Preempted) else 'error: '}{e}",
              file=sys.stderr)
        sys.exit(e.exit_status)


def _run_command(args: list[str]) -> None:
    name, explicit = "train", bool(args) and not args[0].startswith("-")
    if explicit:
        name, args = args[0], args[1:]
    if name not in COMMANDS:
        raise ConfigError(f"unknown command {name!r}; valid commands: {', '.join(COMMANDS)}")
    command = COMMANDS[name]
    _define_flags()
    if "--help" in args or "-h" in args:
        print(command_help(command) if explicit else overview())
        sys.exit(ExitStatus.OK)
    logfiles.log_at_info()

    def main(argv: list[str]) -> None:
        _check_flags_belong(command)
        command.function(argv[1:])

    app.run(main, argv=[f"imagenet-jax {name}", *args], flags_parser=_parse_flags)


def _define_flags() -> None:
    """Defined on first use, not at import: config_flags reads --config.* overrides from
    sys.argv as soon as the flag exists, and a bad override must fail as a bad config."""
    try:
        config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), CONFIG_HELP,
                                        lock_config=True)
    except (KeyError, AttributeError) as e:
        from imagenet_jax.config import base_config

        field = str(e).strip("\"'")
        raise ConfigError(f"config: unknown field {field!r}; valid fields: "
                          f"{', '.join(sorted(base_config()))}") from None
    except (ValueError, flags.Error) as e:
        raise ConfigError(f"config: {e}".replace("\n", " ")) from None
    for name, (define, default, help_text) in commands.FLAG_DEFINITIONS.items():
        define(name, default, help_text)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, its errors as one line. A ConfigError raised by a config file's
    get_config (a bad ARCH in --config=FILE:ARCH) is reported as its own message:
    config_flags re-raises it with the traceback in the text, so the first one raised is
    the one that reads well."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        first_config_error, cause = None, error.__context__
        while cause is not None:
            if isinstance(cause, ConfigError):
                first_config_error = cause
            cause = cause.__context__
        if first_config_error is not None:
            raise ConfigError(f"config: {first_config_error}") from None
        raise ConfigError(str(error).replace("\n", " ")) from None


def _check_flags_belong(command: Command) -> None:
    """A flag given to a command that does not take it is an error naming who takes it
    (`train --steps=5`: steps is bench's), not a flag silently ignored."""
    for name in FLAGS:
        flag = FLAGS[name]
        ours = name == "config" or name.startswith("config.") or name in commands.FLAG_DEFINITIONS
        if not flag.present or name != flag.name or not ours:
            continue  # (absl's own flags, and short names, which alias a full one)
        if not command.takes(name):
            owners = [other.name for other in COMMANDS.values() if other.takes(name)]
            raise ConfigError(f"{command.name} takes no --{name}; it is a flag of "
                              f"{', '.join(owners)}. `imagenet-jax {command.name} --help` "
                              f"lists {command.name}'s flags")


def overview() -> str:
    """`imagenet-jax --help`: every command's usage and help, and the exit statuses."""
    statuses = [f"  {status.value:>3}  {status.meaning}" for status in ExitStatus]
    return "\n".join(["usage: imagenet-jax [COMMAND] [flags]", "", *_wrap(INTRO, ""), "",
                      *(line for command in COMMANDS.values() for line in _describe(command)),
                      "", "Exit status:", *statuses, "", *_wrap(MULTI_PROCESS, "")])


def command_help(command: Command) -> str:
    """`imagenet-jax COMMAND --help`: its usage, help and flags, only its own."""
    lines = [*_describe(command), "", "Flags:"]
    for name in command.flags:
        if name == "config.*":
            lines.append("  --config.FIELD=VALUE: any field of the config "
                         "(imagenet_jax/config.py lists them), e.g. --config.num_epochs=30")
            continue
        flag = FLAGS[name]
        lines.append(f"  --{name}: {flag.help} (default: {flag.default_as_str or 'none'})")
    lines.append("  --verbosity (-v): every log line on the console, not only in the log file")
    return "\n".join(lines)


def _describe(command: Command) -> list[str]:
    """The command's usage lines, each wrapped between its brackets, then its help."""
    lines = []
    for usage in command.usage:
        # A non-breaking space inside brackets keeps '[--config.FIELD=VALUE ...]' whole.
        unbroken = re.sub(r"\[[^\]]*\]", lambda m: m[0].replace(" ", "\xa0"), usage)
        command_words = itertools.takewhile(lambda word: word[0] not in "[-", usage.split())
        indent = " " * len(f"  imagenet-jax {' '.join(command_words)} ")
        lines += [line.replace("\xa0", " ") for line in _wrap(unbroken, indent, "  imagenet-jax ")]
    return lines + [line for paragraph in command.help.split("\n")
                    for line in _wrap(paragraph, " " * 6)]


def _wrap(text: str, indent: str, first_line_indent: str | None = None) -> list[str]:
    first_line_indent = indent if first_line_indent is None else first_line_indent
    return textwrap.wrap(text, WIDTH, initial_indent=first_line_indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)
