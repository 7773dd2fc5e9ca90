"""Training and scoring downstream models: all arms and seeds in one program.

The study trains the same task many times: per data arm (real only, +
classical augmentation, + synthetic data, ...), per real-data fraction and
per seed. Everything that differs between those runs is *data*, not shapes:

* the real training pool is the full real training split plus, per seed, a
  padded index list of the subjects that seed may use (``real_index``,
  ``real_count``);
* the synthetic pool is padded likewise (``synthetic_count``);
* the arm is two traced scalars: the fraction of every batch drawn from the
  synthetic pool and whether classical augmentation is on.

So one jitted program per task (:mod:`medgen_jax.train.supervised`) serves
every arm, fraction and seed. Seed ``s`` starts from the same
initialisation and draws from the same real subjects in every arm, which
makes the arm comparison a paired one.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from medgen_jax.eval.tasks import Task
from medgen_jax.train import supervised
from medgen_jax.train.state import TrainState
# The study reaches these through this module.
from medgen_jax.train.supervised import (  # pylint: disable=unused-import
    Fitter, predict_all, score_seeds, seed_keys)

Arrays = Dict[str, jax.Array]
AugmentFn = Callable[[jax.Array, Arrays, jax.Array], Arrays]


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
    classical_strength: float32, the multiplier of every augmentation
      probability (chosen on validation by the study).
  """

  synthetic_fraction: jax.Array
  classical: jax.Array
  classical_strength: jax.Array


def make_arm(synthetic_fraction: float, classical: bool,
             classical_strength: float = 1.0) -> Arm:
  return Arm(jnp.asarray(synthetic_fraction, jnp.float32),
             jnp.asarray(classical, jnp.bool_),
             jnp.asarray(classical_strength, jnp.float32))


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


class _SeedData(NamedTuple):
  """What one seed's training program draws its batches from."""

  pools: Pools
  real_index: jax.Array
  real_count: jax.Array
  arm: Arm


def _draw(rng: jax.Array, data: _SeedData, batch_size: int) -> Arrays:
  return draw_batch(rng, data.pools, data.real_index, data.real_count,
                    data.arm, batch_size)


def make_fitter(task: Task, cfg: ml_collections.ConfigDict,
                augment_fn: Optional[AugmentFn],
                mesh: Optional[jax.sharding.Mesh] = None
                ) -> supervised.Fitter:
  """Builds (without compiling) the task's training programs; classical
  augmentation (``augment_fn``) runs where the arm turns it on."""
  augment = None
  if augment_fn is not None:
    def augment(rng, batch, data):
      return jax.lax.cond(
          data.arm.classical,
          lambda b: augment_fn(rng, b, data.arm.classical_strength),
          lambda b: b, batch)
  return supervised.make_fitter(task, cfg, _draw, augment, mesh)


def fit(fitter: supervised.Fitter, pools: Pools, arm: Arm,
        keys: Sequence[jax.Array], desc: str = "fit",
        validation: Optional[Dict[str, np.ndarray]] = None
        ) -> supervised.FitResult:
  """Trains every seed of one cell (keeping each seed's best parameters on
  ``validation`` when given, see :func:`supervised.fit`).

  Raises:
    supervised.DivergedError: naming the cell, seed and step, if a loss is
      NaN/Inf.
  """
  # Placed once: every seed's data shares the pools.
  pools = jax.device_put(pools, NamedSharding(fitter.mesh, P()))
  data = [_SeedData(pools, pools.real_index[s], pools.real_count[s], arm)
          for s in range(len(keys))]
  example = {k: v[:1] for k, v in pools.real.items()}
  return supervised.fit(fitter, keys, data, example, desc=desc,
                        lr_key=f"study.tasks.{fitter.task.name}.optim.lr",
                        validation=validation)
