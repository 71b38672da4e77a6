"""Where the run's files live: local paths and Cloud Storage (`gs://...`) through one API.

Everything the run writes or lists (checkpoints, `metrics.jsonl`, `config.json`, folder
datasets) goes through `etils.epath`. For `gs://` that is gcsfs (fsspec), not
TensorFlow's GCS client: gcsfs, Orbax's TensorStore and google-cloud-storage can all be
pointed at a Cloud Storage emulator, while TensorFlow's client has its endpoint compiled
in. So one client serves production and the local rehearsal alike.

`configure()` maps the Cloud convention `STORAGE_EMULATOR_HOST=http://HOST:PORT` onto
what each library reads; it runs before any path is touched (the CLI and
`train_and_evaluate` call it).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from absl import logging
from etils import epath
from etils.epath import gpath

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_T = TypeVar("_T")


def configure() -> None:
    """Routes epath's gs:// through gcsfs and, with an emulator, every client to it."""
    os.environ["EPATH_USE_TF"] = "false"
    # epath caches its TensorFlow check at the first gs:// path (TFDS touches one when it
    # looks for datasets on GCS): forget it, so the setting holds whoever came first.
    cached = getattr(gpath, "_is_tf_installed", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()
    import fsspec.config

    # Listings must show what other processes and TensorStore (not gcsfs) wrote: gcsfs
    # would otherwise keep a folder's first listing for the life of the process.
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
    host = emulator_host()
    if host:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)  # Orbax's array data
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore: no auth
        # gcsfs finds the emulator by itself; it needs no credentials, and not its bucket-type
        # probe (a gRPC API that emulators lack, retried for minutes). Read at its import.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        fsspec.config.conf.setdefault("gs", {}).setdefault("token", "anon")


def emulator_host() -> str | None:
    """The emulator's URL (`http://127.0.0.1:PORT`) when STORAGE_EMULATOR_HOST is set."""
    host = os.environ.get(EMULATOR_ENV, "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def supports_conditional_writes(path: str | os.PathLike) -> bool:
    """Whether TensorStore can write at `path` with generation preconditions, as Orbax's
    OCDBT checkpoint layout needs: everywhere but an emulator, which neither reports
    objects' generations (x-goog-generation) nor enforces ifGenerationMatch."""
    return not (is_url(path) and emulator_host())


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a gs:// URL as is, a local path made absolute."""
    if is_url(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_atomically(path: epath.Path, text: str) -> None:
    """Replaces `path` with `text` all at once: a reader (or a run killed mid-write) sees
    the old file or the new one, never part of either. An object store's upload is
    already all-or-nothing; a local file is written beside and renamed over."""
    if is_url(path):
        path.write_text(text)
        return
    partial = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial"
    partial.write_text(text)
    partial.replace(path)


def retry(fn: Callable[[], _T], *, attempts: int, delay_s: float, what: str,
          retry_on: tuple[type[BaseException], ...] = (Exception,)) -> _T:
    """`fn()`, tried up to `attempts` times with exponential backoff from `delay_s`; the
    last failure propagates."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on as e:
            if attempt == attempts:
                raise
            wait = delay_s * 2 ** (attempt - 1)
            logging.warning("%s failed (attempt %d of %d, retrying in %.1f s): %s: %s", what,
                            attempt, attempts, wait, type(e).__name__, str(e)[:200])
            time.sleep(wait)
    raise AssertionError("unreachable")


def _gcs():
    import fsspec  # gcsfs registers "gs"; only runs that use gs:// need it loaded

    return fsspec.filesystem("gs")


def read_many(paths: list[str]) -> list[bytes]:
    """The bytes of each object, fetched concurrently (one round trip of latency for the
    whole list, not one per file); a missing or unreadable object raises."""
    if not paths:
        return []
    contents = _gcs().cat(paths, on_error="raise")
    return [contents[p] if p in contents else contents[p.removeprefix("gs://")] for p in paths]


def find_files(root: str) -> list[str]:
    """Every object under the gs:// folder `root`, as paths relative to it, sorted: one
    paginated listing, not one request per folder."""
    fs = _gcs()
    prefix = root.removeprefix("gs://").rstrip("/") + "/"
    return sorted(p.removeprefix("gs://").removeprefix(prefix)
                  for p in fs.find(root, withdirs=False))
