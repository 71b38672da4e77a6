"""The train state: a pytree of arrays, created directly in its sharded layout.

The NNX model is split once into a static `GraphDef` (the architecture) and plain
nested dicts of arrays (`params`, and `model_state` for everything else: BatchNorm
statistics). Only the arrays flow through `jax.jit`, are donated, and are saved in
checkpoints; the step rebuilds the module from them with `nnx.merge`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from imagenet_jax.parallel import replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer updates applied so far
    params: dict             # nnx.Param values
    model_state: dict        # every other variable (BatchNorm mean/var)
    opt_state: optax.OptState
    rng: jax.Array           # uint32[2] root key; step keys are fold_in(rng, step)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), model_state.to_pure_dict()


def create_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module],
                       tx: optax.GradientTransformation, mesh: Mesh, seed: int
                       ) -> tuple[nnx.GraphDef, TrainState]:
    """Initialises the model and optimizer on the devices, replicated over `mesh`.

    `jax.jit(..., out_shardings=...)` makes every array where it will live: no
    process ever holds an unsharded host copy of the parameters.
    """
    root = jax.random.PRNGKey(seed)
    init_key, train_key = jax.random.split(root)

    def init() -> TrainState:
        _, params, model_state = split_model(model_fn(nnx.Rngs(params=init_key)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          model_state=model_state, opt_state=tx.init(params), rng=train_key)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    shardings = state_shardings(jax.eval_shape(init), mesh)
    return graphdef, jax.jit(init, out_shardings=shardings)()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Pure data parallelism: every array of the state replicated on every device."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
