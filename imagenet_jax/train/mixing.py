"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), on the device, inside the step.

Each global batch is mixed with itself reversed: image i with image B - 1 - i, by one
weight per batch drawn from Beta(alpha, alpha) (timm's "batch" mode). Mixup blends the
pixels; CutMix pastes a box of the partner, its area 1 - weight of the image, clipped at
the border, and the weight is then the area actually kept. With both alphas set, a batch
is mixed by one of the two with even odds. The targets mix the two one-hot labels by the
same weight. The key is the step's, so a resumed run mixes exactly as an uninterrupted one;
and the batch is global, so 1 and 8 devices mix the same pairs.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Mixed:
    images: jax.Array          # [B, H, W, C], the mixed images
    partner_labels: jax.Array  # [B], the labels of the images mixed in (the batch reversed)
    weight: jax.Array          # float32 scalar: the share of each image's own label

    def dominant_labels(self, labels: jax.Array) -> jax.Array:
        """The label holding the larger share of each target (its own on a tie)."""
        return jnp.where(self.weight >= 0.5, labels, self.partner_labels)


def mix(key: jax.Array, images: jax.Array, labels: jax.Array, *, mixup_alpha: float,
        cutmix_alpha: float) -> Mixed:
    """Mixes a batch by mixup, CutMix or either (both alphas > 0); at least one must be set."""
    if not (mixup_alpha > 0 or cutmix_alpha > 0):
        raise ValueError("mix needs mixup_alpha > 0 or cutmix_alpha > 0")
    choice_key, mixup_key, cutmix_key = jax.random.split(key, 3)
    partners = images[::-1]
    candidates = []
    if mixup_alpha > 0:
        weight = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha)
        blended = weight * images + (1 - weight) * partners.astype(images.dtype)
        candidates.append((blended.astype(images.dtype), weight))
    if cutmix_alpha > 0:
        weight = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha)
        inside, weight = cutmix_box(cutmix_key, images.shape[1], images.shape[2], weight)
        candidates.append((jnp.where(inside[None, :, :, None], partners, images), weight))
    if len(candidates) == 1:
        (mixed, weight), = candidates
    else:
        use_cutmix = jax.random.bernoulli(choice_key)
        mixed = jnp.where(use_cutmix, candidates[1][0], candidates[0][0])
        weight = jnp.where(use_cutmix, candidates[1][1], candidates[0][1])
    return Mixed(images=mixed, partner_labels=labels[::-1], weight=weight.astype(jnp.float32))


def cutmix_box(key: jax.Array, height: int, width: int, weight: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """A box of about (1 - weight) of the image's area, centred uniformly, clipped at the
    border: ([height, width] bool, True inside; the area fraction outside it)."""
    center_key = jax.random.fold_in(key, 1)
    cy, cx = jax.random.uniform(center_key, (2,)) * jnp.array([height, width])
    side = jnp.sqrt(1.0 - weight)  # the box's sides are this fraction of the image's
    half_h, half_w = side * height / 2, side * width / 2
    top, bottom = (jnp.clip(jnp.round(cy + d), 0, height) for d in (-half_h, half_h))
    left, right = (jnp.clip(jnp.round(cx + d), 0, width) for d in (-half_w, half_w))
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return inside, kept


def mixed_targets(one_hot_labels: jax.Array, mixed: Mixed) -> jax.Array:
    """The targets of a mixed batch from its (smoothed) one-hot labels [B, C]."""
    return mixed.weight * one_hot_labels + (1 - mixed.weight) * one_hot_labels[::-1]
