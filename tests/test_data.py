import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, subprocess_env
from PIL import Image

from imagenet_jax import spec
from imagenet_jax.data import demo, order, pipeline, preprocess, repair, sources, synthetic
from imagenet_jax.parallel import mesh_from_shape


def test_demo_layout_and_determinism(tiny_dataset, tmp_path):
    source = sources.open_folder(tiny_dataset)
    assert source.class_names == demo.WNIDS
    assert source.num_examples("train") == 400 and source.num_examples("val") == 70
    first = tiny_dataset / "train" / demo.WNIDS[3] / f"{demo.WNIDS[3]}_5.JPEG"
    assert Image.open(first).format == "JPEG"
    demo.write_demo_dataset(tmp_path, {"train": 6})  # same seeds, written again
    again = tmp_path / "train" / demo.WNIDS[3] / f"{demo.WNIDS[3]}_5.JPEG"
    assert first.read_bytes() == again.read_bytes()
    sizes = {Image.open(p).size for p in source.files["train"][:50]}
    assert len(sizes) > 20  # varied sizes and aspect ratios


def test_demo_classes_not_separable_by_mean_colour(tiny_dataset):
    """Nearest class-centroid on mean RGB is near chance (0.1): only shape tells classes apart."""
    source = sources.open_folder(tiny_dataset)

    def mean_colours(split):
        return np.stack([np.asarray(Image.open(p), np.float32).mean((0, 1))
                         for p in source.files[split]])

    train_x, val_x = mean_colours("train"), mean_colours("val")
    centroids = np.stack([train_x[source.labels["train"] == c].mean(0) for c in range(10)])
    predicted = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == source.labels["val"]).mean()
    assert accuracy < 0.25


def _batches(dataset, n):
    it = dataset.as_numpy_iterator()
    return [next(it) for _ in range(n)]


