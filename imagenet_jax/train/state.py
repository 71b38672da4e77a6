"""The train state: a pytree of arrays, created directly in its sharded layout.

The NNX model is split once into a static `GraphDef` (the architecture) and plain
nested dicts of arrays (`params`, and `model_state` for everything else: BatchNorm
statistics). Only the arrays flow through `jax.jit`, are donated, and are saved in
checkpoints; the step rebuilds the module from them with `nnx.merge`.

Where each array lives is `state_shardings`: replicated for pure data parallelism, or
parameters and their optimizer state split over the mesh's `fsdp` axis by the rules of
parallel/sharding.py.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from imagenet_jax.parallel import compiler_options, replicated
from imagenet_jax.parallel.sharding import ShardingRules, follow_params, param_shardings
from imagenet_jax.train.loss_scale import LossScale


@flax.struct.dataclass
class Ema:
    """Exponential moving averages of the parameters and of the other model variables
    (BatchNorm statistics), as Polyak averaging of the whole model (timm's ModelEma)."""

    params: dict
    model_state: dict

    def update(self, params: dict, model_state: dict, decay: float) -> Ema:
        def average(mean, value):
            return decay * mean + (1 - decay) * value.astype(mean.dtype)

        return Ema(params=jax.tree.map(average, self.params, params),
                   model_state=jax.tree.map(average, self.model_state, model_state))


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer updates applied so far
    params: dict             # nnx.Param values
    model_state: dict        # every other variable (BatchNorm mean/var)
    opt_state: optax.OptState
    rng: jax.Array           # uint32[2] root key; step keys are fold_in(rng, step)
    loss_scale: LossScale    # float16's dynamic loss scale; a constant 1 otherwise
    # config.ema_decay's averages; None (no arrays: checkpoints as before EMA) when off.
    ema: Ema | None = None

    def with_ema_weights(self) -> TrainState:
        """This state with the EMA's parameters and statistics in place of the model's."""
        return self.replace(params=self.ema.params, model_state=self.ema.model_state)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)


def create_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module],
                       tx: optax.GradientTransformation, mesh: Mesh, seed: int, *,
                       rules: ShardingRules | None = None, dynamic_loss_scale: bool = False,
                       ema: bool = False, portable_cpu_math: bool = False
                       ) -> tuple[nnx.GraphDef, TrainState]:
    """Initialises the model and optimizer on the devices, laid out by `state_shardings`.

    `jax.jit(..., out_shardings=...)` makes every array where it will live: no
    process ever holds an unsharded host copy of the parameters, nor, under fsdp, a
    whole copy on any device.
    """
    root = jax.random.PRNGKey(seed)
    init_key, train_key = jax.random.split(root)

    def init() -> TrainState:
        _, params, model_state = split_model(model_fn(nnx.Rngs(params=init_key)))
        # The averages start at the initial weights, as copies (the state is donated whole).
        averages = (Ema(params=jax.tree.map(jnp.copy, params),
                        model_state=jax.tree.map(jnp.copy, model_state)) if ema else None)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          model_state=model_state, opt_state=tx.init(params), rng=train_key,
                          loss_scale=LossScale.create(dynamic_loss_scale), ema=averages)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    shardings = state_shardings(jax.eval_shape(init), mesh, rules)
    return graphdef, jax.jit(init, out_shardings=shardings,
                             compiler_options=compiler_options(mesh, portable_cpu_math,
                                                              runs_once=True))()


def state_shardings(abstract_state: TrainState, mesh: Mesh,
                    rules: ShardingRules | None = None) -> TrainState:
    """The sharding of every array of the state, by `rules` (default: ShardingRules()).

    Parameters follow the rules; optimizer state follows its parameters; BatchNorm
    statistics, the step and the RNG key are replicated. Without an `fsdp` axis larger
    than 1 and without overrides, everything is replicated: pure data parallelism.
    """
    rules = ShardingRules() if rules is None else rules
    params = param_shardings(abstract_state.params, mesh, rules)
    everywhere = jax.tree.map(lambda _: replicated(mesh), abstract_state)
    return everywhere.replace(
        params=params,
        opt_state=follow_params(abstract_state.opt_state, abstract_state.params, params, mesh),
        ema=None if abstract_state.ema is None else everywhere.ema.replace(params=params))


def shardings_of(state: TrainState) -> TrainState:
    """The shardings `state`'s arrays already have: a step compiled for them moves nothing."""
    return jax.tree.map(lambda x: x.sharding, state)
