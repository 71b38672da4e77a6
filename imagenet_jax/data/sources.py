"""Datasets by name: where the examples of each split are and what their classes are.

`config.dataset` picks one:
  demo               the generated demo dataset (a folder in ImageNet's layout)
  folder:/path/root  any folder laid out as `root/<split>/<class>/<image>`, read
                     straight from the files (no preparation step)
  tfds:NAME          a prepared TensorFlow Datasets image-classification dataset in
                     `config.data_dir` (imagenet2012: `imagenet-jax prepare`)
  synthetic          random images made on the devices (data/synthetic.py)
The number of classes, their names and the split sizes always come from the source.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

from imagenet_jax.data import demo, synthetic
from imagenet_jax.data.spec import parse_dataset

SPLITS = ("train", "val")


class Source(Protocol):
    """What the pipelines need from a dataset: sizes, classes, and in-graph random access.

    Splits are named "train" and "val" whatever the dataset calls them. Examples are
    addressed by their index in [0, num_examples(split)); the pipelines decide the
    order, so any source gets the same deterministic, resumable, per-process reading.
    """

    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int: ...

    def num_examples(self, split: str) -> int: ...

    def read(self, split: str) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
        """In-graph: an integer scalar index (int32 or int64) -> (encoded image bytes, int32
        label), both scalars. A source may also offer `read_batch(split)`, the same on a
        vector of indices (see pipeline.batch_reader)."""
        ...

    def describe(self, split: str, index: int) -> str:
        """Where example `index` lives, for reports of unreadable images (a path when known)."""
        ...


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """Image files in `root/<split>/<class>/<file>`; labels index the sorted class folders."""

    root: Path
    class_names: tuple[str, ...]
    files: dict[str, np.ndarray]   # split -> file paths (str), sorted
    labels: dict[str, np.ndarray]  # split -> int32 labels, aligned with `files`

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_examples(self, split: str) -> int:
        return len(self.files[split])

    def read(self, split: str) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
        import tensorflow as tf  # with the first pipeline: listing files needs no TensorFlow

        paths = tf.constant(self.files[split])
        labels = tf.constant(self.labels[split])
        return lambda index: (tf.io.read_file(paths[index]), labels[index])

    def describe(self, split: str, index: int) -> str:
        return str(self.files[split][index])


def get_source(spec: str, data_dir: str | None = None) -> Source:
    """Opens the dataset named by `spec`, generating the demo dataset on first use.

    `data_dir` is TFDS's data directory (None: TFDS's default) for `tfds:` datasets.
    """
    kind, arg = parse_dataset(spec)
    if kind == "synthetic":
        return synthetic.parse_synthetic(arg)
    if kind == "tfds":
        from imagenet_jax.data import tfds_source  # TFDS is slow to import: only when used
        return tfds_source.open_tfds(arg, data_dir)
    root = demo.ensure_demo_dataset() if kind == "demo" else Path(arg).expanduser()
    return open_folder(root)


def open_folder(root: Path) -> FolderSource:
    """Lists every split of a folder dataset; class names come from the train split."""
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {root} has no train/ directory; expected "
                                "root/train/<class>/<image> and root/val/<class>/<image>")
    class_names = tuple(sorted(e.name for e in os.scandir(train_dir) if e.is_dir()))
    if not class_names:
        raise FileNotFoundError(f"{train_dir} has no class folders")
    files, labels = {}, {}
    for split in SPLITS:
        files[split], labels[split] = _list_split(root / split, class_names)
    return FolderSource(root, class_names, files, labels)


def _list_split(split_dir: Path, class_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"dataset split folder {split_dir} does not exist")
    extra = sorted({e.name for e in os.scandir(split_dir) if e.is_dir()} - set(class_names))
    if extra:
        raise ValueError(f"{split_dir} has class folders missing from train/: {extra[:5]}")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        names = sorted(e.name for e in os.scandir(class_dir) if e.is_file() or e.is_symlink())
        paths.extend(str(class_dir / n) for n in names)
        labels.extend([label] * len(names))
    if not paths:
        raise FileNotFoundError(f"dataset split folder {split_dir} holds no images")
    return np.asarray(paths), np.asarray(labels, np.int32)
