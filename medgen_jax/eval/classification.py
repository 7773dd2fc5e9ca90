"""Classification metrics: accuracy, balanced accuracy, ROC AUC.

Labels are integer class ids ``[N]``. Medical test sets are small and
imbalanced (few lesion-positive cases), so report balanced accuracy and AUC
beside plain accuracy: a classifier that always answers "healthy" scores a
high accuracy and a balanced accuracy of ``1 / num_classes``.
"""

from typing import Optional

import numpy as np
from scipy import stats


def _check_labels(labels, name: str = "labels") -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"{name}: expected a non-empty [N] array, got shape "
                     f"{labels.shape}")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    raise ValueError(f"{name}: expected integer class ids, got dtype "
                     f"{labels.dtype}")
  return labels.astype(np.int64)


def _predicted_classes(predictions, n: int) -> np.ndarray:
  """Class ids ``[N]`` from ids ``[N]`` or from scores ``[N, C]`` (argmax)."""
  predictions = np.asarray(predictions)
  if predictions.ndim == 2:
    predictions = np.argmax(predictions, axis=1)
  predictions = _check_labels(predictions, "predictions")
  if predictions.shape[0] != n:
    raise ValueError(f"predictions has {predictions.shape[0]} entries but "
                     f"labels has {n}")
  return predictions


def accuracy(labels, predictions) -> float:
  """Fraction of correct predictions; in [0, 1], higher is better.

  Args:
    labels: ``[N]`` true class ids.
    predictions: ``[N]`` predicted ids, or ``[N, C]`` scores/logits (argmax).
  """
  labels = _check_labels(labels)
  return float(np.mean(_predicted_classes(predictions, labels.size) == labels))


def balanced_accuracy(labels, predictions) -> float:
  """Mean per-class recall over the classes present in ``labels``.

  ``(1/K) sum_c |{i: y_i = c, yhat_i = c}| / |{i: y_i = c}|`` (Brodersen et
  al. 2010; scikit-learn's convention: classes that only occur in the
  predictions do not enter the mean). In [0, 1], higher is better; chance
  level is ``1/K`` whatever the class balance.

  Args:
    labels: ``[N]`` true class ids.
    predictions: ``[N]`` predicted ids, or ``[N, C]`` scores/logits (argmax).
  """
  labels = _check_labels(labels)
  predictions = _predicted_classes(predictions, labels.size)
  recalls = [np.mean(predictions[labels == c] == c) for c in np.unique(labels)]
  return float(np.mean(recalls))


def _binary_auc(positive: np.ndarray, scores: np.ndarray, what: str) -> float:
  """Mann-Whitney U / (n_pos n_neg) with mid-ranks for ties."""
  n_pos = int(positive.sum())
  n_neg = positive.size - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"roc_auc: {what} has {n_pos} positive and {n_neg} "
                     "negative cases; AUC needs both")
  ranks = stats.rankdata(scores)  # ties get their average rank
  u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
  return float(u / (n_pos * n_neg))


def roc_auc(labels, scores, num_classes: Optional[int] = None) -> float:
  """Area under the ROC curve.

  Binary: the probability that a random positive case scores higher than a
  random negative one, ties counting 1/2 (the Mann-Whitney U statistic
  divided by ``n_pos * n_neg``, computed from mid-ranks; equal to the
  trapezoidal area under the empirical ROC curve). Multi-class: one-vs-rest
  AUC of every class, unweighted mean (macro). In [0, 1], higher is better,
  0.5 is chance.

  Args:
    labels: ``[N]`` class ids (0/1 for binary).
    scores: ``[N]`` scores of class 1 (binary), or ``[N, C]`` per-class
      scores/probabilities/logits (``C == 2`` uses column 1).
    num_classes: expected ``C`` (checked when given).

  Returns:
    The AUC. Raises when a scored class has no positive or no negative case
    (AUC is undefined there), naming the class.
  """
  labels = _check_labels(labels)
  scores = np.asarray(scores, np.float64)
  if scores.shape[0] != labels.size or scores.ndim not in (1, 2):
    raise ValueError(f"scores: expected [{labels.size}] or [{labels.size}, C],"
                     f" got shape {scores.shape}")
  if not np.isfinite(scores).all():
    raise ValueError("scores contain NaN or Inf")
  c = 2 if scores.ndim == 1 else scores.shape[1]
  if num_classes is not None and c != num_classes:
    raise ValueError(f"scores have {c} classes, expected {num_classes}")
  if labels.min() < 0 or labels.max() >= c:
    raise ValueError(f"labels must be in [0, {c}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  if scores.ndim == 1 or c == 2:
    col = scores if scores.ndim == 1 else scores[:, 1]
    return _binary_auc(labels == 1, col, "class 1")
  return float(np.mean([_binary_auc(labels == k, scores[:, k], f"class {k}")
                        for k in range(c)]))
