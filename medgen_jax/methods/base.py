"""The protocol every generative method follows, and the method registry.

A method is a small object holding static things (the Flax module, the optax
transformation, hyper-parameters) and three pure functions. The generic trainer
(`medgen_jax.train.trainer`) jits and shards them; nothing in the trainer is
specific to one method.

Batches are dicts of arrays. Images are channels-last: ``[B, H, W, C]`` in 2D,
``[B, D, H, W, C]`` in 3D. Conditioning keys (``label``, ``mask``, a source
contrast) travel in the same dict.
"""

import importlib
import pathlib
from typing import Dict, Optional, Protocol, Tuple

import jax
import ml_collections

from medgen_jax.train.state import TrainState

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


class Method(Protocol):
  """A generative method: init, one pure train step, and sampling."""

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state; ``batch`` only provides shapes."""

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """One update; pure and jit-able. Metrics are scalars (``loss`` first)."""

  def sample(self, state: TrainState, rng: jax.Array, num: int,
             cond: Optional[Batch] = None) -> Batch:
    """``num`` samples, e.g. ``{"image": [num, H, W, C]}``; jit-able."""

  # Optional: a method whose step is "gradients, then an update" can also
  # expose the halves, ``grad_step(state, batch, rng) -> (grads, metrics)``
  # and ``apply_step(state, grads) -> (state, metrics)``, with
  # ``train_step`` their composition; on CPUs the trainer then runs them as
  # two programs and compiles the update beside the gradients (see
  # ``trainer.TrainStep``).


def available() -> Tuple[str, ...]:
  """Names of the built-in methods (one module each in this package)."""
  pkg = pathlib.Path(__file__).parent
  return tuple(sorted(p.stem for p in pkg.glob("*.py")
                      if p.stem not in ("__init__", "base")))


def build(config: ml_collections.ConfigDict, example_batch: Batch) -> Method:
  """Constructs ``medgen_jax.methods.<config.method.name>.make(config, batch)``.

  Looking methods up by module name (rather than a registry filled at import
  time) keeps adding a method to one new file and keeps imports lazy.
  """
  name = config.method.name
  if name not in available():
    raise ValueError(f"unknown method {name!r}; available: {available()}")
  module = importlib.import_module(f"medgen_jax.methods.{name}")
  return module.make(config, example_batch)
