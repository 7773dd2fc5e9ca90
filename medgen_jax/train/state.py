"""Training state shared by every method.

A method owns its losses and optimizers; the trainer owns sharding, jit,
checkpointing and logging. Everything the trainer needs to save and restore
lives in this one pytree.

One state serves one network with one optimizer (DDPM, a VAE) as well as
several networks with one optimizer each (a GAN's generator and
discriminator, an autoencoder with a patch discriminator): ``params`` and
``opt_state`` are then dicts keyed by sub-network, each sub-network is
updated with :func:`update_subnet`, and :func:`advance` closes the trainer
step (EMA, step counter) once, however many updates it held.
"""

from typing import Any, Mapping, Union

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any
Optimizers = Union[optax.GradientTransformation,
                   Mapping[str, optax.GradientTransformation]]


@flax.struct.dataclass
class TrainState:
  """Pure training state.

  Attributes:
    step: scalar int32, trainer steps completed (one per ``train_step``,
      however many optimizer updates the step held).
    params: model parameters; a dict of sub-networks for multi-network
      methods (e.g. ``{"gen": ..., "disc": ...}``).
    opt_state: optax state of ``params``; for several optimizers a dict with
      the same keys as the sub-networks they update.
    ema_params: exponential moving average of ``params[ema_of]`` (of all
      ``params`` when ``ema_of`` is ""), or ``None`` without EMA.
    model_state: non-trainable variables the method updates itself (batch
      statistics, a VQ codebook's EMA counts), or an empty dict.
    frozen: inputs loaded from another run (a stage-1 autoencoder, a
      feature network): read by the step, never updated, and left out of
      checkpoints (see :mod:`medgen_jax.train.frozen`); ``None`` without.
    ema_of: which sub-network the EMA follows ("" = all of ``params``);
      static.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  ema_params: PyTree
  model_state: PyTree
  frozen: PyTree = None
  ema_of: str = flax.struct.field(pytree_node=False, default="")


def _ema_source(params: PyTree, ema_of: str) -> PyTree:
  return params[ema_of] if ema_of else params


def create_state(params: PyTree, tx: Optimizers, use_ema: bool,
                 model_state: PyTree = None, ema_of: str = "") -> TrainState:
  """The initial state of ``params`` optimised by ``tx``.

  Args:
    params: the parameters (a dict of sub-networks for several optimizers).
    tx: one optax transformation, or a dict ``{sub-network: transformation}``
      whose keys are a subset of ``params``'s.
    use_ema: keep an EMA of ``params[ema_of]``.
    model_state: non-trainable variables.
    ema_of: the sub-network the EMA follows ("" = all parameters).
  """
  if isinstance(tx, Mapping):
    missing = sorted(set(tx) - set(params))
    if missing:
      raise ValueError(f"optimizers for {missing} but params has only "
                       f"{sorted(params)}")
    opt_state = {k: t.init(params[k]) for k, t in tx.items()}
  else:
    opt_state = tx.init(params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=opt_state,
      ema_params=(jax.tree.map(jnp.copy, _ema_source(params, ema_of))
                  if use_ema else None),
      model_state={} if model_state is None else model_state,
      ema_of=ema_of,
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


def update_subnet(state: TrainState, name: str,
                  tx: optax.GradientTransformation,
                  grads: PyTree) -> TrainState:
  """One optimizer update of ``params[name]`` with its own optimizer state;
  the step counter and the EMA wait for :func:`advance`."""
  updates, opt = tx.update(grads, state.opt_state[name], state.params[name])
  params = dict(state.params)
  params[name] = optax.apply_updates(state.params[name], updates)
  opt_state = dict(state.opt_state)
  opt_state[name] = opt
  return state.replace(params=params, opt_state=opt_state)


def advance(state: TrainState, ema: float, ema_warmup: int,
            **changes) -> TrainState:
  """Closes a trainer step: EMA of ``params[ema_of]``, ``step + 1``, and
  the fields in ``changes`` replaced."""
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = ema_update(ema_params,
                            _ema_source(state.params, state.ema_of),
                            ema_decay(state.step, ema, ema_warmup))
  return state.replace(step=state.step + 1, ema_params=ema_params, **changes)


def apply_gradients(state: TrainState, tx: optax.GradientTransformation,
                    grads: PyTree, ema: float, ema_warmup: int,
                    **changes) -> TrainState:
  """One optimizer update of all parameters plus :func:`advance`."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return advance(state.replace(params=params, opt_state=opt_state), ema,
                 ema_warmup, **changes)


def eval_params(state: TrainState, which: str = "ema") -> PyTree:
  """The parameters sampling and evaluation use: ``params`` with the EMA
  sub-tree in place of the one it follows (``which="ema"``, when there is
  an EMA), or the optimised ``params`` as they are (``which="raw"``)."""
  if which == "raw" or state.ema_params is None:
    return state.params
  if not state.ema_of:
    return state.ema_params
  return {**state.params, state.ema_of: state.ema_params}


def with_eval_params(state: TrainState, which: str = "ema") -> TrainState:
  """``state`` whose ``params`` are :func:`eval_params` (for methods'
  ``loss``, ``reconstruct`` and ``sample``, which read ``state.params``
  the same way whether they see the EMA or not)."""
  return state.replace(params=eval_params(state, which), ema_params=None)


def for_checkpoint(state: TrainState) -> TrainState:
  """What a checkpoint holds: everything but the frozen inputs."""
  return state.replace(frozen=None) if state.frozen is not None else state

