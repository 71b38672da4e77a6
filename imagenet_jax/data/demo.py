"""The demo dataset: small, learnable, generated JPEGs in ImageNet's own layout.

`root/{train,val}/<wnid>/<wnid>_<n>.JPEG`, one folder per class named with a real
ImageNet-1k synset id, so the demo exercises exactly the path real ImageNet takes
(folder listing, JPEG decode, random-resized crop). Each class is a shape or a
texture drawn in a random colour, at a random scale, position and rotation, over
a random gradient background with clutter and noise: classes cannot be told apart
by mean colour, only by shape. Generation is deterministic in (split, index).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image, ImageDraw

VERSION = 1
# The first ten ImageNet-1k synsets, used as folder names; `classes.txt` maps them
# to the shape each one holds here.
WNIDS = (
    "n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
    "n01496331", "n01498041", "n01514668", "n01514859", "n01518878",
)
SHAPES = (
    "disk", "ring", "square", "triangle", "plus",
    "star", "half_disk", "stripes", "checkerboard", "dots",
)
SPLIT_SIZES = {"train": 300, "val": 50}  # images per class
_SPLIT_SEEDS = {"train": 0, "val": 1}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A generated dataset: its classes (ImageNet wnids as folder names, a shape each) and
    its images per class and split."""

    name: str
    wnids: tuple[str, ...]
    shapes: tuple[str, ...]
    split_sizes: dict
    seed: int  # apart from the split's and the example's: the variants draw other images


DEMO = Variant("demo", WNIDS, SHAPES, SPLIT_SIZES, seed=0)
# The fine-tuning demonstration's dataset ('demo_transfer'): ten other shapes, drawn the
# same way (backgrounds, clutter, noise, colours), with a tenth of the demo's training
# images: where weights learnt on the demo help. Its folders are the next ten ImageNet-1k
# synsets (brambling ... chickadee), none of the demo's.
TRANSFER = Variant(
    "demo_transfer",
    ("n01530575", "n01531178", "n01532829", "n01534433", "n01537544",
     "n01558993", "n01560419", "n01580077", "n01582220", "n01592084"),
    ("ellipse", "hexagon", "cross", "arrow", "crescent",
     "frame", "diamond", "bars", "hatch", "rings"),
    {"train": 30, "val": 50}, seed=7)
VARIANTS = {variant.name: variant for variant in (DEMO, TRANSFER)}


def default_root(variant: Variant = DEMO) -> Path:
    """Where a generated dataset lives: $IMAGENET_JAX_DATA or ~/.cache/imagenet_jax."""
    base = os.environ.get("IMAGENET_JAX_DATA") or Path.home() / ".cache" / "imagenet_jax"
    return Path(base) / f"{variant.name}_v{VERSION}"


def ensure_demo_dataset(root: Path | None = None, variant: Variant = DEMO) -> Path:
    """Generates the demo dataset (or another `variant`) at `root` unless it is already
    complete.

    Safe to call from several processes at once: each writes into a private
    temporary folder and renames it into place; the first rename wins.
    """
    root = Path(root) if root is not None else default_root(variant)
    if (root / "COMPLETE").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp.", dir=root.parent))
    try:
        logging.info("Generating the demo dataset into %s", root)
        write_demo_dataset(tmp, variant=variant)
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            tmp.rename(root)
        except OSError:  # Another process got there first, or a stale partial folder.
            if not (root / "COMPLETE").exists():
                shutil.rmtree(root, ignore_errors=True)
                tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_demo_dataset(root: Path, split_sizes: dict[str, int] | None = None,
                       variant: Variant = DEMO) -> None:
    """Writes every split's JPEGs under `root` (which must exist)."""
    split_sizes = split_sizes or variant.split_sizes
    lines = [f"{wnid} {shape}" for wnid, shape in zip(variant.wnids, variant.shapes, strict=True)]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    for split, per_class in split_sizes.items():
        for label, wnid in enumerate(variant.wnids):
            class_dir = root / split / wnid
            class_dir.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                # (The demo's seeds as they always were: its images do not change.)
                seed = [_SPLIT_SEEDS[split], label, n] + ([variant.seed] if variant.seed else [])
                image = render_example(label, np.random.default_rng(seed), variant.shapes)
                image.save(class_dir / f"{wnid}_{n}.JPEG", quality=90)


