"""Distribution metrics on feature vectors: FID, KID, precision/recall,
density/coverage.

Every function takes features ``[N, D]`` of real images and ``[M, D]`` of
synthetic images from one extractor (Inception-V3 pool3, or an in-domain
encoder); the numbers are only comparable when extractor and preprocessing
are the same, so store both beside every value.

Sample-size effects: FID is biased upwards for small sets (Chong & Forsyth,
2020) and needs ``N > D`` for a full-rank covariance; KID is unbiased at any
size; precision/recall and density/coverage depend on ``k`` and on ``N``.
Compare values computed from the same numbers of samples.
"""

import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax.eval import distances as dist


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Gaussian moments of a feature set, in float64.

  Attributes:
    mu: ``[D]`` mean.
    sigma: ``[D, D]`` covariance (unbiased, ``N - 1`` denominator).
    num: number of feature vectors.
  """
  mu: np.ndarray
  sigma: np.ndarray
  num: int


def feature_stats(features, chunk: int = 4096) -> FeatureStats:
  """Mean and covariance of ``features`` ``[N, D]`` (N >= 2), in float64.

  Accumulated over ``chunk`` rows at a time, so 50k x 2048 float32 features
  never exist as a float64 copy; rows are shifted by the mean of the first
  chunk first, which keeps the one-pass formula free of cancellation.
  """
  x = dist.check_features(features, "features", min_rows=2)
  n, d = x.shape
  shift = x[:chunk].mean(axis=0, dtype=np.float64)
  total = np.zeros(d)
  gram = np.zeros((d, d))
  for start in range(0, n, chunk):
    xs = x[start:start + chunk].astype(np.float64) - shift
    total += xs.sum(axis=0)
    gram += xs.T @ xs
  mean_shifted = total / n
  sigma = (gram - n * np.outer(mean_shifted, mean_shifted)) / (n - 1)
  return FeatureStats(mu=shift + mean_shifted, sigma=sigma, num=n)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (eigenvalues >= 0)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet (2-Wasserstein) distance between two Gaussians.

  ``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``
  (Dowson & Landau 1982; FID of Heusel et al. 2017). Lower is better; 0 for
  identical moments.

  The trace term is computed as ``sum(sqrt(eig(S1^(1/2) S2 S1^(1/2))))``: that
  matrix is symmetric PSD and has the eigenvalues of ``S1 S2``, so symmetric
  eigendecompositions give a real result where ``scipy.linalg.sqrtm(S1 @ S2)``
  may return complex parts and fail on singular covariances. Everything runs
  in float64: the result is a small difference of traces in the hundreds, and
  near-singular 2048-d covariances lose several digits in float32, enough to
  move FID by whole units.

  Args:
    mu1: ``[D]`` mean of the first Gaussian.
    sigma1: ``[D, D]`` its covariance.
    mu2: ``[D]`` mean of the second Gaussian.
    sigma2: ``[D, D]`` its covariance.

  Returns:
    The squared Fréchet distance (the quantity reported as FID), >= 0.
  """
  mu1, mu2 = (np.asarray(m, np.float64) for m in (mu1, mu2))
  s1, s2 = (np.asarray(s, np.float64) for s in (sigma1, sigma2))
  d = mu1.shape[0] if mu1.ndim == 1 else -1
  for name, a, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)),
                         ("sigma1", s1, (d, d)), ("sigma2", s2, (d, d))):
    if a.shape != shape:
      raise ValueError(f"frechet_distance: {name} has shape {a.shape}, "
                       f"expected {shape} (mu1 is {mu1.shape})")
    if not np.isfinite(a).all():
      raise ValueError(f"frechet_distance: {name} contains NaN or Inf")
  r1 = _sqrtm_psd(s1)
  eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
  tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = mu1 - mu2
  value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
  return float(max(value, 0.0))


def fid_from_stats(real: FeatureStats, fake: FeatureStats) -> float:
  """FID between precomputed statistics (e.g. cached real-set stats)."""
  return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)


def fid_from_features(real, fake) -> float:
  """Fréchet distance between Gaussians fitted to ``real`` ``[N, D]`` and
  ``fake`` ``[M, D]`` (FID when the features are Inception pool3). Lower is
  better; ~0 for identical sets. See :func:`frechet_distance`."""
  real = dist.check_features(real, "real features", min_rows=2)
  fake = dist.check_features(fake, "fake features", min_rows=2)
  dist.check_same_dim(real, fake, "real features", "fake features")
  return fid_from_stats(feature_stats(real), feature_stats(fake))


def _poly_kernel(x: jax.Array, y: jax.Array) -> jax.Array:
  """``k(x, y) = (x.y / D + 1)^3``, ``[m, D] x [m, D] -> [m, m]``."""
  d = x.shape[-1]
  dot = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
  return (dot / d + 1.0) ** 3


def _mmd2_unbiased(x: jax.Array, y: jax.Array) -> jax.Array:
  """Unbiased MMD^2 estimate between two ``[m, D]`` samples (scalar)."""
  m = x.shape[0]
  kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
  off = m * (m - 1)
  return ((jnp.sum(kxx) - jnp.trace(kxx)) / off +
          (jnp.sum(kyy) - jnp.trace(kyy)) / off - 2.0 * jnp.mean(kxy))


