"""Realism, diversity and memorization of a synthetic set, in one call.

Used by the study (every generator it trains) and by ``--mode=eval``. All
feature-space numbers use one in-domain :class:`~medgen_jax.eval.encoder.
Encoder`; its card is stored beside the numbers so they stay interpretable.
"""

import json
import os
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np

from medgen_jax.eval import encoder as encoder_lib
from medgen_jax.eval import features as feature_metrics
from medgen_jax.eval import image as image_metrics
from medgen_jax.eval import memorization

Arrays = Dict[str, np.ndarray]
REFERENCE = "real (reference)"


def _label_of_mask(mask: np.ndarray, min_voxels: int = 2) -> np.ndarray:
  axes = tuple(range(1, mask.ndim))
  return (np.sum(mask > 0, axis=axes) >= min_voxels).astype(np.int32)


# A synthetic set whose pairs are more than this share of the way from the
# real set's MS-SSIM to identical images is reported as collapsing.
COLLAPSE_WARNING = 0.5


def collapse_score(ms_ssim: float, ms_ssim_real: float) -> float:
  """How far the synthetic set's pairwise MS-SSIM has moved from the real
  set's towards 1 (identical images): ``(fake - real) / (1 - real)``; 0 or
  less is as diverse as the real images, 1 is one image repeated."""
  return float((ms_ssim - ms_ssim_real) / max(1.0 - ms_ssim_real, 1e-6))


def class_collapse(candidate: Arrays, heldout: Arrays, pairs: int,
                   rng: jax.Array) -> Dict[str, float]:
  """:func:`collapse_score` within each class that has at least 2 real and
  2 synthetic images, keyed by the class index as a string."""
  out = {}
  for c in np.unique(candidate["label"]):
    fake = candidate["image"][candidate["label"] == c]
    real = heldout["image"][heldout["label"] == c]
    if len(fake) < 2 or len(real) < 2:
      continue
    key = jax.random.fold_in(rng, int(c))
    out[str(int(c))] = collapse_score(
        float(image_metrics.ms_ssim_diversity(fake, pairs, key,
                                              data_range=2.0)),
        float(image_metrics.ms_ssim_diversity(real, pairs, key,
                                              data_range=2.0)))
  return out


def set_metrics(enc: encoder_lib.Encoder, train: Arrays, heldout: Arrays,
                candidate: Arrays, cfg: ml_collections.ConfigDict,
                seed: int = 0, audit: bool = True) -> Dict[str, Any]:
  """Compares ``candidate`` images with real ``heldout`` images.

  Args:
    enc: the feature extractor.
    train: the generator's real training images (memorization reference).
    heldout: real images never trained on (the target distribution, and the
      memorization audit's null distribution).
    candidate: the synthetic set (``image``, ``label``, masks).
    cfg: ``kid_subsets``, ``kid_subset_size``, ``pr_k``,
      ``diversity_pairs``, ``memorization_quantile``.
    seed: PRNG seed of KID subsets and diversity pairs.
    audit: run the memorization audit.

  Returns:
    JSON-ready metrics: fid, kid {mean, std}, precision, recall, density,
    coverage, ms_ssim (diversity: mean MS-SSIM of random pairs, lower is
    more diverse), ms_ssim_real (the same for the real held-out images),
    mode_collapse (:func:`collapse_score`; with labels the largest of the
    pooled and the per-class scores, the latter also as
    mode_collapse_per_class), and when ``audit``:
    memorized_fraction
    (pixel space), memorized_fraction_features, memorization {pixels,
    features} summaries and closest_pairs (synthetic, train index pairs).
  """
  rng = jax.random.key(seed)
  f_real = enc.features(heldout["image"])
  f_fake = enc.features(candidate["image"])
  k = int(min(cfg.pr_k, len(f_real) - 1, len(f_fake) - 1))
  precision, recall = feature_metrics.precision_recall(f_real, f_fake, k=k)
  density, coverage = feature_metrics.density_coverage(f_real, f_fake, k=k)
  kid_mean, kid_std = feature_metrics.kid_from_features(
      f_real, f_fake, cfg.kid_subsets, cfg.kid_subset_size,
      rng=jax.random.fold_in(rng, 0))
  image = candidate["image"]
  out: Dict[str, Any] = dict(
      fid=feature_metrics.fid_from_features(f_real, f_fake),
      kid=dict(mean=kid_mean, std=kid_std), precision=precision,
      recall=recall, density=density, coverage=coverage, pr_k=k,
      num_real=int(len(f_real)), num_synthetic=int(len(f_fake)),
      ms_ssim=float(image_metrics.ms_ssim_diversity(
          image, cfg.diversity_pairs, jax.random.fold_in(rng, 1),
          data_range=2.0)),
      ms_ssim_real=float(image_metrics.ms_ssim_diversity(
          heldout["image"], cfg.diversity_pairs, jax.random.fold_in(rng, 1),
          data_range=2.0)))
  out["mode_collapse"] = collapse_score(out["ms_ssim"], out["ms_ssim_real"])
  if "label" in candidate and "label" in heldout:
    # A class-conditional generator can collapse to one image per class
    # while the pooled pairs, mostly across classes, still look diverse.
    per_class = class_collapse(candidate, heldout, cfg.diversity_pairs,
                               jax.random.fold_in(rng, 2))
    if per_class:
      out["mode_collapse_per_class"] = per_class
      out["mode_collapse"] = max([out["mode_collapse"]] +
                                 list(per_class.values()))
  if "lesion_mask" in candidate and "label" in candidate:
    out["label_agreement"] = float(np.mean(
        _label_of_mask(candidate["lesion_mask"]) == candidate["label"]))
  if audit:
    q = float(cfg.memorization_quantile)
    pix = memorization.memorization_audit(
        image, train["image"], heldout["image"], quantile=q, space="pixels")
    feat = memorization.memorization_audit(
        f_fake, enc.features(train["image"]), f_real, quantile=q,
        space="features")
    out.update(
        memorized_fraction=pix.flagged_fraction,
        memorized_fraction_features=feat.flagged_fraction,
        memorization=dict(pixels=pix.summary(), features=feat.summary()),
        closest_pairs=[(p["synthetic"], p["train"])
                       for p in pix.closest_pairs(8)])
  return out


def evaluate_all(enc: encoder_lib.Encoder, train: Arrays, reference: Arrays,
                 heldout: Arrays, synthetic: Dict[str, Arrays],
                 cfg: ml_collections.ConfigDict,
                 path: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
  """Metrics of every synthetic set, plus the real reference row.

  The reference row scores real ``reference`` images (e.g. validation
  subjects) against the ``heldout`` test subjects: what a perfect generator
  of that many images would reach, the floor every FID should be read
  against.

  Writes ``path`` (JSON) when given, with the encoder card.
  """
  out = {REFERENCE: set_metrics(enc, train, heldout, reference, cfg,
                                audit=False)}
  for name, arrays in synthetic.items():
    out[name] = set_metrics(enc, train, heldout, arrays, cfg)
  if path:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(dict(metrics=out, encoder=enc.card), f, indent=2,
                sort_keys=True, default=float)
    os.replace(tmp, path)
  return out


def load(path: str) -> Dict[str, Any]:
  with open(path) as f:
    return json.load(f)
