"""Do the generator metrics move the right way on known degradations?

Real held-out images play a perfect generator; each degradation is applied
at growing strengths and every metric of
:func:`~medgen_jax.eval.generative.set_metrics` is computed on the result.
A metric that does not worsen monotonically (beyond its chance
variation at this set size) under the degradation it is meant to detect cannot tell a good generator from a poor one, so its
numbers in the study should not be read. The study prints this table once.

Degradations (strength 0 is the undegraded set):

- ``blur``: Gaussian blur of the contrasts, sigma in pixels.
- ``noise``: added Gaussian noise, sigma on the [-1, 1] scale.
- ``intensity_shift``: every contrast shifted up (and clipped).
- ``dropped_modes``: this share of one class's images (the rarer one)
  removed: a generator that misses a mode.
- ``collapse``: this share of the images replaced by copies of one image
  of their class: a generator that repeats itself.
- ``training_copies``: this share replaced by random training images: a
  generator that memorizes.
"""

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import ml_collections
import numpy as np
from scipy import ndimage

from medgen_jax.eval import encoder as encoder_lib
from medgen_jax.eval import generative

Arrays = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Degradation:
  """One degradation: its strengths (after 0) and the metrics it must
  move, ``{metric: +1 (must rise) or -1 (must fall)}``."""

  strengths: Tuple[float, ...]
  expected: Dict[str, int]


_REALISM = {"fid": 1, "kid": 1, "precision": -1, "density": -1}
DEGRADATIONS = {
    "blur": Degradation((0.5, 1.0, 2.0), _REALISM),
    "noise": Degradation((0.1, 0.2, 0.4), _REALISM),
    "intensity_shift": Degradation((0.1, 0.25, 0.5), _REALISM),
    "dropped_modes": Degradation((0.5, 0.9, 1.0),
                                 {"fid": 1, "kid": 1, "recall": -1,
                                  "coverage": -1}),
    "collapse": Degradation((0.25, 0.5, 0.9),
                            {"mode_collapse": 1, "recall": -1,
                             "coverage": -1}),
    "training_copies": Degradation((0.25, 0.5, 1.0),
                                   {"memorized_fraction": 1}),
}
METRICS = ("fid", "kid", "precision", "recall", "density", "coverage",
           "mode_collapse", "memorized_fraction")


def _contrasts(images: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]):
  return np.clip(fn(images), -1.0, 1.0).astype(np.float32)


def degrade(name: str, strength: float, images: Arrays, train: Arrays,
            rng: np.random.Generator) -> Arrays:
  """``images`` (``image [N, *S, C]`` in [-1, 1], labels, masks) degraded
  by ``name`` at ``strength``; strength 0 returns them unchanged."""
  if strength == 0:
    return images
  x = images["image"]
  if name == "blur":
    sigma = (0,) + (strength,) * (x.ndim - 2) + (0,)
    return {**images, "image": _contrasts(
        x, lambda v: ndimage.gaussian_filter(v, sigma))}
  if name == "noise":
    return {**images, "image": _contrasts(
        x, lambda v: v + strength * rng.standard_normal(v.shape))}
  if name == "intensity_shift":
    return {**images, "image": _contrasts(x, lambda v: v + strength)}
  labels = images.get("label")
  n = len(x)
  if name == "dropped_modes":
    if labels is None:
      raise ValueError("dropped_modes needs labelled images")
    values, counts = np.unique(labels, return_counts=True)
    rare = np.flatnonzero(labels == values[np.argmin(counts)])
    drop = rng.choice(rare, int(round(strength * len(rare))), replace=False)
    keep = np.setdiff1d(np.arange(n), drop)
    return {k: v[keep] for k, v in images.items()}
  if name == "collapse":
    out = {k: v.copy() for k, v in images.items()}
    which = rng.choice(n, int(round(strength * n)), replace=False)
    groups = labels if labels is not None else np.zeros(n, np.int32)
    for c in np.unique(groups[which]):
      members = which[groups[which] == c]
      source = rng.choice(np.flatnonzero(groups == c))
      for k in out:
        out[k][members] = images[k][source]
    return out
  if name == "training_copies":
    out = {k: v.copy() for k, v in images.items()}
    which = rng.choice(n, int(round(strength * n)), replace=False)
    src = rng.choice(len(train["image"]), len(which), replace=True)
    for k in out:
      if k in train:
        out[k][which] = train[k][src]
    return out
  raise ValueError(f"unknown degradation {name!r}; known: "
                   f"{sorted(DEGRADATIONS)}")


