import numpy as np
import pytest
from PIL import Image

from imagenet_jax.data import demo, pipeline, sources


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
    kwargs = dict(image_size=16, seed=3, crop_scale=(0.35, 1.0))
    sharding = pipeline.Sharding(32)
    straight = _batches(pipeline.train_dataset(source, sharding, **kwargs), 16)
    # 400 // 32 = 12 steps per epoch: step 14 is inside the second epoch.
    resumed = _batches(pipeline.train_dataset(source, sharding, start_step=14, **kwargs), 2)
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
    kwargs = dict(image_size=16, seed=0, crop_scale=(0.35, 1.0))
    whole = _batches(pipeline.train_dataset(source, pipeline.Sharding(32), **kwargs), 3)
    parts = [_batches(pipeline.train_dataset(source, pipeline.Sharding(32, p, 2), **kwargs), 3)
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
        ds = pipeline.eval_dataset(source, pipeline.Sharding(batch, p, processes), image_size=16)
        batches = list(ds.as_numpy_iterator())
        num_batches.append(len(batches))
        seen_labels.append(np.concatenate([b["label"][b["mask"]] for b in batches]))
    assert len(set(num_batches)) == 1  # every process runs the same number of steps
    counts = np.bincount(np.concatenate(seen_labels), minlength=10)
    np.testing.assert_array_equal(counts, np.bincount(source.labels["val"], minlength=10))


def test_sharding_rejects_uneven_process_split():
    with pytest.raises(ValueError, match="not divisible by the number of processes"):
        pipeline.Sharding(10, 0, 3)


def test_unknown_dataset_names_valid_forms():
    with pytest.raises(ValueError, match="valid forms: 'demo' or 'folder:"):
        sources.parse_dataset("imagenet")
