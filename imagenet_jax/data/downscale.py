"""Smaller stores: copies of a dataset whose images are at most N pixels on their longer side.

Decoding a JPEG costs about its pixel count, and ImageNet's average training image
(about 400x350, often 500x375) has several times the pixels of a 224-px crop, so a
store downscaled once makes every epoch's decode cheaper, as FFCV's ImageNet stores
are (at most 400-500 px for its ResNet results). What it trades: the store's
resolution is a ceiling (a random-resized crop of a 256-px image is upsampled to 224
more often, and evaluation's resize to 256 upsamples a shorter side under 256), and
JPEG is encoded a second time. `prepare_imagenet2012(..., store=Store(N))` writes such
a copy of ImageNet for TFDS; `copy_folder` of an image folder.

An image already within N is kept byte for byte; one that cannot be decoded is kept as
it is too (training skips it and counts it, like any unreadable file).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TypeVar

from absl import logging
from PIL import Image

T = TypeVar("T")
U = TypeVar("U")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass(frozen=True)
class Store:
    """How a store's images are written: longer side at most `max_size`, JPEG `quality`."""

    max_size: int
    quality: int = 90

    def __post_init__(self):
        if self.max_size < 32:
            raise ValueError(f"max_size must be at least 32 pixels; got {self.max_size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100]; got {self.quality}")

    def describe(self) -> str:
        return f"max_size={self.max_size},quality={self.quality}"

    def downscale(self, data: bytes) -> bytes:
        """The image in `data` as a JPEG with its longer side at most `max_size` (its aspect
        ratio kept, to the pixel); `data` itself when it is within already or unreadable."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                if max(image.size) <= self.max_size:
                    return data
                # PIL's thumbnail: JPEG's DCT scaling down to no less than twice the target,
                # then a Lanczos filter: full quality at a fraction of a full decode.
                image.thumbnail((self.max_size, self.max_size), Image.Resampling.LANCZOS)
                if image.mode not in ("RGB", "L"):
                    image = image.convert("RGB")
                out = io.BytesIO()
                image.save(out, format="JPEG", quality=self.quality)
                return out.getvalue()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            logging.warning("Kept an image as it is: it could not be decoded (%s)", e)
            return data


def parallel_map(fn: Callable[[T], U], items: Iterable[T], workers: int | None = None
                 ) -> Iterator[U]:
    """fn over `items` in threads, results in order, at most 4 per worker in flight.
    PIL releases the GIL while it decodes, resizes and encodes, so threads scale."""
    workers = workers or os.cpu_count() or 1
    with futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def copy_folder(source: str | os.PathLike, destination: str | os.PathLike, store: Store,
                workers: int | None = None) -> int:
    """Copies the image folder `source` (any layout: `train/<class>/*.JPEG`, ...) to
    `destination` with its images downscaled; other files are copied as they are.
    Returns the number of images. The destination must not exist: nothing is overwritten.
    """
    source, destination = Path(source).expanduser(), Path(destination).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder")
    if destination.exists():
        raise FileExistsError(f"{destination} exists; choose a new folder for the copy")
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    for path in files:
        (partial / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            shutil.copy2(path, partial / path.relative_to(source))

    def write(path: Path) -> None:
        # The name is kept (ImageNet's .JPEG), whatever the original format was.
        (partial / path.relative_to(source)).write_bytes(store.downscale(path.read_bytes()))

    for done, _ in enumerate(parallel_map(write, images, workers), 1):
        if done % 10_000 == 0:
            logging.info("Downscaled %d of %d images", done, len(images))
    partial.rename(destination)  # whole or not at all
    return len(images)
