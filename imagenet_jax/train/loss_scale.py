"""Dynamic loss scaling for float16 computation.

float16 keeps 10 mantissa bits but only 5 exponent bits: gradients of a few 1e-8 flush
to zero. Multiplying the loss by a large scale S lifts them into range; the gradients
are divided by S before the update. When a step overflows (a non-finite gradient)
the update is skipped and S halves; after `period` finite steps in a row S doubles.
bfloat16 has float32's exponent range and needs none of this: its scale stays 1.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

INITIAL_SCALE = 2.0**15
GROWTH_PERIOD = 2000  # finite steps in a row before the scale doubles
MIN_SCALE = 1.0       # an overflow at this scale is a real non-finite step


@flax.struct.dataclass
class LossScale:
    scale: jax.Array       # float32 scalar; 1 when not scaling
    good_steps: jax.Array  # int32 scalar: finite steps since the scale last changed

    @classmethod
    def create(cls, dynamic: bool) -> LossScale:
        return cls(scale=jnp.asarray(INITIAL_SCALE if dynamic else 1.0, jnp.float32),
                   good_steps=jnp.zeros((), jnp.int32))

    def is_overflow(self, loss_finite: jax.Array, grads_finite: jax.Array) -> jax.Array:
        """A finite loss with non-finite gradients, above the minimum scale: what a smaller
        scale can cure, so the step is skipped without alarm. A non-finite loss is not
        an overflow: no scale fixes the forward pass."""
        return loss_finite & ~grads_finite & (self.scale > MIN_SCALE)

    def adjust(self, finite: jax.Array) -> LossScale:
        """Halve after an overflow; double after GROWTH_PERIOD finite steps in a row."""
        grown = self.good_steps + 1 >= GROWTH_PERIOD
        scale = jnp.where(finite, jnp.where(grown, self.scale * 2, self.scale),
                          jnp.maximum(self.scale / 2, MIN_SCALE))
        good_steps = jnp.where(finite & ~grown, self.good_steps + 1, 0)
        return LossScale(scale=scale, good_steps=good_steps.astype(jnp.int32))
