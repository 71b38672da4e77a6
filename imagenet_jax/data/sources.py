"""Datasets by name: where the examples of each split are and what their classes are.

`config.dataset` picks one:
  demo               the generated demo dataset (a folder in ImageNet's layout)
  demo_transfer      another, ten other classes of the same kind of images (fine-tuning)
  folder:/path/root  any folder laid out as `root/<split>/<class>/<image>`, read
                     straight from the files (no preparation step); a gs://BUCKET/PATH
                     root is listed once and read through gcsfs, many objects a call
  tfds:NAME          a prepared TensorFlow Datasets image-classification dataset in
                     `config.data_dir` (imagenet2012: `imagenet-jax prepare`)
  synthetic          random images made on the devices (data/synthetic.py)
The number of classes, their names and the split sizes always come from the source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

from imagenet_jax import storage
from imagenet_jax.data import demo, synthetic
from imagenet_jax.spec import parse_dataset

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

    def fingerprint(self) -> str:
        """A hash of what the source lists (examples, labels, classes): processes that
        read the same dataset have the same one, wherever it is mounted."""
        ...


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """Image files in `root/<split>/<class>/<file>`; labels index the sorted class folders.

    A local folder is read in the graph (`tf.io.read_file`). A gs:// folder is read
    through gcsfs, `read_batch` fetching a chunk of objects concurrently in one call:
    TensorFlow's own GCS client cannot be pointed at an emulator, and an object store
    answers many requests at once far better than one after another.
    """

    root: str | Path
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

        if storage.is_url(self.root):
            read_batch = self.read_batch(split)
            return lambda index: tuple(x[0] for x in read_batch(tf.reshape(index, [1])))
        paths = tf.constant(self.files[split])
        labels = tf.constant(self.labels[split])
        return lambda index: (tf.io.read_file(paths[index]), labels[index])

    def read_batch(self, split: str) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None:
        """For a gs:// root, in-graph indices [n] -> (file bytes [n], labels [n]), the n
        objects fetched concurrently; None for a local folder (read one by one in-graph)."""
        if not storage.is_url(self.root):
            return None
        import tensorflow as tf

        from imagenet_jax.data import named_reads

        paths, labels = tf.constant(self.files[split]), tf.constant(self.labels[split])

        def read_many(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            # (A named read: a data service worker can fetch them too.)
            return named_reads.read_objects(tf.gather(paths, indices)), tf.gather(labels, indices)

        return read_many

    def describe(self, split: str, index: int) -> str:
        return str(self.files[split][index])

    def fingerprint(self) -> str:
        digest = hashlib.sha256("\n".join(self.class_names).encode())
        prefix = len(os.fspath(self.root).rstrip("/")) + 1
        for split in sorted(self.files):
            for path, label in zip(self.files[split], self.labels[split], strict=True):
                digest.update(f"{split}\t{label}\t{path[prefix:]}\n".encode())
        return digest.hexdigest()


def get_source(spec: str, data_dir: str | None = None, tfds_read_processes: int = 0) -> Source:
    """Opens the dataset named by `spec`, generating the demo dataset on first use.

    `data_dir` is TFDS's data directory (None: TFDS's default) for `tfds:` datasets, and
    `tfds_read_processes` their reader processes (0: none; -1: by core count).
    """
    kind, arg = parse_dataset(spec)
    if kind == "synthetic":
        return synthetic.parse_synthetic(arg)
    if kind == "tfds":
        # TFDS is slow to import: only when used
        from imagenet_jax.data import records, tfds_source
        processes = (records.auto_processes() if tfds_read_processes == -1
                     else tfds_read_processes)
        return tfds_source.open_tfds(arg, data_dir, read_processes=processes)
    if kind in demo.VARIANTS:
        return open_folder(demo.ensure_demo_dataset(variant=demo.VARIANTS[kind]))
    return open_folder(arg if storage.is_url(arg) else Path(arg).expanduser())


def open_folder(root: str | Path) -> FolderSource:
    """Lists every split of a folder dataset; class names come from the train split."""
    if storage.is_url(root):
        return _open_bucket_folder(str(root).rstrip("/"))
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


def open_eval_folder(root: str | Path) -> FolderSource:
    """A folder to evaluate on, as its "val" split: `root/val/<class>/<image>` when root
    has val/, else `root/<class>/<image>` (ImageNet-A, -R and -V2 as distributed). The
    classes are the split's own folders, which may be fewer than a model's."""
    if storage.is_url(root):
        return open_folder(root)
    root = Path(root)
    split_dir = root / "val" if (root / "val").is_dir() else root
    if not split_dir.is_dir():
        raise FileNotFoundError(f"evaluation folder {root} does not exist")
    class_names = tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir()))
    if not class_names:
        raise FileNotFoundError(f"{split_dir} has no class folders; expected "
                                f"{split_dir}/<class>/<image>")
    files, labels = _list_split(split_dir, class_names)
    return FolderSource(root, class_names, {"val": files}, {"val": labels})


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


def _open_bucket_folder(root: str) -> FolderSource:
    """`open_folder` for gs://: one listing of all objects below `root`. A bucket has no
    empty folders, so the classes are the folders of train/ that hold an object."""
    by_split: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for relative in storage.find_files(root):
        split, _, rest = relative.partition("/")
        class_name, _, name = rest.partition("/")
        if split in by_split and name and "/" not in name:
            by_split[split].append((class_name, name))
    class_names = tuple(sorted({c for c, _ in by_split["train"]}))
    if not class_names:
        raise FileNotFoundError(f"dataset folder {root} has no objects under train/<class>/; "
                                "expected root/train/<class>/<image> and root/val/<class>/<image>")
    index = {name: label for label, name in enumerate(class_names)}
    files, labels = {}, {}
    for split, entries in by_split.items():
        extra = sorted({c for c, _ in entries} - index.keys())
        if extra:
            raise ValueError(f"{root}/{split} has class folders missing from train/: {extra[:5]}")
        if not entries:
            raise FileNotFoundError(f"dataset split folder {root}/{split} holds no images")
        entries.sort(key=lambda e: (index[e[0]], e[1]))
        files[split] = np.asarray([f"{root}/{split}/{c}/{n}" for c, n in entries])
        labels[split] = np.asarray([index[c] for c, _ in entries], np.int32)
    return FolderSource(root, class_names, files, labels)
