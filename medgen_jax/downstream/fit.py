"""Training and scoring downstream models: all seeds in one program.

The study trains the same task many times: per data arm (real only, +
classical augmentation, + synthetic data, ...), per real-data fraction and
per seed. Everything that differs between those runs is *data*, not shapes:

* the real training pool is the full real training split plus, per seed, a
  padded index list of the subjects that seed may use (``real_index``,
  ``real_count``);
* the synthetic pool is padded likewise (``synthetic_count``);
* the arm is two traced scalars: the fraction of every batch drawn from the
  synthetic pool and whether classical augmentation is on.

So one jitted program per task serves every arm, fraction and seed, and
each call runs ``steps_per_call`` steps in a ``lax.scan``. Seed ``s`` starts
from the same initialisation and draws from the same real subjects in every
arm, which makes the arm comparison a paired one.
"""

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from medgen_jax import runtime
from medgen_jax.downstream.tasks import Task
from medgen_jax.train import sharding as sharding_lib
from medgen_jax.train.optim import make_optimizer
from medgen_jax.train.state import TrainState, apply_gradients, create_state

Arrays = Dict[str, jax.Array]
AugmentFn = Callable[[jax.Array, Arrays], Arrays]


class DownstreamDivergedError(FloatingPointError):
  """A downstream training loss became NaN or Inf."""


@flax.struct.dataclass
class Pools:
  """Training data of one (arm, fraction) cell, on device.

  Attributes:
    real: the full real training split ``{key: [N, ...]}``.
    real_index: ``[S, R]`` int32, per seed the usable rows of ``real``
      (padded; only the first ``real_count[s]`` are used).
    real_count: ``[S]`` int32.
    synthetic: synthetic examples ``{key: [M, ...]}`` (same keys as
      ``real``; ``M >= 1``, a dummy row when there is none).
    synthetic_count: scalar int32 (0 when the arm uses no synthetic data).
  """

  real: Arrays
  real_index: jax.Array
  real_count: jax.Array
  synthetic: Arrays
  synthetic_count: jax.Array


@flax.struct.dataclass
class Arm:
  """What one study arm changes, as traced scalars.

  Attributes:
    synthetic_fraction: float32, share of each batch drawn from the
      synthetic pool (0: real only, 1: synthetic only).
    classical: bool, apply classical augmentation to every batch.
  """

  synthetic_fraction: jax.Array
  classical: jax.Array


def make_arm(synthetic_fraction: float, classical: bool) -> Arm:
  return Arm(jnp.asarray(synthetic_fraction, jnp.float32),
             jnp.asarray(classical, jnp.bool_))


def draw_batch(rng: jax.Array, pools: Pools, real_index: jax.Array,
               real_count: jax.Array, arm: Arm, batch_size: int) -> Arrays:
  """One training batch (with replacement) mixing real and synthetic rows.

  Args:
    rng: PRNG key.
    pools: the data (this seed's ``real_index``/``real_count`` are passed
      separately).
    real_index: ``[R]`` usable rows of ``pools.real``.
    real_count: scalar, number of usable rows.
    arm: the arm.
    batch_size: ``B``.

  Returns:
    ``{key: [B, ...]}``; the first ``round(B * synthetic_fraction)`` rows
    are synthetic.
  """
  k_real, k_syn = jax.random.split(rng)
  j = jax.random.randint(k_real, (batch_size,), 0, jnp.maximum(real_count, 1))
  rows_real = real_index[j]
  rows_syn = jax.random.randint(k_syn, (batch_size,), 0,
                                jnp.maximum(pools.synthetic_count, 1))
  num_syn = jnp.round(arm.synthetic_fraction * batch_size)
  use_syn = jnp.arange(batch_size) < num_syn
  out = {}
  for k, real in pools.real.items():
    pick = use_syn.reshape((batch_size,) + (1,) * (real.ndim - 1))
    out[k] = jnp.where(pick, pools.synthetic[k][rows_syn], real[rows_real])
  return out


@dataclasses.dataclass(frozen=True)
class Fitter:
  """Jitted init / train / predict functions of one task.

  Attributes:
    task: the task.
    cfg: the task's section (``steps``, ``batch_size``, ``steps_per_call``,
      ``optim``).
    init: ``(key, example_x) -> TrainState``.
    run: ``(state, key, start, pools, real_index, real_count, arm) ->
      (state, losses [K])`` runs ``steps_per_call`` steps from ``start``.
    predict: ``(params, x [B, ...]) -> predictions [B, ...]``.
    mesh: devices the batch is split over (data parallel).
  """

  task: Task
  cfg: ml_collections.ConfigDict
  init: Callable[..., TrainState]
  run: Callable[..., Tuple[TrainState, jax.Array]]
  predict: Callable[..., jax.Array]
  mesh: jax.sharding.Mesh


