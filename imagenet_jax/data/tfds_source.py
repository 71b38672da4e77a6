"""A prepared TensorFlow Datasets image-classification dataset as a `sources.Source`.

Random access by index needs the dataset's ArrayRecord files. Records are read by
array_record's C++ reader (`records.ArrayRecordShards`), in batches of indices: in the
pipeline's threads through one `tf.numpy_function` call per batch, or, with
`read_processes`, in reader processes that hand each batch over through a file in shared
memory (`records.ReaderProcesses`: reads in the pipeline's threads hold the GIL for part
of each record, which caps one process's reads; see records.py). Either way the records
are parsed in the graph with the images left encoded, so decoding stays in our pipeline
like for any other source. TFDS's own data source is not used to read: it starts a
thread pool on every batched call. TFRecord files have no random access; such a dataset
must be converted or prepared again.

The splits are "train" and "val"; "val" is the dataset's 'validation' split, or its
'test' split when it has no 'validation'.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from imagenet_jax.data import named_reads
from imagenet_jax.data.records import ArrayRecordShards

SPLITS = ("train", "val")
IMAGENET = "imagenet2012"
STORE_KEY = "imagenet_jax_store"  # metadata.json: how a copy was downscaled (prepare)


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """The train and val splits of a prepared TFDS dataset; labels are its ClassLabel ids."""

    name: str
    class_names: tuple[str, ...]
    split_names: dict[str, str]   # "train"/"val" -> the dataset's own split name
    sizes: dict[str, int]         # "train"/"val" -> number of examples
    image_key: str
    label_key: str
    features: Any                 # tfds.features.FeaturesDict: parses a record in-graph
    records: dict[str, ArrayRecordShards]  # "train"/"val" -> serialized records
    shards: tuple[str, ...] = ()  # "split file records" per shard file: what is read
    store: str | None = None      # a downscaled copy: how ('max_size=256,quality=90')
    read_processes: int = 0       # reader processes for batched reads; 0 = the pipeline's threads

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_examples(self, split: str) -> int:
        return self.sizes[split]

    def read(self, split: str) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
        read_serialized = _read_in_threads(self.records[split])
        decoders = {self.image_key: tfds.decode.SkipDecoding()}  # keep the encoded bytes

        def read_example(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            serialized = read_serialized(tf.reshape(tf.cast(index, tf.int64), [1]))[0]
            example = self.features.deserialize_example(serialized, decoders=decoders)
            return example[self.image_key], tf.cast(example[self.label_key], tf.int32)

        return read_example

    def read_batch(self, split: str) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None:
        """In-graph: int64 indices [n] -> (encoded images [n], int32 labels [n]); None when
        the records do not store the image and label as plain top-level features.

        One Python call fetches n records and one `tf.io.parse_example` parses them: the
        per-call cost of going through Python, which holds the GIL, is paid once per n
        images instead of once per image.
        """
        serialized_info = self.features.get_serialized_info()
        plain = {self.image_key: tf.string, self.label_key: tf.int64}
        if any(getattr(serialized_info.get(key), "tf_dtype", None) != dtype
               or getattr(serialized_info.get(key), "shape", None) != ()
               for key, dtype in plain.items()):
            return None
        spec = {self.image_key: tf.io.FixedLenFeature([], tf.string),
                self.label_key: tf.io.FixedLenFeature([], tf.int64)}
        read_serialized = (_read_in_threads(self.records[split]) if not self.read_processes
                           else _read_in_processes(self.records[split], self.read_processes))

        def read_examples(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            parsed = tf.io.parse_example(read_serialized(indices), spec)
            return parsed[self.image_key], tf.cast(parsed[self.label_key], tf.int32)

        return read_examples

    def feature_values(self, split: str, key: str) -> list[list]:
        """Feature `key` of every example of `split`, in order, each as a list of ints or
        strings: a pass over the split's records (for a file name or a set of labels)."""
        records = self.records[split]
        values = []
        for start in range(0, self.sizes[split], 1024):
            chunk = records.read(np.arange(start, min(start + 1024, self.sizes[split])))
            for record in chunk:
                feature = tf.train.Example.FromString(record).features.feature[key]
                values.append(list(feature.int64_list.value)
                              or [v.decode() for v in feature.bytes_list.value])
        return values

    def fingerprint(self) -> str:
        lines = [self.name, *self.class_names, *self.shards, *([self.store] if self.store else [])]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def describe(self, split: str, index: int) -> str:
        """E.g. 'imagenet2012 train[123] n01440764_10026.JPEG': the TFDS slice syntax,
        then the file name when the dataset records one."""
        name = f"{self.name} ({self.store})" if self.store else self.name
        where = f"{name} {self.split_names[split]}[{index}]"
        if "file_name" not in self.features:
            return where
        try:
            example = tf.train.Example.FromString(self.records[split][index])
            values = example.features.feature["file_name"].bytes_list.value
        except Exception:  # noqa: BLE001 - describing an unreadable record must not fail
            return where
        return f"{where} {values[0].decode()}" if values else where