@functools.partial(jax.jit, static_argnames=("num_subsets", "m"))
def _kid_subsets(real: jax.Array, fake: jax.Array, rng: jax.Array,
                 num_subsets: int, m: int) -> jax.Array:
  """MMD^2 of ``num_subsets`` random subset pairs of size ``m``; ``[S]``."""

  def draw(key, n):
    # The first m of a uniformly random order: m draws without replacement.
    order = jnp.argsort(jax.random.uniform(key, (num_subsets, n)), axis=1)
    return order[:, :m]

  k_real, k_fake = jax.random.split(rng)
  idx = (draw(k_real, real.shape[0]), draw(k_fake, fake.shape[0]))
  # One subset at a time bounds memory to three [m, m] kernel matrices.
  return jax.lax.map(lambda ij: _mmd2_unbiased(real[ij[0]], fake[ij[1]]), idx)


def kid_from_features(real, fake, num_subsets: int = 100,
                      subset_size: int = 1000, *,
                      rng: jax.Array) -> Tuple[float, float]:
  """Kernel Inception Distance (Bińkowski et al. 2018).

  The unbiased estimator of the squared MMD with the cubic polynomial kernel
  ``k(x, y) = (x.y / D + 1)^3``, averaged over ``num_subsets`` random subsets
  of ``subset_size`` real and ``subset_size`` fake features, each drawn
  without replacement. Lower is better; its expectation is exactly 0 when both
  sets are independent samples of one distribution, so small sets may give
  small negative values. Passing the very same features as real and fake
  gives a slightly negative value, about ``-2 (mean k(x, x) - mean k(x, y))
  / (m - 1)``, because shared points pair with themselves across the sets.
  The estimator is unbiased at any subset size, so ``subset_size`` is
  clipped to the smaller set (like clean-fid) instead of failing.

  Args:
    real: ``[N, D]``.
    fake: ``[M, D]``.
    num_subsets: subsets to average (>= 1).
    subset_size: features per subset and set (>= 2 after clipping).
    rng: PRNG key for the subset draws.

  Returns:
    ``(mean, std)`` of the per-subset estimates (``std`` with ``ddof=0``).
  """
  real = dist.check_features(real, "real features", min_rows=2)
  fake = dist.check_features(fake, "fake features", min_rows=2)
  dist.check_same_dim(real, fake, "real features", "fake features")
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  m = min(subset_size, real.shape[0], fake.shape[0])
  if m < 2:
    raise ValueError(f"subset_size must be >= 2, got {subset_size}")
  values = np.asarray(_kid_subsets(
      jnp.asarray(real, jnp.float32), jnp.asarray(fake, jnp.float32), rng,
      int(num_subsets), int(m)), np.float64)
  return float(values.mean()), float(values.std())


def precision_recall(real, fake, k: int = 3,
                     block_size: int = dist.DEFAULT_BLOCK) -> Tuple[float,
                                                                     float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019).

  Each set's manifold is the union of balls around its points whose radius
  is the distance to the point's k-th nearest neighbour in the same set.
  Precision is the fraction of fake samples inside the real manifold
  (fidelity); recall is the fraction of real samples inside the fake manifold
  (coverage of the real distribution). Both are in [0, 1], higher is better,
  and 1 for identical sets. Balls are open (as in the reference
  implementation of Naeem et al.), so a point needs a radius above 0: sets
  in which a point has k exact duplicates give it an empty ball.

  Args:
    real: ``[N, D]`` (N > k).
    fake: ``[M, D]`` (M > k).
    k: neighbour rank of the ball radii (3 in the paper).
    block_size: tile size of the distance computation.

  Returns:
    ``(precision, recall)``.
  """
  real = dist.check_features(real, "real features", min_rows=k + 1)
  fake = dist.check_features(fake, "fake features", min_rows=k + 1)
  dist.check_same_dim(real, fake, "real features", "fake features")
  r_real = dist.kth_neighbour_sq_radius(real, k, block_size)
  r_fake = dist.kth_neighbour_sq_radius(fake, k, block_size)
  precision = np.mean(dist.count_in_balls(fake, real, r_real, block_size) > 0)
  recall = np.mean(dist.count_in_balls(real, fake, r_fake, block_size) > 0)
  return float(precision), float(recall)


def density_coverage(real, fake, k: int = 5,
                     block_size: int = dist.DEFAULT_BLOCK) -> Tuple[float,
                                                                     float]:
  """Density and coverage (Naeem et al. 2020).

  With ``B(r_i)`` the ball around real sample ``r_i`` reaching its k-th
  nearest real neighbour:

  * density ``= 1/(k M) sum_j sum_i 1[f_j in B(r_i)]``: how many real
    neighbourhoods each fake sample falls in, relative to what a real sample
    would see. About 1 when fake matches real (exactly 1 for identical sets:
    balls are open, so each holds its centre and k - 1 neighbours), above 1
    when fakes crowd into dense real regions; unbounded, and robust to real
    outliers, unlike precision.
  * coverage ``= 1/N sum_i 1[exists j: f_j in B(r_i)]``: the fraction of real
    neighbourhoods that contain at least one fake sample; in [0, 1], 1 for
    identical sets. Higher is better.

  Args:
    real: ``[N, D]`` (N > k).
    fake: ``[M, D]``.
    k: neighbour rank of the ball radii (5 in the paper).
    block_size: tile size of the distance computation.

  Returns:
    ``(density, coverage)``.
  """
  real = dist.check_features(real, "real features", min_rows=k + 1)
  fake = dist.check_features(fake, "fake features", min_rows=1)
  dist.check_same_dim(real, fake, "real features", "fake features")
  r_real = dist.kth_neighbour_sq_radius(real, k, block_size)
  counts = dist.count_in_balls(fake, real, r_real, block_size)
  density = counts.sum() / (k * fake.shape[0])
  nearest_fake, _ = dist.knn_sq(real, fake, 1, block_size=block_size,
                                refine=False)
  coverage = np.mean(nearest_fake[:, 0] < r_real)
  return float(density), float(coverage)
