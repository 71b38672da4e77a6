"""Packs an ImageNet-layout folder of JPEGs into the two tars of ImageNet-2012's download.

`imagenet-jax prepare` builds TFDS's imagenet2012 from ILSVRC2012_img_train.tar (one
`<wnid>.tar` per class) and ILSVRC2012_img_val.tar (`ILSVRC2012_val_<8 digits>.JPEG`,
labelled by TFDS from the sorted names). This script writes both from a folder such as
`benchmarks/photo_folder.py` makes, so the TFDS path can be measured on the very files
a `folder:` run reads:

  python benchmarks/photo_folder.py --out /tmp/noise --classes 4 --per_class 250
  python benchmarks/ilsvrc_tars.py --folder /tmp/noise --out /tmp/noise_tars
  imagenet-jax prepare --manual_dir=/tmp/noise_tars --data_dir=/tmp/tfds_noise --allow_partial

Class folders are mapped, in sorted order, to the first of ImageNet's 1,000 synsets when
their names are not synsets already; validation images are renamed in sorted order, so
their TFDS labels are ImageNet's first validation labels (the benchmark reads train).
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import tensorflow_datasets as tfds

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


def _synsets() -> list[str]:
    """ImageNet-1k's synsets in TFDS's label order."""
    return tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()


def write_tars(folder: Path, out: Path) -> tuple[int, int]:
    """Writes the two tars into `out`; returns (train images, val images)."""
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    imagenet = _synsets()
    wnids = {name: name if name in imagenet else imagenet[k] for k, name in enumerate(classes)}
    num_train = 0
    with tarfile.open(out / TRAIN_TAR, "w") as outer:
        for name in classes:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for k, path in enumerate(sorted((folder / "train" / name).iterdir())):
                    tar.add(path, arcname=f"{wnids[name]}_{k}.JPEG")
                    num_train += 1
            _add_bytes(outer, f"{wnids[name]}.tar", inner.getvalue())
    val = sorted((folder / "val").glob("*/*")) if (folder / "val").is_dir() else []
    with tarfile.open(out / VAL_TAR, "w") as tar:
        for k, path in enumerate(val):
            tar.add(path, arcname=f"ILSVRC2012_val_{k + 1:08d}.JPEG")
    return num_train, len(val)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, type=Path,
                        help="holds train/<class>/*.JPEG and optionally val/<class>/*.JPEG")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    num_train, num_val = write_tars(args.folder, args.out)
    print(f"wrote {args.out / TRAIN_TAR} ({num_train} images) and {args.out / VAL_TAR} "
          f"({num_val} images)")


if __name__ == "__main__":
    main()