def _read_in_threads(records: ArrayRecordShards) -> Callable[[tf.Tensor], tf.Tensor]:
    """int64 indices [n] -> serialized records [n], read in the calling tf.data thread (a
    named read: a data service worker can run it too)."""
    return named_reads.read_records(records.paths, records.lengths)


def _read_in_processes(records: ArrayRecordShards, count: int
                       ) -> Callable[[tf.Tensor], tf.Tensor]:
    """int64 indices [n] -> serialized records [n], read by `count` reader processes into
    a slot file that tf.io.read_file reads outside Python."""
    readers = records.processes(count)

    def read_serialized(indices: tf.Tensor) -> tf.Tensor:
        # Stateful: each call takes a slot, which the second hands back once it is read.
        slot, lengths = tf.numpy_function(readers.read, [indices], (tf.string, tf.int64),
                                          stateful=True)
        slot.set_shape([])
        lengths.set_shape([None])
        contents = tf.io.read_file(slot)
        with tf.control_dependencies([contents]):
            released = tf.numpy_function(readers.release, [slot], tf.bool, stateful=True)
        with tf.control_dependencies([released]):
            return tf.strings.substr(contents, tf.math.cumsum(lengths, exclusive=True), lengths)

    return read_serialized


def open_tfds(name: str, data_dir: str | None = None,
              splits: tuple[str, ...] = SPLITS, read_processes: int = 0) -> TfdsSource:
    """Opens the prepared dataset `name` under `data_dir` (TFDS's default when None).

    `splits`: ("val",) opens a dataset to evaluate on, which may have no train split
    (ImageNetV2 has only 'test'). `read_processes`: batched reads (the pipelines') in
    that many reader processes of their own, started on first use (records.py); 0 = in
    the pipeline's threads.

    Raises:
      ValueError: unknown dataset, not image classification, no train/val splits, or
        prepared without random access (TFRecord).
      FileNotFoundError: the dataset is not prepared under `data_dir`, with how to.
    """
    builder = _builder(name, data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(_not_prepared_message(name, builder))
    _require_random_access(name, builder)
    info = builder.info
    image_key, label_key = _feature_keys(name, info)
    split_names = _split_names(name, info, splits)
    records = {split: ArrayRecordShards(info.splits[split_names[split]].filepaths,
                                        info.splits[split_names[split]].shard_lengths)
               for split in splits}
    return TfdsSource(
        name=name, class_names=tuple(info.features[label_key].names), split_names=split_names,
        sizes={split: info.splits[split_names[split]].num_examples for split in splits},
        image_key=image_key, label_key=label_key, features=info.features, records=records,
        shards=tuple(f"{split} {filename} {length}" for split in splits
                     for filename, length in zip(info.splits[split_names[split]].filenames,
                                                 info.splits[split_names[split]].shard_lengths,
                                                 strict=True)),
        store=read_store(builder.data_dir), read_processes=read_processes)


def read_store(dataset_dir: str | os.PathLike) -> str | None:
    """How the dataset prepared in `dataset_dir` (its version folder) was downscaled, e.g.
    'max_size=256,quality=90'; None for the images as they were downloaded."""
    path = epath.Path(dataset_dir) / "metadata.json"  # also on gs://
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(STORE_KEY)


def _builder(name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # Registered builders only: the community list is fetched from Cloud Storage, which
        # an offline machine retries for minutes before the typo is reported.
        close = difflib.get_close_matches(
            name, tfds.list_builders(with_community_datasets=False), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown TFDS dataset {name!r}{hint} (tfds.list_builders() lists "
                         "the known names)") from None


def _not_prepared_message(name: str, builder) -> str:
    data_dir = builder.data_dir_root
    if _is_imagenet(name):
        how = ("prepare it from the manual download with `imagenet-jax prepare "
               f"--manual_dir=DIR_WITH_THE_TARS --data_dir={data_dir}`")
    else:
        how = ("prepare it in ArrayRecord format with `python -c \"import tensorflow_datasets "
               f"as tfds; tfds.builder('{name}', data_dir='{data_dir}')"
               ".download_and_prepare(file_format='array_record')\"` (or `tfds build "
               f"{name} --data_dir={data_dir} --file_format=array_record`, whose CLI needs "
               "apache-beam installed)")
    return f"TFDS dataset {name!r} is not prepared in {data_dir}; {how}"


def _require_random_access(name: str, builder) -> None:
    formats = builder.info.available_file_formats()
    if tfds.core.FileFormat.ARRAY_RECORD in formats:
        return
    stored = ", ".join(sorted(f.value for f in formats)) or "an unknown format"
    remedy = ("prepare it again into another data_dir with `imagenet-jax prepare` (it writes "
              "array_record)" if _is_imagenet(name) else
              f"prepare it again with tfds.builder('{name}', data_dir=OTHER_DIR)"
              ".download_and_prepare(file_format='array_record')")
    raise ValueError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as {stored}, which has no "
        "random access; it needs array_record. Convert it in place with `pip install "
        f"apache-beam` then `tfds convert_format --dataset_version_dir={builder.data_dir} "
        f"--out_file_format=array_record`, or {remedy}")


def _is_imagenet(name: str) -> bool:
    """'imagenet2012', also with a config or version: 'imagenet2012:5.1.0'."""
    return name.partition(":")[0].partition("/")[0] == IMAGENET


def _feature_keys(name: str, info) -> tuple[str, str]:
    """(image key, label key): the supervised keys, else the first Image and ClassLabel."""
    features = info.features
    keys = info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        image_key = _first_key(features, tfds.features.Image)
        label_key = _first_key(features, tfds.features.ClassLabel)
    if label_key in features and not isinstance(features[label_key], tfds.features.ClassLabel):
        # e.g. imagenet2012_real, whose supervised label is a set of classes: the image's
        # single class is its first ClassLabel ('original_label').
        label_key = _first_key(features, tfds.features.ClassLabel) or label_key
    if label_key is None or not isinstance(features[label_key], tfds.features.ClassLabel):
        raise ValueError(f"TFDS dataset {name!r} is not an image-classification dataset: its "
                         f"label {label_key!r} is not a ClassLabel; features: {list(features)}")
    image = features[image_key] if image_key in features else None
    if not isinstance(image, tfds.features.Image) or image.np_dtype != np.uint8:
        raise ValueError(f"TFDS dataset {name!r} is not an image-classification dataset: "
                         f"{image_key!r} is not a uint8 Image; features: {list(features)}")
    return image_key, label_key


def _first_key(features, feature_type) -> str | None:
    return next((k for k, f in features.items() if isinstance(f, feature_type)), None)


def _split_names(name: str, info, splits: tuple[str, ...] = SPLITS) -> dict[str, str]:
    available = set(info.splits)
    val = next((s for s in ("validation", "test") if s in available), None)
    if ("train" in splits and "train" not in available) or val is None:
        needed = "a 'train' split and " if "train" in splits else ""
        raise ValueError(f"TFDS dataset {name!r} needs {needed}a 'validation' or 'test' split; "
                         f"it has {sorted(available)}")
    return {split: "train" if split == "train" else val for split in splits}
