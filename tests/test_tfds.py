"""TFDS: preparing ImageNet-2012 from a (fake) manual download, and reading it by index."""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import types

import fake_imagenet
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import REPO, subprocess_env

from imagenet_jax.data import order, pipeline, prepare, tfds_source
from imagenet_jax.data import records as data_records


@pytest.fixture(scope="session")
def fake_download(tmp_path_factory) -> fake_imagenet.FakeDownload:
    return fake_imagenet.write_fake_manual_download(tmp_path_factory.mktemp("manual"))


@pytest.fixture(scope="session")
def prepared(fake_download, tmp_path_factory):
    """(data_dir, counts): the fake download prepared once for the whole session."""
    data_dir = tmp_path_factory.mktemp("tfds_data")
    counts = prepare.prepare_imagenet2012(fake_download.manual_dir, data_dir, allow_partial=True)
    return data_dir, counts


@pytest.fixture(scope="session")
def source(prepared) -> tfds_source.TfdsSource:
    return tfds_source.open_tfds("imagenet2012", str(prepared[0]))


def test_prepare_counts_what_was_written(fake_download, prepared):
    _, counts = prepared
    assert counts == {"train": len(fake_download.train), "validation": len(fake_download.val)}


def test_prepare_rejects_a_partial_dataset_unless_allowed(fake_download, prepared):
    with pytest.raises(prepare.PrepareError, match="1,281,167") as error:
        prepare.prepare_imagenet2012(fake_download.manual_dir, prepared[0])
    assert "--allow_partial" in str(error.value)


def test_prepare_names_the_missing_tar(fake_download, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(fake_download.manual_dir / fake_imagenet.TRAIN_TAR, manual)
    with pytest.raises(prepare.PrepareError) as error:
        prepare.prepare_imagenet2012(manual, tmp_path / "data")
    message = str(error.value)
    assert message.startswith("ILSVRC2012_img_val.tar missing from") and "image-net.org" in message
    assert fake_imagenet.TRAIN_TAR not in message
    assert not (tmp_path / "data").exists()  # checked before anything ran
    with pytest.raises(prepare.PrepareError, match="is not a directory"):
        prepare.prepare_imagenet2012(tmp_path / "nowhere", tmp_path / "data")


def test_source_sizes_and_classes(source, fake_download):
    assert source.num_classes == 1000
    assert source.class_names[0] == "n01440764"
    assert source.num_examples("train") == len(fake_download.train)
    assert source.num_examples("val") == len(fake_download.val)
    assert source.split_names == {"train": "train", "val": "validation"}


@pytest.mark.parametrize("split", ["train", "val"])
def test_read_in_tf_data_gives_encoded_images_and_their_labels(source, fake_download, split):
    written = {image.file_name: image for image in getattr(fake_download, split)}
    indices = tf.data.Dataset.range(source.num_examples(split))
    dataset = indices.map(source.read(split), num_parallel_calls=tf.data.AUTOTUNE)
    seen = set()
    for index, (encoded, label) in enumerate(dataset.as_numpy_iterator()):
        file_name = source.describe(split, index).split()[-1]
        image = written[file_name]
        assert label == source.class_names.index(image.wnid), file_name
        decoded = tf.io.decode_image(encoded, expand_animations=False).numpy()
        channels = 1 if image.kind == "gray" else 3
        assert decoded.shape == (*image.size, channels), file_name
        if image.kind in ("rgb", "gray"):
            assert encoded == image.encoded  # stored as written, decoded only by us
        else:  # TFDS rewrites ImageNet's known CMYK and PNG files as RGB JPEGs
            assert encoded[:2] == b"\xff\xd8", file_name
        seen.add(file_name)
    assert seen == set(written)


def test_read_output_signature(source):
    image, label = source.read("train")(tf.constant(0, tf.int64))
    assert image.dtype == tf.string and image.shape == []
    assert label.dtype == tf.int32 and label.shape == []


def test_describe_names_the_file(source, fake_download):
    description = source.describe("train", 0)
    assert description.startswith("imagenet2012 train[0] ")
    assert description.split()[-1] in {image.file_name for image in fake_download.train}
    assert source.describe("val", 3).startswith("imagenet2012 validation[3] ILSVRC2012_val_")


def test_tfrecord_dataset_says_how_to_convert(fake_download, tmp_path):
    builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(fake_download.manual_dir), try_download_gcs=False), file_format="tfrecord")
    with pytest.raises(ValueError, match="no random access") as error:
        tfds_source.open_tfds("imagenet2012", str(tmp_path))
    assert "tfds convert_format" in str(error.value)
    assert "--out_file_format=array_record" in str(error.value)
    with pytest.raises(prepare.PrepareError, match="another --data_dir"):
        prepare.prepare_imagenet2012(fake_download.manual_dir, tmp_path, allow_partial=True)


def test_unprepared_or_unknown_datasets_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="imagenet-jax prepare --manual_dir="):
        tfds_source.open_tfds("imagenet2012", str(tmp_path))
    with pytest.raises(FileNotFoundError,
                       match=r"tfds.builder\('mnist'.*file_format='array_record'"):
        tfds_source.open_tfds("mnist", str(tmp_path))
    with pytest.raises(ValueError, match="'imagenet2O12'; did you mean imagenet2012"):
        tfds_source.open_tfds("imagenet2O12", str(tmp_path))


