"""A run's directory (its workdir): where its files are, and config.json and
metrics.jsonl written and read. Nothing else names a file of a workdir.

    WORKDIR/                 a local path or gs://BUCKET/PATH
      config.json            the config, what was derived from it, the model's classes
      metrics.jsonl          one JSON record per log, evaluation, target and goodput
                             (metric_writers), every attempt's
      checkpoints/           Orbax steps (checkpoint.Checkpointer)
      logs/                  each command's log file, copied in once the run has trained
      eval/                  `imagenet-jax eval`'s results and diagrams
      profile/               profiler traces (config.profile_start_step)
      curves.png             `imagenet-jax plot`'s default picture
      events.out.tfevents.*  TensorBoard (CLU's writer)

Only process 0 writes config.json and metrics.jsonl. Both are replaced whole, never
appended to (object stores have no append): a reader sees the old file or the new one.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from collections.abc import Sequence

import jax
import ml_collections
from etils import epath

from imagenet_jax import storage
from imagenet_jax.errors import ConfigError

CONFIG = "config.json"
METRICS = "metrics.jsonl"


def path(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as a path (a gs:// URL stays one)."""
    return storage.as_path(workdir)


def checkpoints(workdir: str | os.PathLike) -> epath.Path:
    return path(workdir) / "checkpoints"


def logs(workdir: str | os.PathLike) -> epath.Path:
    return path(workdir) / "logs"


def eval_results(workdir: str | os.PathLike) -> epath.Path:
    return path(workdir) / "eval"


def profile(workdir: str | os.PathLike) -> epath.Path:
    return path(workdir) / "profile"


def curves(workdir: str | os.PathLike) -> epath.Path:
    return path(workdir) / "curves.png"


def metrics(workdir: str | os.PathLike) -> epath.Path:
    return path(workdir) / METRICS


def check_writable(workdir: str | os.PathLike) -> None:
    """Fails at start, not at the first save, when the workdir cannot be written: a local
    folder, or a gs:// URL (a missing bucket, no credentials, no permission). Creates
    nothing: a local workdir not made yet is checked at its nearest existing folder."""
    workdir = path(workdir)
    if storage.is_url(workdir) and not str(workdir).startswith("gs://"):
        raise ConfigError(f"workdir {workdir}: the URLs supported are gs://BUCKET/PATH "
                          "(Cloud Storage) and local paths")
    try:
        nearest = workdir
        if not storage.is_url(workdir):  # (a bucket has no folders to look for)
            while not nearest.exists():
                nearest = nearest.parent
            if not nearest.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        probe = nearest / f".write_test.{workdir.name}.{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - OSError locally; any client error for gs://
        reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {str(e)[:200]}"
        raise ConfigError(f"workdir {workdir} is not writable: {reason}") from None


def create(workdir: str | os.PathLike) -> None:
    """Makes a local workdir's folder, once `check_writable` has passed (a bucket has no
    folders; gcsfs would create one)."""
    if not storage.is_url(workdir):
        path(workdir).mkdir(parents=True, exist_ok=True)


@dataclasses.dataclass(frozen=True)
class SavedConfig:
    """What config.json holds. `derived` is None where nothing was derived from a dataset
    (weights imported without one): the run's sizes are then unknown, not guessed."""

    config: dict                    # the config's fields, as JSON
    class_names: tuple[str, ...]    # the model's classes, in output order; () if unknown
    derived: dict | None = None     # config.Derived's fields


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                 class_names: Sequence[str], derived=None) -> None:
    """WORKDIR/config.json: `config`, the model's classes in output order (what `eval`
    needs without the training set) and `derived` (a config.Derived) if there is one."""
    saved = {"config": json.loads(config.to_json_best_effort()),
             "class_names": list(class_names)}
    if derived is not None:
        saved["derived"] = dataclasses.asdict(derived)
    storage.write_atomically(path(workdir) / CONFIG, json.dumps(saved, indent=2) + "\n")


def read_config(workdir: str | os.PathLike) -> SavedConfig:
    """WORKDIR/config.json; ConfigError for a workdir that holds no run."""
    file = path(workdir) / CONFIG
    try:
        saved = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{workdir} holds no run: {file} does not exist (train into it "
                          "first, or give the --workdir of a run)") from None
    return SavedConfig(saved["config"], tuple(saved.get("class_names") or ()),
                       saved.get("derived"))


def read_records(workdir: str | os.PathLike, *, every_attempt: bool = False) -> list[dict]:
    """The records of metrics.jsonl, oldest first; [] before the first. By default the
    run's history as kept (`kept_records`); `every_attempt`: every record of every attempt,
    those a resumed run did again included."""
    file = metrics(workdir)
    if not file.exists():
        return []
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return records if every_attempt else kept_records(records)


def kept_records(records: Sequence[dict]) -> list[dict]:
    """The records of the run's kept history: each (step, split) once. metrics.jsonl keeps
    every attempt's records (each carries its "attempt"; an attempt's first record says
    the step it "resumed_from"); an attempt's records past the step a later attempt
    resumed from were done again, and are left out, and of an attempt's records of one
    step and split (a goodput record, then the attempt's last) the last is kept. Records
    of before attempts were numbered count as attempt 0."""
    resumed_from: dict[int, int] = {}
    for record in records:
        resumed_from.setdefault(record.get("attempt", 0), record.get("resumed_from", 0))
    superseded_past, horizon = {}, math.inf  # attempt -> the smallest later resume step
    for attempt in sorted(resumed_from, reverse=True):
        superseded_past[attempt] = horizon
        horizon = min(horizon, resumed_from[attempt])
    kept, seen = [], set()
    for record in reversed(records):
        key = (record.get("attempt", 0), record["step"], record["split"])
        if record["step"] <= superseded_past[key[0]] and key not in seen:
            seen.add(key)
            kept.append(record)
    return kept[::-1]
