"""The `imagenet-jax` command: flags and subcommands only; each calls one library function.

  imagenet-jax [train] [--config=configs/NAME.py] [--workdir=DIR] [--config.FIELD=VALUE ...]
      Train and evaluate; with no flags, the demo config into runs/demo. Any config field
      can be overridden, e.g. --config.model=resnet18 --config.num_epochs=30. Re-running
      on a workdir resumes from its latest checkpoint.
  imagenet-jax models [--json]
      The registered models with their parameter counts and native resolutions.

A bad config or flag prints one line saying what is wrong and what is valid, and
exits with status 2 before anything runs.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
EXIT_BAD_CONFIG = 2

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
        "config go here; re-running on it resumes. Default: runs/<config file name>.")
    flags.DEFINE_bool("json", False, "models: print JSON instead of a table.")


def _fail(message: str) -> None:
    print(f"imagenet-jax: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_CONFIG)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).replace("\n", " "))
    return []


def train(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --config.FIELD=VALUE")
    import jax

    from imagenet_jax import models
    from imagenet_jax.config import ConfigError, validate
    from imagenet_jax.train.loop import train_and_evaluate

    config = FLAGS.config
    config_file = Path(config_flags.get_config_filename(FLAGS["config"]))
    workdir = FLAGS.workdir or str(Path("runs") / config_file.stem)
    try:
        validate(config, model_names=models.names(), num_devices=jax.device_count(),
                 num_processes=jax.process_count())
        result = train_and_evaluate(config, workdir)
    except ConfigError as e:
        _fail(f"config: {e}")
    if jax.process_index() == 0 and result:
        print(f"Final validation at step {result['step']}: top-1 {result['top1']:.4f}, "
              f"top-5 {result['top5']:.4f}, loss {result['loss']:.4f} "
              f"({result['num_examples']} examples). Workdir: {workdir}")


def list_models(argv: list[str]) -> None:
    from imagenet_jax.models import summary

    rows = summary.describe_all()
    if FLAGS.json:
        print(json.dumps(rows))
        return
    print(f"{'name':<20} {'params':>14} {'resolution':>10}")
    for row in rows:
        print(f"{row['name']:<20} {row['params']:>14,} {row['resolution']:>10}")


COMMANDS = {"train": train, "models": list_models}


class _QuietCheckpointLibrary(std_logging.Filter):
    """Orbax logs several INFO lines per save; keep its warnings and errors only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def run() -> None:
    """Console entry point: `imagenet-jax COMMAND [flags]`, COMMAND defaulting to train."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data.
    args = sys.argv[1:]
    command = "train"
    if args and not args[0].startswith("-"):
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
        print(__doc__)
        print(FLAGS.module_help(sys.modules[__name__]))
        sys.exit(0)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietCheckpointLibrary())
    app.run(COMMANDS[command], argv=[f"imagenet-jax {command}", *args], flags_parser=_parse_flags)
