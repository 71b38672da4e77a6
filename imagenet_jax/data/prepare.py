"""Prepares ImageNet-2012 for TensorFlow Datasets from the user's manual download, offline.

ImageNet cannot be downloaded without registering, so TFDS's imagenet2012 builder reads
the official tars from a folder (its "manual_dir") and writes the prepared dataset
under `data_dir/imagenet2012/<version>/`, here in ArrayRecord format so that
`tfds_source.TfdsSource` can read any example by its index. Every missing input is
reported before anything runs; the full build takes hours and about 160 GiB.

With a `downscale.Store`, the images are written downscaled (their longer side at
most N pixels, re-encoded as JPEG): a smaller, faster copy, prepared into its own
data_dir. Its `metadata.json` records how (`STORE_KEY`), so the copy is never taken for
the original: `tfds_source` names it and gives it its own fingerprint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from imagenet_jax.data.downscale import Store, parallel_map
from imagenet_jax.data.tfds_source import STORE_KEY, read_store

TRAIN_TAR = "ILSVRC2012_img_train.tar"   # 138 GiB: one tar per class, <wnid>.tar
VAL_TAR = "ILSVRC2012_img_val.tar"       # 6.3 GiB: 50,000 images, labelled by TFDS
TEST_TAR = "ILSVRC2012_img_test.tar"     # optional: unlabelled; TFDS builds it if present
REQUIRED_TARS = (TRAIN_TAR, VAL_TAR)
DOWNLOAD_PAGE = "https://image-net.org/download-images"
EXPECTED_COUNTS = {"train": 1_281_167, "validation": 50_000}
# The prepared dataset is a little larger than the tars it comes from (TFDS lists
# 155.84 GiB from 144 GiB of tars); the free space asked for is the tars' size times this.
SPACE_MARGIN = 1.2


class PrepareError(Exception):
    """A problem the user can fix: a missing file, a full disk, an incomplete download."""


def prepare_imagenet2012(manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None,
                         *, allow_partial: bool = False, store: Store | None = None
                         ) -> dict[str, int]:
    """Builds imagenet2012 in `data_dir` (TFDS's default when None); returns split -> count.

    A dataset already prepared there is reused, only its counts are checked. Counts
    other than ImageNet's 1,281,167 train and 50,000 validation images raise
    PrepareError, or log a warning when `allow_partial` (for subsets and tests).
    `store`: write the images downscaled (see `downscale`); a data_dir already holding
    imagenet2012 written otherwise (original, or another store) is an error.
    """
    manual_dir = Path(manual_dir).expanduser()
    builder = _builder(_optional_path(data_dir), store)
    if builder.is_prepared():
        logging.info("imagenet2012 is already prepared in %s; checking its counts",
                     builder.data_dir)
        _require_array_record(builder)
        _require_store(builder.data_dir, store)
    else:
        logging.info("Checking the manual download in %s and the data_dir", manual_dir)
        tars = check_manual_download(manual_dir)
        check_data_dir(Path(builder.data_dir_root), needed_bytes=sum(
            (manual_dir / name).stat().st_size for name in tars))
        _build(builder, manual_dir, tars)
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    logging.info("Checking the split sizes: %s", counts)
    check_counts(counts, builder.data_dir, allow_partial=allow_partial)
    return counts


def check_manual_download(manual_dir: Path) -> list[str]:
    """The tars to build from; raises PrepareError naming any required one that is missing."""
    if not manual_dir.is_dir():
        raise PrepareError(f"manual_dir {manual_dir} is not a directory; it should hold "
                           f"{' and '.join(REQUIRED_TARS)} from {DOWNLOAD_PAGE}")
    missing = [name for name in REQUIRED_TARS if not (manual_dir / name).is_file()]
    if missing:
        them = "them" if len(missing) > 1 else "it"
        raise PrepareError(
            f"{' and '.join(missing)} missing from {manual_dir}; download {them} from "
            f"{DOWNLOAD_PAGE} (after registering and accepting the terms) and place {them} "
            "there as they are, not extracted")
    tars = list(REQUIRED_TARS)
    if (manual_dir / TEST_TAR).is_file():
        logging.info("%s found: TFDS will also build the unlabelled test split", TEST_TAR)
        tars.append(TEST_TAR)
    return tars


def check_data_dir(data_dir: Path, needed_bytes: int) -> None:
    """Creates `data_dir` and checks that it is writable and has room for the dataset."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create data_dir {data_dir}: {e.strerror}") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise PrepareError(f"data_dir {data_dir} is not writable; pass --data_dir=DIR with a "
                           "directory you can write to")
    needed, free = int(needed_bytes * SPACE_MARGIN), shutil.disk_usage(data_dir).free
    if free < needed:
        raise PrepareError(f"data_dir {data_dir} has {free / 1e9:.1f} GB free; the prepared "
                           f"dataset needs about {needed / 1e9:.1f} GB")


