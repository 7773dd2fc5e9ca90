"""In-domain feature extractor for FID/KID, precision/recall and memorization.

ImageNet Inception features describe brain MRI poorly (FID > 100 for good
models is common), so every study also trains one small ResNet classifier
on the real training split and uses its pooled penultimate layer as the
feature space. A data set without labels (fewer than two classes) trains
it on a label-free pretext task instead: which of four in-plane rotations
was applied (Gidaris et al., 2018), learnable because scans have a
canonical orientation. It is trained once, saved with orbax beside a JSON
card that records exactly what it is (architecture, inputs, pretext task,
normalisation, training data, steps, held-out accuracy), and reused: every
FID of a study uses the same features.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from medgen_jax.eval import tasks as tasks_lib
from medgen_jax.train import supervised

PyTree = Any
CARD = "encoder.json"


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A trained in-domain encoder.

  Attributes:
    task: the classification task whose model is the encoder.
    params: its parameters.
    card: what it is (stored beside every number computed with it).
  """

  task: tasks_lib.Task
  params: PyTree
  card: Dict[str, Any]

  def features(self, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Pooled penultimate features ``[N, D]`` of images ``[N, *spatial, C]``
    (normalised like the training data; extra mask channels are ignored)."""
    return _features(self.task.model, self.params,
                     np.asarray(images)[..., list(self.task.inputs)], chunk)


def _features(model, params, x: np.ndarray, chunk: int) -> np.ndarray:
  fn = _jitted_features(model)
  return supervised.map_chunks(lambda part: fn(params, part), x,
                               chunk).astype(np.float64)


_FEATURE_FNS: Dict[Any, Any] = {}


def _jitted_features(model):
  # Flax modules are hashable dataclasses: one compiled function per model.
  if model not in _FEATURE_FNS:
    _FEATURE_FNS[model] = jax.jit(lambda p, x: model.apply(
        {"params": p}, x, return_features=True)[1])
  return _FEATURE_FNS[model]


def fingerprint(arrays: Dict[str, np.ndarray]) -> str:
  """A short hash of training data, so a cached encoder is never reused on
  other data."""
  h = hashlib.sha256()
  for k in sorted(arrays):
    a = np.ascontiguousarray(arrays[k])
    h.update(k.encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


ROTATIONS = 4


def pretext(cfg: ml_collections.ConfigDict) -> str:
  """``label`` (classify the data set's classes) or ``rotation`` (no
  labels: predict the in-plane rotation)."""
  return "label" if cfg.num_classes >= 2 else "rotation"


def rotated(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The rotation pretext set: every image ``[N, *spatial, C]`` turned by
  0, 90, 180 and 270 degrees in its last two spatial axes (the slice plane
  of volumes), labelled 0..3: ``image`` ``[4N, *spatial, C]``, ``label``
  ``[4N]``."""
  x = np.asarray(arrays["image"])
  axes = (x.ndim - 3, x.ndim - 2)
  if x.shape[axes[0]] != x.shape[axes[1]]:
    raise ValueError(f"the rotation pretext needs square slices, got "
                     f"images of shape {x.shape[1:]}")
  return dict(image=np.concatenate([np.rot90(x, k, axes)
                                    for k in range(ROTATIONS)]),
              label=np.repeat(np.arange(ROTATIONS, dtype=np.int32), len(x)))


def _task_config(cfg: ml_collections.ConfigDict,
                 contrasts) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      kind="classification", inputs=tuple(contrasts), target="label",
      num_classes=(cfg.num_classes if pretext(cfg) == "label"
                   else ROTATIONS),
      model=dict(width=cfg.width, stage_sizes=tuple(cfg.stage_sizes),
                 num_groups=cfg.num_groups),
      conv_lowering=cfg.get("conv_lowering", "auto")))


def train_or_load(cfg: ml_collections.ConfigDict, contrasts, spatial_dims: int,
                  train: Dict[str, np.ndarray], held_out: Dict[str, np.ndarray],
                  directory: str, extra_card: Optional[Dict[str, Any]] = None
                  ) -> Encoder:
  """Loads the encoder in ``directory`` if it was trained on the same data
  with the same settings; otherwise trains it on ``train`` and saves it.

  Args:
    cfg: ``width``, ``stage_sizes``, ``num_groups``, ``num_classes``,
      ``steps``, ``steps_per_call``, ``batch_size``, ``optim``, ``seed``.
    contrasts: the image channels (all are encoder inputs).
    spatial_dims: 2 or 3.
    train: real training arrays (``image``, and ``label`` unless the
      data set has no classes).
    held_out: real held-out arrays, for the accuracy recorded in the card.
    directory: where the encoder lives.
    extra_card: more provenance to record (data set, normalisation...).
  """
  task = tasks_lib.make_task("encoder", _task_config(cfg, contrasts),
                             list(contrasts), spatial_dims)
  kind = pretext(cfg)
  if kind == "rotation":
    train, held_out = rotated(train), rotated(held_out)
  settings = dict(arch="ResNet", width=cfg.width, pretext=kind,
                  stage_sizes=list(cfg.stage_sizes),
                  num_groups=cfg.num_groups, inputs=list(contrasts),
                  steps=cfg.steps, batch_size=cfg.batch_size,
                  lr=cfg.optim.lr, seed=cfg.seed,
                  train_fingerprint=fingerprint(
                      {"image": train["image"], "label": train["label"]}))
  card_path = os.path.join(directory, CARD)
  params_dir = os.path.join(os.path.abspath(directory), "params")
  if os.path.exists(card_path):
    try:
      with open(card_path, encoding="utf-8") as f:
        card = json.load(f)
      if card.get("settings") == settings:
        abstract = jax.eval_shape(
            lambda: task.model.init(jax.random.key(0),
                                    task.x({"image": train["image"][:1]}))
            ["params"])
        params = ocp.StandardCheckpointer().restore(params_dir, abstract)
        return Encoder(task, params, card)
    except Exception as e:  # pylint: disable=broad-except
      # JSON, unicode, orbax and TensorStore errors alike: a cache, retrain.
      logging.warning("%s: damaged feature-extractor cache (%s: %s); "
                      "training it again", directory, type(e).__name__,
                      " ".join(str(e).split())[:300])
  fitter = supervised.make_fitter(task, cfg)
  data = {"image": jnp.asarray(train["image"]),
          "label": jnp.asarray(train["label"])}
  states, losses, _ = supervised.fit(
      fitter, supervised.seed_keys(cfg.seed, 1), [data],
      {"image": train["image"][:1]}, desc="encoder",
      lr_key="encoder.optim.lr")
  params = states[0].params
  scores = supervised.score_seeds(fitter, states, held_out)[0]
  card = dict(settings=settings, held_out_scores=scores,
              final_loss=float(losses[-10:].mean()),
              feature_dim=int(cfg.width * 2 ** (len(cfg.stage_sizes) - 1)),
              description=(
                  "pooled penultimate layer of a GroupNorm ResNet trained "
                  + ("to classify the real training split"
                     if kind == "label" else
                     "to tell which of 4 in-plane rotations was applied to "
                     "the real training split (the data set has no labels)")
                  + "; inputs are the normalised contrasts "
                  + "+".join(contrasts)),
              **(extra_card or {}))
  os.makedirs(directory, exist_ok=True)
  # Every process trained the same encoder; orbax's save is collective
  # (``force``: process 0 replaces a stale cache), the card is process 0's.
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(params_dir, params, force=True)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:
    tmp = card_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(card, f, indent=2, sort_keys=True)
    os.replace(tmp, card_path)  # the card last: a card means a whole save.
  return Encoder(task, params, card)