def test_train_pipeline_is_a_function_of_the_step(tiny_dataset):
    source = sources.open_folder(tiny_dataset)
    spec = pipeline.TrainSpec(16, seed=3, crop_scale=(0.35, 1.0))
    batch_slice = order.BatchSlice(32)
    straight = _batches(pipeline.train_dataset(source, batch_slice, spec), 16)
    # 400 // 32 = 12 steps per epoch: step 14 is inside the second epoch.
    resumed = _batches(pipeline.train_dataset(source, batch_slice, spec, start_step=14), 2)
    for a, b in zip(straight[14:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert straight[0]["image"].dtype == np.uint8
    assert straight[0]["image"].shape == (32, 16, 16, 3)
    # Each epoch is a new permutation: the second epoch does not repeat the first.
    assert not np.array_equal(straight[0]["label"], straight[12]["label"])
    # An epoch visits 12 * 32 distinct examples' labels in the right proportions.
    epoch_labels = np.concatenate([b["label"] for b in straight[:12]])
    assert np.bincount(epoch_labels, minlength=10).min() >= 30


def test_processes_split_each_global_batch(tiny_dataset):
    """Two processes' slices, concatenated, are exactly the one-process global batch."""
    source = sources.open_folder(tiny_dataset)
    spec = pipeline.TrainSpec(16, seed=0, crop_scale=(0.35, 1.0))
    whole = _batches(pipeline.train_dataset(source, order.BatchSlice(32), spec), 3)
    parts = [_batches(pipeline.train_dataset(source, order.BatchSlice(32, p, 2), spec), 3)
             for p in range(2)]
    for step in range(3):
        joined = np.concatenate([parts[0][step]["image"], parts[1][step]["image"]])
        np.testing.assert_array_equal(joined, whole[step]["image"])


@pytest.mark.parametrize("processes", [1, 3])
def test_eval_counts_every_example_once(tiny_dataset, processes):
    source = sources.open_folder(tiny_dataset)
    batch = 12 * processes  # 70 examples: the last global batch is ragged
    seen_labels = []
    num_batches = []
    for p in range(processes):
        ds = pipeline.eval_dataset(source, order.BatchSlice(batch, p, processes), image_size=16)
        batches = list(ds.as_numpy_iterator())
        num_batches.append(len(batches))
        seen_labels.append(np.concatenate([b["label"][b["mask"]] for b in batches]))
    assert len(set(num_batches)) == 1  # every process runs the same number of steps
    counts = np.bincount(np.concatenate(seen_labels), minlength=10)
    np.testing.assert_array_equal(counts, np.bincount(source.labels["val"], minlength=10))


def test_sharding_rejects_uneven_process_split():
    with pytest.raises(ValueError, match="not divisible by the number of processes"):
        order.BatchSlice(10, 0, 3)


def test_unknown_dataset_names_valid_forms():
    with pytest.raises(ValueError, match="valid forms: 'demo', 'demo_transfer'.*'folder:.*"
                                         "'tfds:NAME'.*'synthetic"):
        spec.parse_dataset("imagenet")


# The kinds of bad file ImageNet's train set holds or a copy can grow: the first three
# cannot be read and must be skipped; the last three are images and must decode to RGB.
UNREADABLE = ("empty", "truncated", "corrupt")
ODD_BUT_VALID = ("cmyk", "gray", "png")


def _write_odd_files(class_dir, good: bytes) -> dict[str, str]:
    """Writes one file of each bad kind into `class_dir`; returns kind -> path."""
    image = Image.open(io.BytesIO(good))
    paths = {kind: str(class_dir / f"zz_{kind}.JPEG") for kind in UNREADABLE + ODD_BUT_VALID}
    (class_dir / "zz_empty.JPEG").write_bytes(b"")
    (class_dir / "zz_truncated.JPEG").write_bytes(good[: len(good) // 3])
    (class_dir / "zz_corrupt.JPEG").write_bytes(np.random.default_rng(0).bytes(3000))
    image.convert("CMYK").save(paths["cmyk"], "JPEG", quality=95)
    image.convert("L").save(paths["gray"], "JPEG", quality=95)
    image.save(paths["png"], "PNG")  # a PNG named .JPEG, as in ImageNet's train set
    return paths


@pytest.fixture(scope="module")
def bad_dataset(tiny_dataset, tmp_path_factory):
    """The tiny dataset plus each kind of bad file in train/ and a truncated one in val/."""
    root = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(tiny_dataset, root)
    class_dir = root / "train" / demo.WNIDS[0]
    good = (class_dir / f"{demo.WNIDS[0]}_0.JPEG").read_bytes()
    paths = _write_odd_files(class_dir, good)
    paths["val_truncated"] = str(root / "val" / demo.WNIDS[1] / "zz_truncated.JPEG")
    (root / "val" / demo.WNIDS[1] / "zz_truncated.JPEG").write_bytes(good[: len(good) // 4])
    return root, paths


@pytest.mark.parametrize("kind", ODD_BUT_VALID)
def test_cmyk_grayscale_and_png_named_jpeg_decode_to_rgb(bad_dataset, kind):
    _, paths = bad_dataset
    image_bytes = tf.io.read_file(paths[kind])
    if kind == "png":  # converted once, when the pipeline first meets it
        image_bytes = preprocess.to_jpeg(image_bytes)
    window = tf.constant([2, 3, 20, 24])
    decoded = preprocess.decode_and_crop(image_bytes, window).numpy()
    assert decoded.shape == (20, 24, 3) and decoded.dtype == np.uint8
    expected = np.asarray(Image.open(paths[kind]).convert("RGB"))[2:22, 3:27].astype(float)
    # JPEG decoders differ by a few levels (CMYK adds a colour-space round trip).
    assert np.abs(decoded - expected).mean() < 6


def _jpeg_of(path):
    return preprocess.to_jpeg(tf.io.read_file(path)).numpy()


def test_unreadable_images_are_masked_not_dropped(bad_dataset):
    """A batch with bad files keeps its size and order; exactly the unreadable examples
    have mask False, the PNG is converted, and every example equals what a pipeline told
    the repairs up front gives."""
    root, paths = bad_dataset
    source = sources.open_folder(root)
    bad = {i for i, f in enumerate(source.files["train"]) if f in
           {paths[k] for k in UNREADABLE}}
    assert len(bad) == 3
    batch_slice, spec = order.BatchSlice(32), pipeline.TrainSpec(16, seed=1, crop_scale=(0.35, 1))
    steps = 2 * order.steps_per_epoch(source, 32)  # two epochs: every bad file is met
    skipping = pipeline.skipping_train_batches(source, batch_slice, spec)
    got = [next(skipping) for _ in range(steps)]
    png = source.files["train"].tolist().index(paths["png"])
    repairs = repair.Repairs({png: _jpeg_of(paths["png"])}, frozenset(bad),
                               labels={png: int(source.labels["train"][png])})
    told = pipeline.train_dataset(source, batch_slice, spec, repairs=repairs).as_numpy_iterator()
    skipped = 0
    for batch, expected in zip(got, told, strict=False):
        assert batch["image"].shape == (32, 16, 16, 3)
        for key in ("image", "label", "flip", "mask"):
            np.testing.assert_array_equal(batch[key], expected[key])
        skipped += int((~batch["mask"]).sum())
    examples = order.train_examples(source, batch_slice, seed=1).take(steps * 32)
    visits = sum(int(i) in bad for _, i in examples.as_numpy_iterator())
    assert skipped == visits > 0
    assert skipping.repairs.converted.keys() == {png}  # the PNG named .JPEG, read as JPEG
    report = skipping.take_report()
    assert sorted(report) == sorted(bad)
    assert all(any(paths[k] in where for k in UNREADABLE) for where in report.values())
    assert skipping.take_report() == {}  # reported once


def test_unreadable_eval_image_is_not_counted(bad_dataset):
    root, paths = bad_dataset
    source = sources.open_folder(root)
    batches = pipeline.skipping_eval_batches(source, order.BatchSlice(16), image_size=16)
    counted = sum(int(b["mask"].sum()) for b in batches)
    assert counted == source.num_examples("val") - 1
    assert [paths["val_truncated"] in w for w in batches.take_report().values()] == [True]


def test_training_survives_bad_files_and_reports_them(bad_dataset, tmp_path):
    """The CLI trains a folder with every kind of bad file to the end, counts the skips in
    metrics.jsonl and names each unreadable file in its log."""
    root, paths = bad_dataset
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "imagenet_jax", "train", f"--config={REPO}/tests/tiny_config.py",
         f"--config.dataset=folder:{root}", "--config.num_epochs=1", f"--workdir={workdir}"],
        cwd=REPO, env=subprocess_env(2), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in UNREADABLE:
        assert paths[kind] in result.stderr
    assert paths["val_truncated"] in result.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert sum(r["skipped_examples"] for r in train) >= 1
    source = sources.open_folder(root)
    assert [r["split"] for r in records[-2:]] == ["val", "goodput"]
    assert records[-2]["num_examples"] == source.num_examples("val") - 1


def test_synthetic_source_and_batches():
    source = sources.get_source("synthetic:classes=10,train=64,val=20")
    assert (source.num_classes, source.num_examples("train"), source.num_examples("val")) == (
        10, 64, 20)
    assert sources.get_source("synthetic").num_examples("train") == 1_281_167
    with pytest.raises(ValueError, match="classes=N, train=N or val=N"):
        sources.get_source("synthetic:classes=0")
    mesh = mesh_from_shape({"data": jax.device_count(), "fsdp": 1})
    first = next(synthetic.train_batches(source, mesh, 16, 8, seed=0))
    again = next(synthetic.train_batches(source, mesh, 16, 8, seed=0))
    np.testing.assert_array_equal(first["image"], again["image"])  # a function of the seed
    assert first["image"].dtype == np.uint8 and first["image"].shape == (16, 8, 8, 3)
    assert len(first["image"].sharding.device_set) == 8  # made sharded, on the devices
    assert int(np.max(first["label"])) < 10
    evals = list(synthetic.eval_batches(source, mesh, 16, 8, seed=0))
    assert sum(int(b["mask"].sum()) for b in evals) == 20


def test_a_file_that_vanished_after_listing_is_skipped(tiny_dataset, tmp_path):
    """A file gone between listing and reading (a flaky mount, a cleanup) is skipped like
    a corrupt one, never read again, and named in the report."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    source = sources.open_folder(root)
    gone = source.files["train"][5]
    Path(gone).unlink()
    batch_slice, spec = order.BatchSlice(32), pipeline.TrainSpec(16, seed=0, crop_scale=(0.35, 1))
    batches = pipeline.skipping_train_batches(source, batch_slice, spec)
    masks = [next(batches)["mask"] for _ in range(order.steps_per_epoch(source, 32))]
    visits = sum(int(i) == 5 for _, i in order.train_examples(source, batch_slice, 0)
                 .take(len(masks) * 32).as_numpy_iterator())
    assert sum(int((~m).sum()) for m in masks) == visits
    report = batches.take_report()
    assert list(report) == [5] and gone in report[5] and "NotFoundError" in report[5]


def test_a_batch_of_nothing_but_pngs_named_jpeg_trains(tmp_path):
    """No example of the batch reads as JPEG, yet every one converts: all are kept."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(2):
            folder = tmp_path / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", "PNG")
    source = sources.open_folder(tmp_path)
    batches = pipeline.skipping_train_batches(source, order.BatchSlice(8),
                                              pipeline.TrainSpec(16, seed=0))
    batch = next(batches)
    assert batch["mask"].all() and len(batches.repairs.converted) == 8
    assert batches.take_report() == {}


@dataclasses.dataclass(frozen=True)
class _FlakySource(sources.FolderSource):
    """A folder whose file `flaky` fails to read its first `failures` times, as a file on
    a faltering network store does; reads of the others never fail."""

    flaky: str = ""
    failures: int = 0
    attempts: list = dataclasses.field(default_factory=list)

    def read(self, split):
        read = super().read(split)
        files = self.files[split]

        def check(index):
            if files[int(index)] == self.flaky:
                self.attempts.append(index)
                if len(self.attempts) <= self.failures:
                    raise OSError(f"transient: {self.flaky}")
            return np.bool_(True)

        def flaky_read(index):
            ok = tf.numpy_function(check, [index], tf.bool, stateful=True)
            with tf.control_dependencies([ok]):
                image, label = read(index)
                return tf.identity(image), label

        return flaky_read


@pytest.mark.parametrize("attempts, skipped", [(4, 0), (1, 1)])
def test_a_read_that_fails_for_a_while_is_retried_before_the_image_is_skipped(
        tiny_dataset, attempts, skipped):
    """The file fails its first 3 reads (the pipeline's, the one-by-one check's, the first
    raw read's): with 4 attempts a retry reads it and nothing is skipped; with 1 it
    counts as unreadable."""
    folder = sources.open_folder(tiny_dataset)
    eval_files = list(folder.files["val"])
    source = _FlakySource(**{f.name: getattr(folder, f.name)
                             for f in dataclasses.fields(sources.FolderSource)},
                          flaky=eval_files[5], failures=3)
    batches = pipeline.skipping_eval_batches(
        source, order.BatchSlice(16), image_size=16,
        retry=repair.ReadRetry(attempts=attempts, delay_s=0.01))
    masks = np.concatenate([batch["mask"] for batch in batches])
    assert masks.sum() == 70 - skipped, (len(source.attempts), batches.take_report())
    assert len(batches.take_report()) == skipped
    assert len(source.attempts) >= 4 - skipped
