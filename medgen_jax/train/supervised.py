"""Supervised training of small networks: every seed through one program.

The in-domain encoder (:mod:`medgen_jax.eval.encoder`) and the study's
downstream tasks (:mod:`medgen_jax.downstream.fit`) train classifiers,
segmenters and translators the same way; only the task and how a batch is
drawn from the training data differ. The data live on device and batches
are drawn inside the program, so one jitted ``run`` serves every seed (and,
in the study, every data arm) of a task, and each call runs
``steps_per_call`` steps in a ``lax.scan``. Seeds run one after another
through that program: on CPUs, ``vmap`` over parameters turns every
convolution into a grouped one, which XLA runs about 1.5x slower than the
same work in sequence.
"""

import dataclasses
from typing import (Any, Callable, Dict, List, NamedTuple, Optional, Protocol,
                    Sequence, Tuple)

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medgen_jax import errors
from medgen_jax import runtime
from medgen_jax.train import sharding as sharding_lib
from medgen_jax.train.optim import make_optimizer
from medgen_jax.train.state import TrainState, apply_gradients, create_state

PyTree = Any
Arrays = Dict[str, jax.Array]
# (rng, data, batch_size) -> batch {key: [batch_size, ...]}; traced.
DrawFn = Callable[[jax.Array, PyTree, int], Arrays]
# (rng, batch, data) -> batch; traced, after the batch is split over the mesh.
AugmentFn = Callable[[jax.Array, Arrays, PyTree], Arrays]


class Task(Protocol):
  """What the trainer needs of a task (e.g. :class:`medgen_jax.eval.tasks.
  Task`)."""

  name: str
  model: nn.Module

  def x(self, batch: Arrays) -> jax.Array:
    """The network input of ``batch``."""

  def loss(self, outputs: jax.Array, batch: Arrays) -> jax.Array:
    """Mean training loss of the network's raw ``outputs``."""

  def predict(self, outputs: jax.Array) -> jax.Array:
    """Predictions from the network's raw ``outputs``."""

  # For model selection only: the metric of ``score`` to select on, and
  # whether larger is better.
  primary: str
  maximize: bool

  def score(self, pred: np.ndarray, batch: Dict[str, np.ndarray]
            ) -> Dict[str, float]:
    """Held-out metrics of predictions ``pred``."""


class DivergedError(errors.NonFiniteError):
  """A training loss became NaN or Inf."""


def draw_uniform(rng: jax.Array, data: Arrays, batch_size: int) -> Arrays:
  """A batch of rows of ``data {key: [N, ...]}`` drawn with replacement."""
  n = len(next(iter(data.values())))
  rows = jax.random.randint(rng, (batch_size,), 0, n)
  return {k: v[rows] for k, v in data.items()}


@dataclasses.dataclass(frozen=True)
class Fitter:
  """Jitted init / train / predict functions of one task.

  Attributes:
    task: the task.
    cfg: the task's settings (``steps``, ``batch_size``, ``steps_per_call``,
      ``optim``).
    init: ``(key, example_x) -> TrainState``.
    run: ``(state, key, start, data) -> (state, losses [K])`` runs
      ``steps_per_call`` steps from step ``start``, drawing batches from
      ``data``.
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
                draw: DrawFn = draw_uniform,
                augment: Optional[AugmentFn] = None,
                mesh: Optional[jax.sharding.Mesh] = None) -> Fitter:
  """Builds (without compiling) the task's training programs.

  Args:
    task: the task.
    cfg: ``steps``, ``batch_size``, ``steps_per_call`` and ``optim``.
    draw: draws one training batch from the ``data`` passed to ``run``;
      the default draws rows of a dict of arrays uniformly.
    augment: applied to every drawn batch, if given.
    mesh: devices to split batches over; default all, data parallel.
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

  def step(state, rng, data):
    k_batch, k_aug, k_drop = jax.random.split(rng, 3)
    batch = draw(k_batch, data, batch_size)
    # Batches are drawn on device; split them over the mesh (data parallel).
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    if augment is not None:
      batch = augment(k_aug, batch, data)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, k_drop)
    return apply_gradients(state, tx, grads, ema=0.0, ema_warmup=0), loss

  def run(state, key, start, data):
    def body(state, i):
      return step(state, jax.random.fold_in(key, i), data)
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
  """One key per seed; seed ``s`` of every caller starts from the same key.

  ``rbg`` keys (see :func:`medgen_jax.runtime.init_key`): the init and
  augmentation programs compile several times faster than with threefry.
  """
  return [jax.random.fold_in(runtime.init_key(base_seed), s)
          for s in range(num_seeds)]


