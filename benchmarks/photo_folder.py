"""Writes an ImageNet-like folder of JPEGs for `imagenet-jax bench input`.

ImageNet's training JPEGs are mostly about 500x375 (or 375x500), about 110 KB, quality
about 90. This script makes a folder with those statistics in ImageNet's layout
(`OUT/train/<class>/*.JPEG` and `OUT/val/<class>/*.JPEG`), from either

  --photos DIR...  real photographs (any format PIL reads): each output image is a random
                   crop (half the area or more) of one of them, resized, jittered in
                   brightness and re-encoded; or
  (no --photos)    1/f ("pink") noise, the power spectrum of natural images, with the
                   amplitude set so files come out about 110 KB at quality 90.

The decode cost of a JPEG follows its pixel count and its compressed size, so matching
those two matters more than the picture. `benchmarks/README`-style commands that build
the folders measured in BENCHMARKS.md are in that file.

  python benchmarks/photo_folder.py --out /tmp/photos --per_class 100 --classes 4
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (500, 375)
QUALITY = 90


def pink_noise(height: int, width: int, rng: np.random.Generator, alpha: float = 1.05
               ) -> np.ndarray:
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    channels = [np.fft.irfft2((rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape))
                              / f**alpha, s=(height, width)) for _ in range(3)]
    image = np.stack(channels, -1)
    image = (image - image.mean()) / image.std() * 50 + 120
    return np.clip(image, 0, 255).astype(np.uint8)


def photo_crop(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator
               ) -> np.ndarray:
    w, h = photo.size
    aspect = size[0] / size[1]
    area = rng.uniform(0.5, 1.0) * w * h
    cw = int(min(w, np.sqrt(area * aspect)))
    ch = int(min(h, cw / aspect))
    cw = int(ch * aspect)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    crop = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.LANCZOS)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(crop, np.float32) * rng.uniform(0.8, 1.2)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--photos", nargs="*", type=Path, default=[],
                        help="photographs or folders of them; none: pink noise")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per_class", type=int, default=100)
    parser.add_argument("--val_per_class", type=int, default=10)
    args = parser.parse_args()

    files = [p for d in args.photos for p in (sorted(d.iterdir()) if d.is_dir() else [d])]
    photos = [Image.open(p).convert("RGB") for p in files]
    photos = [p for p in photos if min(p.size) >= 300]
    sizes = []
    for split, count in (("train", args.per_class), ("val", args.val_per_class)):
        for c in range(args.classes):
            folder = args.out / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([c, i, split == "val"])
                size = SIZE if rng.random() < 0.75 else SIZE[::-1]
                if photos:
                    pixels = photo_crop(photos[rng.integers(len(photos))], size, rng)
                else:
                    pixels = pink_noise(size[1], size[0], rng)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "JPEG", quality=QUALITY)
                (folder / f"{i:05d}.JPEG").write_bytes(buffer.getvalue())
                sizes.append(len(buffer.getvalue()))
    print(f"{len(sizes)} JPEGs in {args.out}: mean {np.mean(sizes) / 1e3:.0f} KB, "
          f"source: {f'{len(photos)} photographs' if photos else 'pink noise'}")


if __name__ == "__main__":
    main()
