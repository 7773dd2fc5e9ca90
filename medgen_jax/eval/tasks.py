"""Supervised tasks: classification, segmentation and translation.

A :class:`Task` bundles what differs between them: which image channels are
the input, what the target is, the network, the loss, and the metrics on
held-out data. Training itself (:mod:`medgen_jax.train.supervised`) is the
same for every task. The in-domain encoder (:mod:`medgen_jax.eval.encoder`)
is a classification task; the augmentation study scores all three kinds.

Batches are dicts of arrays: ``image [B, *spatial, C]`` (normalised, channels
in the study's ``contrasts`` order), ``label [B]`` and masks
``[B, *spatial]`` (e.g. ``lesion_mask``).
"""

import dataclasses
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medgen_jax.eval import classification as cls_metrics
from medgen_jax.eval import image as image_metrics
from medgen_jax.eval import segmentation as seg_metrics
from medgen_jax.nn.classifier import ResNet
from medgen_jax.nn.segmenter import SegUNet

Batch = Dict[str, jax.Array]
KINDS = ("classification", "segmentation", "translation")


@dataclasses.dataclass(frozen=True)
class Task:
  """One supervised task.

  Attributes:
    name: the task's key in ``config.study.tasks``.
    kind: ``classification``, ``segmentation`` or ``translation``.
    inputs: channel indices of ``image`` fed to the network.
    target: ``"label"``, a mask key, or (translation) a channel index.
    num_classes: classes (classification/segmentation); 0 for translation.
    model: the Flax network.
    primary: the metric the study's plots and headline use.
  """

  name: str
  kind: str
  inputs: Tuple[int, ...]
  target: str | int
  num_classes: int
  model: nn.Module
  primary: str

  @property
  def maximize(self) -> bool:
    """Whether a larger :attr:`primary` is better."""
    return higher_is_better(self.primary)

  def x(self, batch: Batch) -> jax.Array:
    """Network input ``[B, *spatial, len(inputs)]``."""
    return batch["image"][..., list(self.inputs)]

  def loss(self, outputs: jax.Array, batch: Batch) -> jax.Array:
    """Mean training loss of ``outputs`` (the network's raw output)."""
    if self.kind == "classification":
      return optax.softmax_cross_entropy_with_integer_labels(
          outputs, batch["label"]).mean()
    if self.kind == "segmentation":
      return segmentation_loss(outputs, batch[self.target], self.num_classes)
    target = batch["image"][..., self.target]
    return jnp.abs(outputs[..., 0] - target).mean()

  def predict(self, outputs: jax.Array) -> jax.Array:
    """Class probabilities ``[B, K]``, label maps ``[B, *spatial]`` (int32)
    or translated images ``[B, *spatial]``."""
    if self.kind == "classification":
      return jax.nn.softmax(outputs, axis=-1)
    if self.kind == "segmentation":
      return jnp.argmax(outputs, axis=-1).astype(jnp.int32)
    return jnp.clip(outputs[..., 0], -1.0, 1.0)

  def score(self, pred: np.ndarray, batch: Dict[str, np.ndarray]
            ) -> Dict[str, float]:
    """Held-out metrics of predictions ``pred`` (from :meth:`predict`)."""
    if self.kind == "classification":
      return classification_scores(pred, batch["label"], self.num_classes)
    if self.kind == "segmentation":
      return segmentation_scores(pred, batch[self.target], self.num_classes)
    return translation_scores(pred, batch["image"][..., self.target],
                              batch["image"][..., self.target] > -1.0 + 1e-3)