def make_fitter(task: Task, cfg: ml_collections.ConfigDict,
                augment_fn: Optional[AugmentFn],
                mesh: Optional[jax.sharding.Mesh] = None) -> Fitter:
  """Builds (without compiling) the task's training programs.

  Seeds run one after another through the same compiled program: on CPUs,
  ``vmap`` over parameters turns every convolution into a grouped one,
  which XLA runs about 1.5x slower than the same work in sequence.
  """
  tx = make_optimizer(cfg.optim, cfg.steps)
  batch_size = int(cfg.batch_size)
  mesh = mesh or sharding_lib.make_mesh(
      ml_collections.ConfigDict(dict(mesh_data=-1, mesh_fsdp=1)))
  if batch_size % mesh.size:
    raise ValueError(f"{task.name}: batch_size={batch_size} must be "
                     f"divisible by the {mesh.size} devices")
  batch_sharding = sharding_lib.batch_sharding(mesh)

  def init(rng, x):
    params = task.model.init({"params": rng}, x)["params"]
    return create_state(params, tx, use_ema=False)

  def loss_fn(params, batch, rng):
    out = task.model.apply({"params": params}, task.x(batch), train=True,
                           rngs={"dropout": rng})
    return task.loss(out, batch)

  def step(state, rng, pools, real_index, real_count, arm):
    k_batch, k_aug, k_drop = jax.random.split(rng, 3)
    batch = draw_batch(k_batch, pools, real_index, real_count, arm,
                       batch_size)
    # Batches are drawn on device; split them over the mesh (data parallel).
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    if augment_fn is not None:
      batch = jax.lax.cond(arm.classical, lambda b: augment_fn(k_aug, b),
                           lambda b: b, batch)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, k_drop)
    return apply_gradients(state, tx, grads, ema=0.0, ema_warmup=0), loss

  def run(state, key, start, pools, real_index, real_count, arm):
    def body(state, i):
      return step(state, jax.random.fold_in(key, i), pools, real_index,
                  real_count, arm)
    steps = start + jnp.arange(int(cfg.steps_per_call))
    return jax.lax.scan(body, state, steps)

  def predict(params, x):
    return task.predict(task.model.apply({"params": params}, x))

  # The state lives replicated on the mesh both after init and after run:
  # with differing layouts the second call of run would compile again.
  replicated = sharding_lib.replicated(mesh)
  return Fitter(task, cfg, init=jax.jit(init, out_shardings=replicated),
                run=jax.jit(run, donate_argnums=(0,),
                            out_shardings=(replicated, replicated)),
                predict=jax.jit(predict), mesh=mesh)


def seed_keys(base_seed: int, num_seeds: int) -> List[jax.Array]:
  """One key per seed; seed ``s`` of every arm starts from the same key.

  ``rbg`` keys (see :func:`medgen_jax.runtime.init_key`): the init and
  augmentation programs compile several times faster than with threefry.
  """
  return [jax.random.fold_in(runtime.init_key(base_seed), s)
          for s in range(num_seeds)]


def fit(fitter: Fitter, pools: Pools, arm: Arm, keys: Sequence[jax.Array],
        desc: str = "fit") -> Tuple[List[TrainState], np.ndarray]:
  """Trains every seed of one cell; returns the states and losses ``[T, S]``.

  Raises:
    DownstreamDivergedError: naming the cell, seed and step, if a loss is
      NaN/Inf.
  """
  cfg = fitter.cfg
  if cfg.steps % cfg.steps_per_call:
    raise ValueError(f"{fitter.task.name}: steps={cfg.steps} must be a "
                     f"multiple of steps_per_call={cfg.steps_per_call}")
  pools = jax.device_put(pools, NamedSharding(fitter.mesh, P()))
  example = fitter.task.x({k: v[:1] for k, v in pools.real.items()})
  num_calls = cfg.steps // cfg.steps_per_call
  states, losses = [], []
  bar = runtime.progress(range(len(keys) * num_calls), len(keys) * num_calls,
                         desc=desc, leave=False)
  it = iter(bar)
  for s, key in enumerate(keys):
    state = fitter.init(key, example)
    seed_losses = []
    for call in range(num_calls):
      next(it, None)
      start = jnp.asarray(call * cfg.steps_per_call, jnp.int32)
      state, loss = fitter.run(state, key, start, pools, pools.real_index[s],
                               pools.real_count[s], arm)
      loss = np.asarray(jax.device_get(loss))
      if not np.all(np.isfinite(loss)):
        bad = int(np.argmax(~np.isfinite(loss))) + call * cfg.steps_per_call
        raise DownstreamDivergedError(
            f"{desc}: non-finite {fitter.task.name} loss at seed {s} step "
            f"{bad}; lower study.tasks.{fitter.task.name}.optim.lr or check "
            "the data")
      seed_losses.append(loss)
    states.append(state)
    losses.append(np.concatenate(seed_losses))
  bar.close()
  return states, np.stack(losses, axis=1)


def map_chunks(fn: Callable[[np.ndarray], jax.Array], x: np.ndarray,
               chunk: int = 256) -> np.ndarray:
  """``fn`` over ``x [N, ...]`` in chunks, results concatenated ``[N, ...]``.

  The last chunk is zero-padded so every call has the same shape (one
  compilation for any data-set size).
  """
  n = len(x)
  chunk = min(chunk, n)
  outs = []
  for i in range(0, n, chunk):
    part = x[i:i + chunk]
    pad = chunk - len(part)
    if pad:
      part = np.concatenate([part, np.zeros((pad,) + part.shape[1:],
                                            part.dtype)])
    outs.append(np.asarray(jax.device_get(fn(part)))[:chunk - pad])
  return np.concatenate(outs)


def predict_all(fitter: Fitter, params: Any, x: np.ndarray,
                chunk: int = 256) -> np.ndarray:
  """Predictions ``[N, ...]`` of ``params`` on ``x [N, ...]``."""
  return map_chunks(lambda part: fitter.predict(params, part), x, chunk)


def score_seeds(fitter: Fitter, states: Sequence[TrainState],
                test: Dict[str, np.ndarray]) -> List[Dict[str, float]]:
  """Held-out metrics of every seed: a list of ``S`` metric dicts."""
  x = fitter.task.x(test)
  return [fitter.task.score(predict_all(fitter, st.params, x), test)
          for st in states]