class FitResult(NamedTuple):
  """What :func:`fit` returns.

  Attributes:
    states: one per seed; with model selection, holding the selected
      parameters.
    losses: ``[T, S]`` training losses.
    selected: per seed ``{"step", "score", "curve"}``: the step whose
      parameters were kept, their validation score (the task's primary
      metric) and the score after every ``steps_per_call`` steps; empty
      without model selection.
  """

  states: List[TrainState]
  losses: np.ndarray
  selected: List[Dict[str, float]]


def _validation_score(fitter: Fitter, params: Any,
                      validation: Dict[str, np.ndarray]) -> float:
  """The primary metric of ``params`` on ``validation``, oriented so that
  larger is better (``nan`` counts as worst)."""
  task = fitter.task
  scores = task.score(predict_all(fitter, params, task.x(validation)),
                      validation)
  value = float(scores[task.primary])
  if not np.isfinite(value):
    return -np.inf
  return value if task.maximize else -value


def fit(fitter: Fitter, keys: Sequence[jax.Array], data: Sequence[PyTree],
        example: Arrays, desc: str = "fit", lr_key: str = "optim.lr",
        validation: Optional[Dict[str, np.ndarray]] = None) -> FitResult:
  """Trains one model per key.

  Args:
    fitter: the task's programs.
    keys: one PRNG key per seed (init, batches, dropout).
    data: per seed, what ``fitter.run`` draws batches from; placed
      replicated on the mesh (parts already there are not copied).
    example: a batch of one example, for the parameter shapes.
    desc: progress bar label, also in the error message.
    lr_key: the setting to lower when training diverges, for the message.
    validation: held-out arrays for model selection: each seed's
      parameters are scored on them after every ``steps_per_call`` steps
      and the best are kept (early stopping without stopping: every arm
      gets the same budget and its best point of it).

  Raises:
    DivergedError: naming the seed and step, if a loss is NaN/Inf.
  """
  cfg = fitter.cfg
  if cfg.steps % cfg.steps_per_call:
    raise ValueError(f"{fitter.task.name}: steps={cfg.steps} must be a "
                     f"multiple of steps_per_call={cfg.steps_per_call}")
  example_x = fitter.task.x(example)
  replicated = sharding_lib.replicated(fitter.mesh)
  num_calls = cfg.steps // cfg.steps_per_call
  states, losses, selected = [], [], []
  bar = runtime.progress(range(len(keys) * num_calls), len(keys) * num_calls,
                         desc=desc, leave=False)
  it = iter(bar)
  for s, key in enumerate(keys):
    seed_data = jax.device_put(data[s], replicated)
    state = fitter.init(key, example_x)
    seed_losses = []
    best, curve = None, []  # best: (score, step, host copy of params)
    for call in range(num_calls):
      next(it, None)
      start = jnp.asarray(call * cfg.steps_per_call, jnp.int32)
      state, loss = fitter.run(state, key, start, seed_data)
      loss = np.asarray(jax.device_get(loss))
      if not np.all(np.isfinite(loss)):
        bad = int(np.argmax(~np.isfinite(loss))) + call * cfg.steps_per_call
        raise DivergedError(
            f"{desc}: non-finite {fitter.task.name} loss at seed {s} step "
            f"{bad}; lower {lr_key} or check the data")
      seed_losses.append(loss)
      if validation is not None:
        score = _validation_score(fitter, state.params, validation)
        curve.append(score)
        if best is None or score > best[0]:
          # A host copy: the next call donates the state's buffers.
          best = (score, (call + 1) * cfg.steps_per_call,
                  jax.device_get(state.params))
    if best is not None:
      sign = 1 if fitter.task.maximize else -1
      state = state.replace(params=jax.device_put(best[2], replicated))
      selected.append({"step": best[1], "score": sign * best[0],
                       "curve": [sign * c for c in curve]})
    states.append(state)
    losses.append(np.concatenate(seed_losses))
  bar.close()
  return FitResult(states, np.stack(losses, axis=1), selected)


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
