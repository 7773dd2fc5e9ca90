"""Memorization audit: which synthetic images are likely copies of training
images.

A generator trained on a few patients can reproduce them; shared synthetic
data would then leak those patients. The audit compares, in one feature space
(an encoder's features, or raw pixels), each synthetic sample's distance to
its nearest training sample with the same distance for *held-out* real images,
which come from the data distribution but were never seen in training:

* If the generator samples the data distribution without copying, a synthetic
  sample is, as far as the training set is concerned, like a held-out image,
  so its nearest-training distance follows the held-out distribution. A sample
  below the ``quantile`` of the held-out distances is flagged; for
  non-copying generators about ``quantile`` of the samples are flagged by
  chance, so the flagged fraction is read against that rate, and the one-sided
  binomial ``p_value`` says how unlikely the observed excess is under it.
* ``ratio``: the synthetic sample's distance to its nearest training image
  divided by that training image's distance to its own nearest other training
  image (the "authenticity" test of Alaa et al. 2022). A ratio far below 1
  means the sample sits much closer to one patient than any other patient
  does; exact copies give 0.

Reported distances are recomputed exactly in float64 for the matched pairs,
so an exact copy has distance 0. Distances are Euclidean; pixel-space
distances need the same intensity normalisation for all three sets.
"""

import dataclasses
from typing import Any, Dict, List

import numpy as np
from scipy import stats

from medgen_jax.eval import distances as dist


@dataclasses.dataclass(frozen=True)
class MemorizationAudit:
  """Result of :func:`memorization_audit` (``S`` synthetic, ``H`` held-out).

  Attributes:
    distances: ``[S]`` distance of each synthetic sample to its nearest
      training sample.
    nearest_train: ``[S]`` index of that training sample.
    flags: ``[S]`` bool, likely copies (``distances < threshold``).
    flagged_fraction: mean of ``flags``.
    threshold: the ``quantile`` of ``heldout_distances``.
    quantile: nominal rate of chance flags for a non-copying generator.
    p_value: one-sided binomial test of the flag count against ``quantile``.
    heldout_distances: ``[H]`` each held-out sample's nearest-training
      distance (the reference distribution).
    ratio: ``[S]`` ``distances / train_nn_distances`` (0 when both are 0,
      ``inf`` when only the training pair is a duplicate).
    train_nn_distances: ``[S]`` distance of the matched training sample to
      its nearest other training sample.
    space: what the distances were computed on, e.g. ``"pixels"``.
  """
  distances: np.ndarray
  nearest_train: np.ndarray
  flags: np.ndarray
  flagged_fraction: float
  threshold: float
  quantile: float
  p_value: float
  heldout_distances: np.ndarray
  ratio: np.ndarray
  train_nn_distances: np.ndarray
  space: str

  def closest_pairs(self, n: int = 8) -> List[Dict[str, Any]]:
    """The ``n`` synthetic samples closest to a training sample, closest
    first: ``{"synthetic", "train", "distance", "ratio", "flagged"}``."""
    order = np.argsort(self.distances, kind="stable")[:n]
    return [dict(synthetic=int(i), train=int(self.nearest_train[i]),
                 distance=float(self.distances[i]),
                 ratio=float(self.ratio[i]), flagged=bool(self.flags[i]))
            for i in order]

  def summary(self) -> Dict[str, Any]:
    """JSON-ready scalars for ``metrics.jsonl`` and reports."""
    return dict(
        space=self.space,
        num_synthetic=int(self.distances.size),
        num_heldout=int(self.heldout_distances.size),
        quantile=self.quantile,
        threshold=self.threshold,
        flagged=int(self.flags.sum()),
        flagged_fraction=self.flagged_fraction,
        p_value=self.p_value,
        min_distance=float(self.distances.min()),
        median_distance=float(np.median(self.distances)),
        median_heldout_distance=float(np.median(self.heldout_distances)),
        median_ratio=float(np.median(self.ratio)),
    )


def _as_rows(x, name: str, shape=None) -> np.ndarray:
  """``[N, ...]`` -> ``[N, prod(...)]``, checking trailing shapes agree."""
  x = np.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"{name}: expected [N, D] features or [N, ...] images, "
                     f"got shape {x.shape}")
  if shape is not None and x.shape[1:] != shape:
    raise ValueError(f"{name}: samples have shape {x.shape[1:]} but the "
                     f"training set has {shape}")
  return dist.check_features(x.reshape(x.shape[0], -1), name)


def _exact_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise ``|a_i - b_i|`` in float64."""
  diff = a.astype(np.float64) - b.astype(np.float64)
  return np.sqrt(np.einsum("nd,nd->n", diff, diff))


def _nearest(query: np.ndarray, train: np.ndarray, block_size: int):
  """Nearest training row of each query: exact distances and indices."""
  _, idx = dist.knn_sq(query, train, 1, block_size=block_size)
  idx = idx[:, 0]
  return _exact_distances(query, train[idx]), idx


def memorization_audit(synthetic, train, heldout, quantile: float = 0.01,
                       space: str = "",
                       block_size: int = dist.DEFAULT_BLOCK
                       ) -> MemorizationAudit:
  """Flags synthetic samples that are closer to a training sample than
  real unseen data usually is (see the module docstring).

  Args:
    synthetic: ``[S, D]`` features or ``[S, ...]`` images (flattened).
    train: ``[N, ...]`` the generator's training set, same trailing shape;
      N >= 2.
    heldout: ``[H, ...]`` real samples never used in training (validation or
      test split), same trailing shape; the more the better (the threshold is
      a low quantile of H values, so H >= 1 / quantile is advisable).
    quantile: the held-out quantile used as threshold, in (0, 1).
    space: label stored with the result; default ``"features"`` for
      ``[N, D]`` input and ``"pixels"`` otherwise.
    block_size: tile size of the distance computation.

  Returns:
    A :class:`MemorizationAudit`.
  """
  if not 0 < quantile < 1:
    raise ValueError(f"quantile must be in (0, 1), got {quantile}")
  train_arr = np.asarray(train)
  shape = train_arr.shape[1:]
  train_rows = _as_rows(train_arr, "train")
  if train_rows.shape[0] < 2:
    raise ValueError(f"train: needs at least 2 samples, got "
                     f"{train_rows.shape[0]}")
  syn = _as_rows(synthetic, "synthetic", shape)
  held = _as_rows(heldout, "heldout", shape)
  space = space or ("features" if train_arr.ndim == 2 else "pixels")

  d_syn, nn_syn = _nearest(syn, train_rows, block_size)
  d_held, _ = _nearest(held, train_rows, block_size)
  _, nn_train = dist.knn_sq(train_rows, train_rows, 1, exclude_self=True,
                            block_size=block_size)
  d_train = _exact_distances(train_rows, train_rows[nn_train[:, 0]])
  d_match = d_train[nn_syn]

  threshold = float(np.quantile(d_held, quantile))
  flags = d_syn < threshold
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(d_syn == 0, 0.0, d_syn / d_match)
  p_value = stats.binomtest(int(flags.sum()), flags.size, quantile,
                            alternative="greater").pvalue
  return MemorizationAudit(
      distances=d_syn, nearest_train=nn_syn, flags=flags,
      flagged_fraction=float(flags.mean()), threshold=threshold,
      quantile=float(quantile), p_value=float(p_value),
      heldout_distances=d_held, ratio=ratio, train_nn_distances=d_match,
      space=space)