def render_example(label: int, rng: np.random.Generator,
                   shapes: tuple[str, ...] = SHAPES) -> Image.Image:
    """One image of class `label`: shape over a cluttered, noisy background."""
    short = int(rng.integers(72, 129))
    aspect = float(rng.uniform(0.75, 4 / 3))
    if aspect >= 1:
        width, height = round(short * aspect), short
    else:
        width, height = short, round(short / aspect)
    background, foreground = _contrasting_colours(rng)
    image = Image.fromarray(_gradient(height, width, background, rng))
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, width, height, rng)
    size = float(rng.uniform(0.45, 0.75)) * min(width, height)
    cx = float(rng.uniform(size / 2, width - size / 2))
    cy = float(rng.uniform(size / 2, height - size / 2))
    _draw_shape(image, draw, shapes[label], cx, cy, size, tuple(foreground), rng)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    while True:
        background, foreground = rng.integers(0, 256, (2, 3))
        if np.abs(background - foreground).sum() > 180:
            return background, foreground


def _gradient(height: int, width: int, colour: np.ndarray, rng: np.random.Generator):
    """A background of `colour` with a random linear shading of up to +-40."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height) * rng.uniform(-40, 40)
    return np.clip(colour[None, None, :] + ramp[..., None], 0, 255).astype(np.uint8)


def _draw_clutter(draw: ImageDraw.ImageDraw, width: int, height: int, rng) -> None:
    """A few thin lines and small blobs in random colours: not the class signal."""
    for _ in range(int(rng.integers(2, 6))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, x1 = rng.uniform(0, width, 2)
        y0, y1 = rng.uniform(0, height, 2)
        if rng.uniform() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
        else:
            r = float(rng.uniform(2, 5))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)


def _rotated(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _draw_shape(image, draw, shape, cx, cy, size, colour, rng) -> None:
    """Draws `shape` centred at (cx, cy) within a `size` x `size` box."""
    r = size / 2
    tilt = float(rng.uniform(-0.3, 0.3))
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "disk":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r * 0.28)))
    elif shape == "square":
        corners = [(-r, -r), (r, -r), (r, r), (-r, r)]
        draw.polygon(_rotated([(x * 0.8, y * 0.8) for x, y in corners], cx, cy, tilt), fill=colour)
    elif shape == "triangle":
        angles = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        corners = [(r * math.cos(a), r * math.sin(a)) for a in angles]
        draw.polygon(_rotated(corners, cx, cy, tilt), fill=colour)
    elif shape == "plus":
        t = r * 0.3
        arms = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t),
                (-r, t), (-r, -t), (-t, -t)]
        draw.polygon(_rotated(arms, cx, cy, tilt), fill=colour)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.4
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        draw.polygon(_rotated(points, cx, cy, tilt), fill=colour)
    elif shape == "half_disk":
        start = float(rng.choice([0.0, 180.0])) + math.degrees(tilt)
        draw.pieslice(box, start, start + 180, fill=colour)
    elif shape in _OUTLINES:
        points = _OUTLINES[shape](r)
        draw.polygon(_rotated(points, cx, cy, tilt + float(rng.uniform(0, math.pi))),
                     fill=colour)
    elif shape == "frame":
        corners = [(-r * 0.8, -r * 0.8), (r * 0.8, -r * 0.8), (r * 0.8, r * 0.8),
                   (-r * 0.8, r * 0.8)]
        draw.polygon(_rotated(corners, cx, cy, tilt), outline=colour, width=max(2, int(r * 0.25)))
    elif shape == "rings":
        for radius in (r, r * 0.55):
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour,
                         width=max(2, int(r * 0.16)))
    else:
        _draw_texture(image, shape, box, colour, rng)


def _ellipse(r: float) -> list[tuple[float, float]]:
    return [(r * math.cos(a), 0.45 * r * math.sin(a))
            for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]


def _regular(sides: int, r: float) -> list[tuple[float, float]]:
    return [(r * math.cos(2 * math.pi * k / sides), r * math.sin(2 * math.pi * k / sides))
            for k in range(sides)]


def _crescent(r: float) -> list[tuple[float, float]]:
    outer = [(r * math.cos(a), r * math.sin(a)) for a in np.linspace(-2.2, 2.2, 24)]
    inner = [(0.35 * r + 0.75 * r * math.cos(a), 0.75 * r * math.sin(a))
             for a in np.linspace(2.0, -2.0, 24)]
    return outer + inner


def _bars(r: float) -> list[tuple[float, float]]:
    t = r * 0.22  # two parallel bars, joined by a hairline so that one polygon draws both
    return [(-r, -r), (-r + 2 * t, -r), (-r + 2 * t, r), (r - 2 * t, r), (r - 2 * t, -r),
            (r, -r), (r, r), (-r, r)]


# Filled outlines of the transfer dataset's shapes, centred at 0, within radius r.
_OUTLINES = {
    "ellipse": _ellipse,
    "hexagon": lambda r: _regular(6, r),
    "cross": lambda r: _rotated([(x, y) for x, y in [
        (-0.25 * r, -r), (0.25 * r, -r), (0.25 * r, -0.25 * r), (r, -0.25 * r), (r, 0.25 * r),
        (0.25 * r, 0.25 * r), (0.25 * r, r), (-0.25 * r, r), (-0.25 * r, 0.25 * r),
        (-r, 0.25 * r), (-r, -0.25 * r), (-0.25 * r, -0.25 * r)]], 0, 0, math.pi / 4),
    "arrow": lambda r: [(-r, -0.2 * r), (0.2 * r, -0.2 * r), (0.2 * r, -0.6 * r), (r, 0),
                        (0.2 * r, 0.6 * r), (0.2 * r, 0.2 * r), (-r, 0.2 * r)],
    "crescent": _crescent,
    "diamond": lambda r: [(0, -r), (0.5 * r, 0), (0, r), (-0.5 * r, 0)],
    "bars": _bars,
}


def _draw_texture(image, shape, box, colour, rng) -> None:
    """Fills the box with a texture: stripes, a checkerboard or a grid of dots."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    w, h = x1 - x0, y1 - y0
    period = max(4.0, float(rng.uniform(0.18, 0.3)) * w)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if shape == "hatch":  # thin lines along both diagonals
        width = max(1.0, period / 6)
        mask = (((xs + ys) % period) < width) | (((xs - ys) % period) < width)
    elif shape == "stripes":
        angle = float(rng.choice([0.0, math.pi / 2])) + float(rng.uniform(-0.3, 0.3))
        mask = ((xs * math.cos(angle) + ys * math.sin(angle)) // (period / 2)) % 2 == 0
    elif shape == "checkerboard":
        mask = ((xs // (period / 2)) + (ys // (period / 2))) % 2 == 0
    else:  # dots
        dx = (xs % period) - period / 2
        dy = (ys % period) - period / 2
        mask = dx**2 + dy**2 < (period * 0.3) ** 2
    pixels = np.asarray(image).copy()
    region = pixels[max(y0, 0):y1, max(x0, 0):x1]  # the box clipped to the image
    top, left = max(-y0, 0), max(-x0, 0)
    mask = mask[top:top + region.shape[0], left:left + region.shape[1]]
    region[mask] = colour
    image.paste(Image.fromarray(pixels))
