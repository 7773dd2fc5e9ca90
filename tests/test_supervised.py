"""The generic supervised trainer, on a task that is not one of eval.tasks."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medgen_jax.train import supervised


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(2)(x)


@dataclasses.dataclass(frozen=True)
class _SignTask:
  """Classifies the sign of the first feature."""

  name: str = "sign"
  model: nn.Module = _Linear()
  primary: str = "accuracy"
  maximize: bool = True

  def x(self, batch):
    return batch["x"]

  def loss(self, outputs, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
        outputs, batch["y"]).mean()

  def predict(self, outputs):
    return jnp.argmax(outputs, -1)

  def score(self, pred, batch):
    return {"accuracy": float(np.mean(pred == batch["y"]))}


def _cfg(lr):
  return ml_collections.ConfigDict(dict(
      steps=40, steps_per_call=20, batch_size=16,
      optim=dict(name="adamw", lr=lr, schedule="constant", warmup_steps=0,
                 final_lr_frac=1.0, weight_decay=0.0, b1=0.9, b2=0.999,
                 grad_clip=0.0)))


def _data(n):
  x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
  return {"x": x, "y": (x[:, 0] > 0).astype(np.int32)}


def test_fit_learns_and_seeds_are_reproducible():
  train, test = _data(64), _data(50)
  fitter = supervised.make_fitter(_SignTask(), _cfg(0.1))
  keys = supervised.seed_keys(0, 2)
  data = {k: jnp.asarray(v) for k, v in train.items()}
  states, losses, selected = supervised.fit(
      fitter, keys + keys[:1], [data] * 3, {"x": train["x"][:1]})
  assert selected == []  # no validation set, no model selection
  assert losses.shape == (40, 3)
  assert losses[-5:].mean() < 0.5 * losses[:5].mean()
  np.testing.assert_array_equal(losses[:, 0], losses[:, 2])
  assert not np.array_equal(losses[:, 0], losses[:, 1])
  # 50 test rows in chunks of 256: one padded call, 50 predictions.
  scores = supervised.score_seeds(fitter, states, test)
  assert len(scores) == 3 and all(s["accuracy"] > 0.8 for s in scores)


def test_model_selection_keeps_the_best_validation_checkpoint():
  train = _data(64)
  # Labels the training data contradicts: validation accuracy falls as the
  # model learns, so the best checkpoint is an early one, not the last.
  flipped = dict(train, y=1 - train["y"])
  cfg = _cfg(0.1)
  cfg.update(steps=40, steps_per_call=5)
  fitter = supervised.make_fitter(_SignTask(), cfg)
  data = {k: jnp.asarray(v) for k, v in train.items()}
  states, _, selected = supervised.fit(
      fitter, supervised.seed_keys(0, 2), [data] * 2, {"x": train["x"][:1]},
      validation=flipped)
  for state, sel in zip(states, selected):
    assert len(sel["curve"]) == 8
    assert sel["score"] == max(sel["curve"])
    assert sel["step"] == 5 * (int(np.argmax(sel["curve"])) + 1)
    assert sel["step"] < 40 and sel["curve"][-1] < sel["score"]
    # The returned parameters are the selected ones.
    again = supervised.score_seeds(fitter, [state], flipped)[0]["accuracy"]
    assert again == sel["score"]


def test_map_chunks_pads_the_last_chunk():
  shapes = []

  def fn(part):
    shapes.append(part.shape)
    return part * 2

  out = supervised.map_chunks(fn, np.arange(10.0).reshape(10, 1), chunk=4)
  np.testing.assert_array_equal(out.ravel(), np.arange(10.0) * 2)
  assert shapes == [(4, 1)] * 3


def test_divergence_names_the_setting_to_lower():
  train = _data(32)
  fitter = supervised.make_fitter(_SignTask(), _cfg(float("nan")))
  with pytest.raises(supervised.DivergedError,
                     match=r"non-finite sign loss at seed 0 step 1; lower "
                           r"encoder\.optim\.lr"):
    supervised.fit(fitter, supervised.seed_keys(0, 1),
                   [{k: jnp.asarray(v) for k, v in train.items()}],
                   {"x": train["x"][:1]}, lr_key="encoder.optim.lr")