def _require_store(dataset_dir: str, store: Store | None) -> None:
    found, wanted = read_store(dataset_dir), store.describe() if store else None
    if found != wanted:
        raise PrepareError(
            f"{dataset_dir} holds imagenet2012 "
            f"{f'downscaled ({found})' if found else 'at its original size'}, not "
            f"{f'downscaled ({wanted})' if wanted else 'at its original size'}; prepare "
            "each version into its own --data_dir")


def _builder(data_dir: str | None, store: Store | None):
    """TFDS's imagenet2012 builder, or with `store` one whose examples are downscaled
    (same name, features and splits: read back as imagenet2012 from its data_dir)."""
    if store is None:
        return tfds.builder("imagenet2012", data_dir=data_dir)
    imagenet = tfds.builder_cls("imagenet2012")

    class DownscaledImagenet(imagenet, skip_registration=True):
        name = imagenet.name

        def dataset_info_from_configs(self, **kwargs):
            # Saved as metadata.json with the dataset, in the same atomic move.
            metadata = tfds.core.MetadataDict({STORE_KEY: store.describe()})
            return super().dataset_info_from_configs(metadata=metadata, **kwargs)

        def _generate_examples(self, *args, **kwargs):
            def downscaled(keyed):
                key, example = keyed
                return key, {**example, "image": store.downscale(example["image"])}

            # The tars are read in order on this thread; the images downscaled on all cores.
            def read(examples):
                for key, example in examples:
                    image = example["image"]
                    yield key, {**example, "image": image if isinstance(image, bytes)
                                else image.read()}

            yield from parallel_map(downscaled, read(super()._generate_examples(*args, **kwargs)))

    return DownscaledImagenet(data_dir=data_dir)


def _build(builder, manual_dir: Path, tars: list[str]) -> None:
    logging.info("Preparing imagenet2012 from %s (%s) into %s. TFDS shows a progress bar per "
                 "split: the train split (1,281,167 images) takes hours.",
                 manual_dir, ", ".join(tars), builder.data_dir)
    # Offline: never look for a prepared copy on GCS (ImageNet is not there anyway).
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
    builder.download_and_prepare(download_config=config, file_format="array_record")
    logging.info("imagenet2012 prepared in %s", builder.data_dir)


def _require_array_record(builder) -> None:
    formats = builder.info.available_file_formats()
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
        stored = ", ".join(sorted(f.value for f in formats)) or "an unknown format"
        raise PrepareError(
            f"imagenet2012 in {builder.data_dir} was prepared as {stored}, which has no "
            "random access; pass another --data_dir to prepare it as array_record, "
            "or convert it in place (pip install apache-beam; tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record)")


def check_counts(counts: dict[str, int], where: str, *, allow_partial: bool) -> None:
    """Compares the prepared split sizes with ImageNet-2012's."""
    wrong = {split: counts.get(split, 0) for split, expected in EXPECTED_COUNTS.items()
             if counts.get(split, 0) != expected}
    if not wrong:
        return
    found = ", ".join(f"{split} {count:,}" for split, count in wrong.items())
    expected = ", ".join(f"{split} {EXPECTED_COUNTS[split]:,}" for split in wrong)
    message = (f"the imagenet2012 prepared in {where} has {found} images, ImageNet-2012 has "
               f"{expected}: the tars are incomplete or not the official ones")
    if allow_partial:
        logging.warning("%s; continuing (allow_partial)", message)
        return
    raise PrepareError(f"{message}. Delete {where} and prepare again from the official "
                       "tars, or pass --allow_partial to use it as it is")


def _optional_path(path: str | os.PathLike | None) -> str | None:
    return str(Path(path).expanduser()) if path else None
