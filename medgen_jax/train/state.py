"""Training state shared by every method.

A method owns its losses and optimizers; the trainer owns sharding, jit,
checkpointing and logging. Everything the trainer needs to save and restore
lives in this one pytree.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Pure training state.

  Attributes:
    step: scalar int32, number of optimizer updates applied so far.
    params: model parameters. GAN-like methods keep a dict of sub-models here
      (e.g. ``{"gen": ..., "disc": ...}``).
    opt_state: optax state for ``params`` (a dict of states for several
      optimizers).
    ema_params: exponential moving average of ``params`` used for sampling
      and evaluation, or ``None`` when EMA is disabled.
    model_state: non-trainable collections (e.g. batch statistics), or an
      empty dict.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  ema_params: PyTree
  model_state: PyTree


def create_state(params: PyTree, tx: optax.GradientTransformation,
                 use_ema: bool, model_state: PyTree = None) -> TrainState:
  """Builds the initial state for ``params`` optimised by ``tx``."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
      model_state={} if model_state is None else model_state,
  )


def ema_update(ema: PyTree, new: PyTree, decay: jax.Array) -> PyTree:
  """``ema <- decay * ema + (1 - decay) * new``, leaf by leaf."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, new)


def ema_decay(step: jax.Array, decay: float, warmup_steps: int) -> jax.Array:
  """EMA decay with a warm-up, so early averages are not stuck at init.

  Uses ``min(decay, (1 + step) / (warmup_steps + step))`` style ramp
  (``warmup_steps=0`` disables the ramp).
  """
  if warmup_steps <= 0:
    return jnp.asarray(decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (warmup_steps + step))


def apply_gradients(state: TrainState, tx: optax.GradientTransformation,
                    grads: PyTree, ema: float, ema_warmup: int,
                    **changes) -> TrainState:
  """One optimizer update plus EMA; extra fields are replaced via ``changes``."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = ema_update(ema_params, params,
                            ema_decay(state.step, ema, ema_warmup))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema_params, **changes)