def matched(reference: Arrays, heldout: Arrays,
            rng: np.random.Generator) -> Arrays:
  """``reference`` subsampled to ``heldout``'s class shares (the perfect
  generator samples the target's classes; on small data the splits'
  shares differ, and a degradation that removes a class could otherwise
  look like an improvement)."""
  if "label" not in reference or "label" not in heldout:
    return reference
  labels = reference["label"]
  classes = np.unique(np.concatenate([labels, heldout["label"]]))
  share = np.array([np.mean(heldout["label"] == c) for c in classes])
  have = np.array([np.sum(labels == c) for c in classes])
  # The largest set with the target's shares that the reference can fill.
  total = np.min(np.where(share > 0, have / np.maximum(share, 1e-12),
                          np.inf))
  keep = np.concatenate([
      rng.choice(np.flatnonzero(labels == c), int(round(total * q)),
                 replace=False) for c, q in zip(classes, share)])
  keep = np.sort(keep)
  return {k: v[keep] for k, v in reference.items()}


def _scalar(metrics: Dict[str, Any], name: str) -> float:
  v = metrics.get(name, np.nan)
  return float(v["mean"] if isinstance(v, dict) else v)


_FRACTIONS = ("precision", "recall", "coverage", "memorized_fraction")


def noise_level(metrics: Dict[str, Any], name: str) -> float:
  """How far ``name`` moves by chance at this set size: two binomial
  standard errors (plus one image) for the share metrics, KID's spread
  over its subsets, 0 where no estimate exists (FID, collapse)."""
  if name in _FRACTIONS:
    p, n = _scalar(metrics, name), max(int(metrics["num_synthetic"]), 1)
    return 2.0 * float(np.sqrt(max(p * (1 - p), 0.0) / n)) + 1.0 / n
  if name == "kid":
    return float(metrics["kid"]["std"])
  return 0.0


def monotone(values: List[float], direction: int,
             tolerance: float = 0.0) -> bool:
  """Whether ``values`` (strength 0 first) never move against
  ``direction`` by more than ``tolerance`` and end beyond where they
  started by more than it."""
  v = direction * np.asarray(values, np.float64)
  if not np.all(np.isfinite(v)):
    return False
  return bool(np.all(np.diff(v) >= -tolerance) and v[-1] - v[0] > tolerance)


def validate(enc: encoder_lib.Encoder, train: Arrays, reference: Arrays,
             heldout: Arrays, cfg: ml_collections.ConfigDict,
             seed: int = 0) -> Dict[str, Any]:
  """Every metric of ``reference`` (real images never trained on, e.g. the
  validation subjects; :func:`matched` to ``heldout``'s classes) degraded by each of :data:`DEGRADATIONS`, scored
  against ``heldout`` as a synthetic set would be.

  Returns:
    ``{degradation: {strengths, metrics: {metric: [value per strength]},
    expected: {metric: +-1}, tolerance: {metric: chance variation},
    monotone: {metric: bool}}}``.
  """
  out: Dict[str, Any] = {}
  reference = matched(reference, heldout, np.random.default_rng(seed))
  for d, (name, spec) in enumerate(DEGRADATIONS.items()):
    strengths = (0.0,) + spec.strengths
    rows = []
    for s in strengths:
      rng = np.random.default_rng([seed, d, int(1000 * s)])
      images = degrade(name, s, reference, train, rng)
      rows.append(generative.set_metrics(
          enc, train, heldout, images, cfg, seed=seed,
          audit="memorized_fraction" in spec.expected))
    values = {m: [_scalar(r, m) for r in rows] for m in METRICS
              if m in rows[-1]}
    tolerance = {m: max(noise_level(r, m) for r in rows) for m in values}
    out[name] = dict(
        strengths=list(strengths), metrics=values,
        expected=dict(spec.expected), tolerance=tolerance,
        monotone={m: monotone(values[m], sign, tolerance[m])
                  for m, sign in spec.expected.items() if m in values})
  return out


def failures(result: Dict[str, Any]) -> List[str]:
  """``"metric under degradation"`` for each expected move not seen."""
  return [f"{m} under {name}" for name, r in result.items()
          for m, ok in r["monotone"].items() if not ok]