def test_label_must_be_a_class_label():
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(),
                                           "label": tfds.features.Scalar(np.int64)})
    info = types.SimpleNamespace(features=features, supervised_keys=("image", "label"))
    with pytest.raises(ValueError, match="not an image-classification dataset"):
        tfds_source._feature_keys("regression", info)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "imagenet_jax", "prepare", *args], cwd=REPO,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=120)


def test_cli_prepare(prepared, fake_download, tmp_path):
    result = run_cli(f"--manual_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("imagenet-jax: error")]
    assert len(errors) == 1 and "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar missing" \
        in errors[0], result.stderr[-2000:]
    result = run_cli(f"--manual_dir={fake_download.manual_dir}", f"--data_dir={prepared[0]}",
                     "--allow_partial")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "imagenet2012 prepared: train 24, validation 10" in result.stdout


def test_fake_imagenet_prepares_and_trains(prepared, tmp_path):
    """The prepared fake download trains end to end through `--config.dataset=tfds:...`:
    1,000 classes from the builder's label set, every validation example evaluated once;
    read by reader processes, whose slot files are gone when the run ends."""
    data_dir, counts = prepared
    workdir = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "-m", "imagenet_jax", "train", f"--config={REPO}/tests/tiny_config.py",
         "--config.dataset=tfds:imagenet2012", f"--config.data_dir={data_dir}",
         "--config.batch_size=8", "--config.eval_batch_size=8", "--config.num_epochs=2",
         "--config.log_every_steps=1", "--config.tfds_read_processes=2", f"--workdir={workdir}"],
        cwd=REPO, env=subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    resolved = json.loads((workdir / "config.json").read_text())["derived"]
    assert resolved["num_classes"] == 1000
    assert resolved["num_train_examples"] == counts["train"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2 * (counts["train"] // 8) and np.isfinite(train[-1]["loss"])
    val = [r for r in records if r["split"] == "val"]
    assert val[-1]["num_examples"] == counts["validation"]
    assert [r["split"] for r in records[-2:]] == ["val", "goodput"]
    assert not _slot_folders(run.pid)  # (another test's runs may hold theirs meanwhile)


def _slot_folders(pid: int) -> list[str]:
    """The slot folders in shared memory of the reader processes process `pid` started."""
    return glob.glob(os.path.join(data_records.shared_memory_dir(),
                                  f"{data_records.SLOTS_PREFIX}{pid}.*"))


@pytest.mark.parametrize("read_processes", [0, 2], ids=["threads", "processes"])
def test_batched_read_equals_one_at_a_time(source, read_processes):
    """`read_batch` (one Python call per READ_BATCH records, or reader processes) reads
    what `read` does, and the pipelines built on it give the same batches as reading one
    record at a time."""
    source = dataclasses.replace(source, read_processes=read_processes)
    read, read_batch = source.read("train"), source.read_batch("train")
    assert read_batch is not None
    indices = tf.constant([3, 0, 7, 7, 1], tf.int64)
    images, labels = read_batch(indices)
    for k, index in enumerate(indices.numpy()):
        image, label = read(tf.constant(index, tf.int64))
        assert image.numpy() == images[k].numpy() and int(label) == int(labels[k])

    class OneAtATime:  # the same source without its batched read
        def __getattr__(self, name):
            if name == "read_batch":
                raise AttributeError(name)
            return getattr(source, name)

    spec = pipeline.TrainSpec(16, seed=0)
    batched = pipeline.train_dataset(source, order.BatchSlice(8), spec).take(4)
    single = pipeline.train_dataset(OneAtATime(), order.BatchSlice(8), spec).take(4)
    for a, b in zip(batched.as_numpy_iterator(), single.as_numpy_iterator(), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    evals = [list(pipeline.eval_dataset(s, order.BatchSlice(8), image_size=16)
                  .as_numpy_iterator()) for s in (source, OneAtATime())]
    for a, b in zip(*evals, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_tfds_batches_on_the_data_service_equal_the_in_process_ones(source):
    """TFDS records are read through Python (a named read), which the service's worker
    processes run too: their batches are bitwise the in-process pipeline's."""
    from imagenet_jax.data import repair, service

    batch_slice = order.BatchSlice(8, process_index=1, process_count=2)
    spec = pipeline.TrainSpec(16, seed=5, crop_scale=(0.35, 1.0))
    steps = 2 * order.steps_per_epoch(source, 8)

    def here(step, repairs):
        return pipeline.skipping_train_batches(source, batch_slice, spec, step, repairs=repairs)

    with service.start_local(2) as started:
        batches = service.OrderedBatches(
            lambda step, repairs: service.distribute(pipeline.keyed_train_dataset(
                source, batch_slice, spec, step, steps, repairs), started.target),
            here, 0, steps, timeout_s=120, buffer_size=steps)
        got = list(batches)
    reference = here(0, repair.Repairs())
    for batch in got:
        expected = next(reference)
        for key in expected:
            np.testing.assert_array_equal(batch[key], expected[key])
    assert len(got) == steps and batches.counts.served == steps
