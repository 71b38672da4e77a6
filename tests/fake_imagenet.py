"""A tiny fake of ImageNet-2012's manual download, in the official tar layout.

ILSVRC2012_img_train.tar holds one tar per class, `<wnid>.tar`, each holding
`<wnid>_<n>.JPEG`; ILSVRC2012_img_val.tar holds `ILSVRC2012_val_<8 digits>.JPEG`.
TFDS labels validation images by position: the sorted file names of the tar are paired
with the lines of its validation_labels.txt, so the fake writes the first `num_val`
names and takes their labels from the same file.

The images vary like the real ones: sizes and aspect ratios, a grayscale JPEG per
split, and, when their classes are included, a CMYK JPEG and a PNG saved as .JPEG under
the names of TFDS's builder's lists of such files (it converts those two to RGB JPEG).
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

DEFAULT_CLASSES = ("n01440764", "n01443537", "n01739381", "n02105855")
# Real ImageNet files, on TFDS's imagenet2012 builder's CMYK_IMAGES and PNG_IMAGES lists.
CMYK_FILE = "n01739381_1309.JPEG"
PNG_FILE = "n02105855_2933.JPEG"
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


@dataclasses.dataclass(frozen=True)
class FakeImage:
    file_name: str
    wnid: str               # its class: the label TFDS should give it
    size: tuple[int, int]   # (height, width)
    kind: str               # "rgb", "gray", "cmyk" or "png"
    encoded: bytes = dataclasses.field(repr=False, default=b"")  # the file's bytes


@dataclasses.dataclass(frozen=True)
class FakeDownload:
    manual_dir: Path
    train: tuple[FakeImage, ...]
    val: tuple[FakeImage, ...]


def validation_wnids() -> list[str]:
    """The wnid of each validation image, in file-name order, as TFDS ships them."""
    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().split()


def write_fake_manual_download(directory: Path, classes: tuple[str, ...] = DEFAULT_CLASSES,
                               train_per_class: int = 6, num_val: int = 10,
                               seed: int = 0) -> FakeDownload:
    """Writes the two tars into `directory` and returns what each holds."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = _train_images(classes, train_per_class, rng)
    val = _val_images(num_val, rng)
    with tarfile.open(directory / TRAIN_TAR, "w") as outer:
        for wnid in classes:
            members = [image for image in train if image.wnid == wnid]
            _add_bytes(outer, f"{wnid}.tar", _tar_bytes(members))
    with tarfile.open(directory / VAL_TAR, "w") as tar:
        for image in val:
            _add_bytes(tar, image.file_name, image.encoded)
    return FakeDownload(directory, tuple(train), tuple(val))


def _train_images(classes, per_class: int, rng: np.random.Generator) -> list[FakeImage]:
    images = []
    for class_index, wnid in enumerate(classes):
        for i in range(per_class):
            name, kind = f"{wnid}_{i + 1}.JPEG", "rgb"
            if i == 0 and CMYK_FILE.startswith(f"{wnid}_"):
                name, kind = CMYK_FILE, "cmyk"
            elif i == 0 and PNG_FILE.startswith(f"{wnid}_"):
                name, kind = PNG_FILE, "png"
            elif i == 1 and class_index == 1:
                kind = "gray"
            images.append(_fake_image(name, wnid, kind, rng))
    return images


def _val_images(num_val: int, rng: np.random.Generator) -> list[FakeImage]:
    wnids = validation_wnids()
    return [_fake_image(f"ILSVRC2012_val_{k + 1:08d}.JPEG", wnids[k],
                        "gray" if k == 2 else "rgb", rng)
            for k in range(num_val)]


def _fake_image(file_name: str, wnid: str, kind: str, rng: np.random.Generator) -> FakeImage:
    size = int(rng.integers(40, 65)), int(rng.integers(40, 65))
    return FakeImage(file_name, wnid, size, kind, _encode(size, kind, rng))


def _encode(size: tuple[int, int], kind: str, rng: np.random.Generator) -> bytes:
    """A smooth random gradient plus noise, so the JPEG is neither empty nor uniform."""
    height, width = size
    corners = rng.uniform(0, 255, (2, 2, 3))
    ys, xs = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
    pixels = (corners[0, 0] * (1 - ys) * (1 - xs) + corners[0, 1] * (1 - ys) * xs
              + corners[1, 0] * ys * (1 - xs) + corners[1, 1] * ys * xs)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    if kind == "png":
        picture.save(buffer, format="PNG")
    elif kind == "gray":
        picture.convert("L").save(buffer, format="JPEG", quality=90)
    elif kind == "cmyk":
        picture.convert("CMYK").save(buffer, format="JPEG", quality=90)
    else:
        picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _tar_bytes(images: list[FakeImage]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for image in images:
            _add_bytes(tar, image.file_name, image.encoded)
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def imagenet_classes() -> list[str]:
    """ImageNet-1k's wnids in label order, as TFDS (and ImageNetV2's folder numbers) has them."""
    return tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()


def prepare_fake_imagenet_v2(data_dir: Path, images: list[FakeImage],
                             variant: str = "matched-frequency") -> None:
    """Prepares `images` as TFDS's imagenet_v2/`variant` in `data_dir` (ArrayRecord), laid
    out as the real download is (`<class number>/<name>.jpeg`) and read by TFDS's own
    builder code; only the download is replaced by a local folder."""
    from tensorflow_datasets.datasets.imagenet_v2 import imagenet_v2_dataset_builder as v2

    folder = Path(data_dir) / "imagenet_v2_download"
    numbers = {wnid: i for i, wnid in enumerate(imagenet_classes())}
    for k, image in enumerate(images):
        class_dir = folder / str(numbers[image.wnid])
        class_dir.mkdir(parents=True, exist_ok=True)
        (class_dir / f"{k}.jpeg").write_bytes(image.encoded)

    class LocalImagenetV2(v2.Builder, skip_registration=True):
        __module__ = v2.__name__  # where TFDS looks for the builder's own files
        name = "imagenet_v2"

        def _split_generators(self, dl_manager):
            return [tfds.core.SplitGenerator(name=tfds.Split.TEST,
                                             gen_kwargs={"imagenet_v2_root": str(folder)})]

    LocalImagenetV2(config=variant, data_dir=str(data_dir)).download_and_prepare(
        file_format="array_record")


def prepare_fake_imagenet2012_real(data_dir: Path, download: FakeDownload,
                                   real_json: Path) -> None:
    """Prepares TFDS's imagenet2012_real in `data_dir` from the fake download's val tar and
    a local real.json, through TFDS's own builder (only real.json's download replaced)."""
    from tensorflow_datasets.datasets.imagenet2012_real import (
        imagenet2012_real_dataset_builder as real,
    )

    class LocalImagenet2012Real(real.Builder, skip_registration=True):
        __module__ = real.__name__  # where TFDS looks for the builder's own files
        name = "imagenet2012_real"

        def _get_real_labels(self, dl_manager):
            labels = json.loads(Path(real_json).read_text())
            return {f"ILSVRC2012_val_{i + 1:08}.JPEG": x for i, x in enumerate(labels)}

    LocalImagenet2012Real(data_dir=str(data_dir)).download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(download.manual_dir)))