def segmentation_loss(logits: jax.Array, target: jax.Array,
                      num_classes: int) -> jax.Array:
  """Cross-entropy plus soft Dice over the foreground classes.

  The Dice term (batch-level, as in nnU-Net) keeps small lesions from being
  drowned by background voxels in the cross-entropy.

  Args:
    logits: ``[B, *spatial, K]``.
    target: ``[B, *spatial]`` integer labels in ``[0, K)``.
    num_classes: ``K``.
  """
  target = target.astype(jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
  probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
  onehot = jax.nn.one_hot(target, num_classes)[..., 1:]
  axes = tuple(range(probs.ndim - 1))
  inter = jnp.sum(probs * onehot, axis=axes)
  denom = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  dice = (2.0 * inter + 1.0) / (denom + 1.0)
  return ce + (1.0 - dice.mean())


def classification_scores(probs: np.ndarray, labels: np.ndarray,
                          num_classes: int) -> Dict[str, float]:
  """AUC (one-vs-rest macro for K > 2), accuracy and balanced accuracy.

  AUC is ``nan`` when the test set lacks a class (undefined there).
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  pred = probs.argmax(-1)
  scores = probs[:, 1] if num_classes == 2 else probs
  try:
    auc = float(cls_metrics.roc_auc(labels, scores))
  except ValueError:
    auc = float("nan")
  return {"auc": auc,
          "accuracy": float(cls_metrics.accuracy(labels, pred)),
          "balanced_accuracy": float(cls_metrics.balanced_accuracy(labels,
                                                                   pred))}


def segmentation_scores(pred: np.ndarray, target: np.ndarray,
                        num_classes: int) -> Dict[str, float]:
  """Dice pooled over the test set and per image, and HD95, per class.

  ``dice`` pools all test voxels of a class (robust when most slices have
  no lesion; 1 when the class is absent from prediction and reference);
  ``dice_per_image`` and ``hd95`` average over the test images where the
  class is present in the reference. An empty prediction on such an image
  counts as Dice 0; its HD95 is infinite, so it is left out of the mean and
  counted in ``hd95_missed`` instead.
  """
  pred = np.asarray(pred)
  target = np.asarray(target)
  out: Dict[str, float] = {}
  for k in range(1, num_classes):
    suffix = "" if num_classes == 2 else f"_{k}"
    p = (pred == k).astype(np.uint8)
    t = (target == k).astype(np.uint8)
    denom = int(p.sum()) + int(t.sum())
    out["dice" + suffix] = (float(2.0 * np.sum(p & t) / denom) if denom
                            else 1.0)
    present = t.reshape(len(t), -1).any(axis=1)
    if present.any():
      d = np.asarray(seg_metrics.dice(p[present], t[present], labels=(1,)))
      h = np.asarray(seg_metrics.hd95(p[present], t[present]))
      finite = np.isfinite(h)
      out["dice_per_image" + suffix] = float(d.mean())
      out["hd95" + suffix] = (float(h[finite].mean()) if finite.any()
                              else float("nan"))
      out["hd95_missed" + suffix] = float(np.sum(~finite))
    else:
      out.update({"dice_per_image" + suffix: float("nan"),
                  "hd95" + suffix: float("nan"),
                  "hd95_missed" + suffix: 0.0})
  return out


def translation_scores(pred: np.ndarray, target: np.ndarray,
                       foreground: np.ndarray) -> Dict[str, float]:
  """SSIM, PSNR and MAE of translated images on the normalised [-1, 1] scale
  (data range 2); MAE also inside the target's foreground only."""
  pred = np.asarray(pred, np.float32)[..., None]
  target = np.asarray(target, np.float32)[..., None]
  fg = np.asarray(foreground)
  err = np.abs(pred[..., 0] - target[..., 0])
  return {"ssim": float(np.mean(image_metrics.ssim(pred, target,
                                                   data_range=2.0))),
          "psnr": float(np.mean(image_metrics.psnr(pred, target,
                                                   data_range=2.0))),
          "mae": float(err.mean()),
          "mae_foreground": float(err[fg].mean()) if fg.any() else 0.0}


PRIMARY = {"classification": "auc", "segmentation": "dice",
           "translation": "ssim"}


def make_task(name: str, cfg: ml_collections.ConfigDict,
              contrasts: Sequence[str], spatial_dims: int) -> Task:
  """Builds the task ``name`` from its settings (in the study, its
  ``config.study.tasks.<name>`` section).

  Args:
    name: task key.
    cfg: ``kind``, ``inputs`` (contrast names), ``target`` (``label``, a
      mask key, or a contrast name for translation), ``num_classes``,
      ``model`` (``width``/``stage_sizes`` for the ResNet, ``ch``/``ch_mult``
      for the U-Net, ``num_groups``) and ``conv_lowering``.
    contrasts: the study's image channels, in order.
    spatial_dims: 2 or 3.
  """
  if cfg.kind not in KINDS:
    raise ValueError(f"study.tasks.{name}.kind={cfg.kind!r} must be one of "
                     f"{KINDS}")
  missing = [c for c in cfg.inputs if c not in contrasts]
  if missing:
    raise ValueError(f"study.tasks.{name}.inputs {missing} are not among the "
                     f"study's contrasts {tuple(contrasts)}")
  inputs = tuple(contrasts.index(c) for c in cfg.inputs)
  m = cfg.model
  lowering = cfg.get("conv_lowering", "auto")
  if cfg.kind == "classification":
    model = ResNet(num_classes=cfg.num_classes, width=m.width,
                   stage_sizes=tuple(m.stage_sizes), num_groups=m.num_groups,
                   spatial_dims=spatial_dims, conv_lowering=lowering)
    return Task(name, cfg.kind, inputs, "label", cfg.num_classes, model,
                PRIMARY[cfg.kind])
  if cfg.kind == "segmentation":
    model = SegUNet(out_channels=cfg.num_classes, ch=m.ch,
                    ch_mult=tuple(m.ch_mult), num_groups=m.num_groups,
                    spatial_dims=spatial_dims, conv_lowering=lowering)
    return Task(name, cfg.kind, inputs, cfg.target, cfg.num_classes, model,
                PRIMARY[cfg.kind])
  if cfg.target not in contrasts:
    raise ValueError(f"study.tasks.{name}.target={cfg.target!r} is not among "
                     f"the study's contrasts {tuple(contrasts)}")
  model = SegUNet(out_channels=1, ch=m.ch, ch_mult=tuple(m.ch_mult),
                  num_groups=m.num_groups, spatial_dims=spatial_dims,
                  conv_lowering=lowering)
  return Task(name, cfg.kind, inputs, contrasts.index(cfg.target), 0, model,
              PRIMARY[cfg.kind])


# The range of each metric :meth:`Task.score` and the study produce:
# intervals over seeds are computed on a scale where it is unbounded.
_UNIT = ("auc", "accuracy", "balanced_accuracy", "dice", "dice_per_image",
         "seg_dice", "seg_dice_real")
_NON_NEGATIVE = ("mae", "mae_foreground", "hd95", "hd95_missed", "psnr")


def metric_range(metric: str) -> Tuple[float, float]:
  """``(low, high)`` a metric cannot leave (infinite where unbounded)."""
  if metric in _UNIT:
    return 0.0, 1.0
  if metric == "ssim":
    return -1.0, 1.0
  if metric in _NON_NEGATIVE:
    return 0.0, float("inf")
  return float("-inf"), float("inf")


def higher_is_better(metric: str) -> bool:
  """Direction of a metric name produced by :meth:`Task.score`."""
  return not metric.startswith(("mae", "hd95"))

