"""Stores: downscaled copies (`prepare --max_size`)."""

import io
import subprocess
import sys

import fake_imagenet
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, subprocess_env
from PIL import Image

from imagenet_jax.data import downscale, prepare, sources, tfds_source

MAX_SIZE = 48  # the fake download's images are 40-64 px: some are downscaled, some kept


@pytest.fixture(scope="module")
def fake_download(tmp_path_factory):
    return fake_imagenet.write_fake_manual_download(tmp_path_factory.mktemp("manual"))


@pytest.fixture(scope="module")
def stores(fake_download, tmp_path_factory):
    """{None: the original, store: the downscaled copy}: data_dirs of the same download."""
    store = downscale.Store(MAX_SIZE, quality=95)
    original, small = tmp_path_factory.mktemp("original"), tmp_path_factory.mktemp("small")
    prepare.prepare_imagenet2012(fake_download.manual_dir, original, allow_partial=True)
    prepare.prepare_imagenet2012(fake_download.manual_dir, small, allow_partial=True,
                                 store=store)
    return {None: original, store: small}


def _images(data_dir, split):
    """(source, {file name: (image bytes, label)}) of a prepared split."""
    source = tfds_source.open_tfds("imagenet2012", str(data_dir))
    names = [value[0] for value in source.feature_values(split, "file_name")]
    examples = {}
    for name, record in zip(names, source.records[split].read(
            np.arange(source.num_examples(split))), strict=True):
        feature = tf.train.Example.FromString(record).features.feature
        examples[name] = (feature[source.image_key].bytes_list.value[0],
                          feature[source.label_key].int64_list.value[0])
    return source, examples


def test_downscaled_copy_keeps_every_example_within_max_size(stores):
    (original_dir, small_dir), store = stores.values(), list(stores)[1]
    for split in ("train", "val"):
        original, originals = _images(original_dir, split)
        small, smalls = _images(small_dir, split)
        assert smalls.keys() == originals.keys()  # every file, under its name
        kept = downscaled = 0
        for name, (image_bytes, label) in smalls.items():
            before, after = Image.open(io.BytesIO(originals[name][0])), Image.open(
                io.BytesIO(image_bytes))
            assert label == originals[name][1], name
            assert max(after.size) <= MAX_SIZE, (name, after.size)
            if max(before.size) <= MAX_SIZE:
                assert image_bytes == originals[name][0], name  # byte for byte
                kept += 1
            else:
                assert after.format == "JPEG" and max(after.size) == MAX_SIZE, name
                short = MAX_SIZE * min(before.size) / max(before.size)
                assert abs(min(after.size) - short) <= 1, (before.size, after.size)
                downscaled += 1
        assert downscaled and (kept or split == "val"), (split, kept, downscaled)
    assert small.store == store.describe() == "max_size=48,quality=95"
    assert original.store is None and original.fingerprint() != small.fingerprint()
    assert "max_size=48" in small.describe("train", 0)


def test_a_data_dir_holds_one_version(stores, fake_download):
    original_dir, small_dir = stores.values()
    with pytest.raises(prepare.PrepareError, match="at its original size, not downscaled"):
        prepare.prepare_imagenet2012(fake_download.manual_dir, original_dir, allow_partial=True,
                                     store=downscale.Store(MAX_SIZE, quality=95))
    with pytest.raises(prepare.PrepareError, match=r"downscaled \(max_size=48,quality=95\), "
                                                    r"not downscaled \(max_size=40"):
        prepare.prepare_imagenet2012(fake_download.manual_dir, small_dir, allow_partial=True,
                                     store=downscale.Store(40, quality=95))
    # The same store again: already prepared, only its counts are checked.
    counts = prepare.prepare_imagenet2012(fake_download.manual_dir, small_dir,
                                          allow_partial=True, store=list(stores)[1])
    assert counts["train"] == len(fake_download.train)


def _folder(root, sizes):
    for k, size in enumerate(sizes):
        path = root / ("train" if k else "val") / f"n{k % 2:08d}" / f"{k}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(k).integers(0, 255, (*size[::-1], 3), np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    (root / "README.txt").write_text("not an image")
    broken = root / "train" / "n00000000" / "broken.JPEG"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"\xff\xd8 truncated")


def test_folder_copy(tmp_path):
    sizes = [(500, 375), (375, 500), (40, 30), (64, 64), (301, 7)]
    _folder(tmp_path / "src", sizes)
    count = downscale.copy_folder(tmp_path / "src", tmp_path / "dst", downscale.Store(64))
    assert count == len(sizes) + 1
    for path in (tmp_path / "src").rglob("*"):
        copy = tmp_path / "dst" / path.relative_to(tmp_path / "src")
        assert copy.exists(), copy
        if path.suffix != ".JPEG" or path.name == "broken.JPEG" or \
                max(Image.open(path).size) <= 64:
            if path.is_file():
                assert copy.read_bytes() == path.read_bytes(), path  # kept as it was
            continue
        before, after = Image.open(path).size, Image.open(copy).size
        assert max(after) == 64 and abs(min(after) - 64 * min(before) / max(before)) <= 1
    copy = sources.open_folder(tmp_path / "dst")
    assert (copy.num_examples("train"), copy.num_examples("val")) == (len(sizes), 1)
    with pytest.raises(FileExistsError, match="choose a new folder"):
        downscale.copy_folder(tmp_path / "src", tmp_path / "dst", downscale.Store(64))
    assert not list(tmp_path.glob("*.partial"))


def test_store_refuses_bad_sizes():
    with pytest.raises(ValueError, match="at least 32"):
        downscale.Store(16)
    with pytest.raises(ValueError, match=r"quality must be in \[1, 100\]"):
        downscale.Store(256, quality=0)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "imagenet_jax", "prepare", *args], cwd=REPO,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=120)


def test_cli_prepare_folder_copy(tmp_path):
    _folder(tmp_path / "src", [(200, 100), (20, 20)])
    done = _cli(f"--folder={tmp_path / 'src'}", f"--out={tmp_path / 'dst'}", "--max_size=50",
                "--quality=80")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 images" in done.stdout and "max_size=50,quality=80" in done.stdout
    assert Image.open(tmp_path / "dst" / "val" / "n00000000" / "0.JPEG").size == (50, 25)
    for args, message in [(("--quality=80", "--manual_dir=x"), "give --max_size=N too"),
                          ((f"--folder={tmp_path / 'src'}", "--max_size=50"), "needs --out"),
                          (("--manual_dir=x", "--out=y"), "TFDS writes to --data_dir")]:
        refused = _cli(*args)
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)


def test_freed_memory_is_kept_for_reuse():
    """After keep_freed_memory, record-sized blocks freed stay in the process (glibc would
    return them to the OS and fault them in afresh): the resident set stays up."""
    code = """if True:
        import os, sys
        from imagenet_jax.data import allocator
        def rss_mb():
            pages = int(open("/proc/self/statm").read().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        if sys.argv[1] == "keep":
            assert allocator.keep_freed_memory()
        before = rss_mb()
        blocks = [os.urandom(200_000) for _ in range(1000)]  # 200 MB in record-sized blocks
        del blocks
        print(rss_mb() - before)
    """
    grown = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", code, mode], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        grown[mode] = float(done.stdout.split()[-1])
    assert grown["default"] < 50 and grown["keep"] > 150, grown
