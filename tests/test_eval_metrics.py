"""Known-answer tests of the metric library (features, image, segmentation,
classification)."""

import itertools

import jax
import numpy as np
import pytest
import scipy.linalg

from medgen_jax.eval import classification as cls
from medgen_jax.eval import distances as dist
from medgen_jax.eval import features as feat
from medgen_jax.eval import image as img
from medgen_jax.eval import segmentation as seg


@pytest.fixture(scope="module")
def cloud():
  """[64, 8] Gaussian features, shared so the k-NN kernels compile once."""
  return np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)


# ----------------------------------------------------------------- features


def test_frechet_distance_closed_form_diagonal():
  mu1, mu2 = np.array([0.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.5])
  v1, v2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 0.5])
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(v1) - np.sqrt(v2))**2)
  got = feat.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_sqrtm_on_full_covariances():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
  s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  expected = (np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) -
              2 * np.trace(covmean))
  assert feat.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
      expected, rel=1e-9)
  # Singular covariances (rank 2 in 5-d) stay real and finite.
  c = rng.normal(size=(5, 2))
  assert np.isfinite(feat.frechet_distance(mu1, c @ c.T, mu2, s2))


def test_fid_from_samples_matches_analytic_value():
  rng = np.random.default_rng(2)
  n = 20000
  mu2, sd1, sd2 = np.array([1.0, 0.0, 0.5]), np.sqrt([1, 2, .5]), np.sqrt(
      [2, .5, .5])
  x = rng.normal(size=(n, 3)) * sd1
  y = mu2 + rng.normal(size=(n, 3)) * sd2
  expected = np.sum(mu2**2) + np.sum((sd1 - sd2)**2)  # 1.9216
  assert feat.fid_from_features(x, y) == pytest.approx(expected, abs=0.05)
  assert feat.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)


def test_feature_checks_name_the_problem():
  with pytest.raises(ValueError, match="fake features: expected features"):
    feat.fid_from_features(np.zeros((4, 3)), np.zeros(4))
  with pytest.raises(ValueError, match="3 dimensions but fake features has 2"):
    feat.fid_from_features(np.zeros((4, 3)), np.zeros((4, 2)))
  bad = np.ones((5, 2))
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="row 3 contains NaN"):
    feat.precision_recall(np.ones((5, 2)), bad, k=2)


def _mmd2_numpy(x, y):
  d = x.shape[1]
  k = lambda a, b: (a @ b.T / d + 1.0)**3
  m = x.shape[0]
  kxx, kyy = k(x, x), k(y, y)
  return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) +
          (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * k(x, y).mean())


def test_kid_known_answer_and_directions(cloud):
  x = cloud.astype(np.float64)
  y = x[::-1] * 0.5 + 0.3
  # One subset of every sample: the unbiased estimator of the full sets.
  mean, std = feat.kid_from_features(x, y, num_subsets=1, subset_size=64,
                                     rng=jax.random.key(0))
  assert mean == pytest.approx(_mmd2_numpy(x, y), rel=1e-4)
  assert std == 0.0
  rng = np.random.default_rng(9)
  a, b = rng.normal(size=(2, 512, 8))
  shifted = b + 0.5
  key = jax.random.key(1)
  same, same_std = feat.kid_from_features(a, b, 20, 128, rng=key)
  diff, diff_std = feat.kid_from_features(a, shifted, 20, 128, rng=key)
  ident, _ = feat.kid_from_features(a, a, 20, 128, rng=key)
  assert np.isfinite([same_std, diff_std]).all() and diff_std > 0
  assert diff > 5 * diff_std
  assert abs(same) < 0.05 * diff and abs(ident) < 0.05 * diff
  # subset_size above the set size is clipped (the estimator is unbiased).
  clipped, _ = feat.kid_from_features(x, y, 1, 10_000, rng=jax.random.key(0))
  assert clipped == pytest.approx(mean, rel=1e-4)


def test_knn_blocks_match_brute_force(cloud):
  q = cloud[:23]
  d2 = ((q[:, None] - cloud[None])**2).sum(-1)
  for block in (64, 10):  # one tile, and ragged tiles with padding
    got_d, got_i = dist.knn(q, cloud, 3, block_size=block)
    np.testing.assert_array_equal(got_i, np.argsort(d2, axis=1)[:, :3])
    np.testing.assert_allclose(got_d, np.sqrt(np.sort(d2, 1)[:, :3]),
                               rtol=1e-4, atol=1e-5)
  # exclude_self skips each row's own index even when duplicated elsewhere.
  dup = np.concatenate([cloud[:5], cloud[:5]])
  d, i = dist.knn(dup, dup, 1, exclude_self=True, block_size=4)
  np.testing.assert_array_equal(i[:, 0], np.r_[5:10, 0:5])
  np.testing.assert_allclose(d, 0.0, atol=1e-3)
  with pytest.raises(ValueError, match="k=9 nearest neighbours"):
    dist.knn(cloud[:3], cloud[:8], 9)


def test_precision_recall_density_coverage_identical_sets(cloud):
  assert feat.precision_recall(cloud, cloud, k=3) == (1.0, 1.0)
  k = 5
  density, coverage = feat.density_coverage(cloud, cloud, k=k)
  assert coverage == 1.0
  # Every (open) real ball holds its centre and exactly k - 1 other points.
  assert density == pytest.approx(1.0, abs=2 / (k * len(cloud)))


def test_precision_recall_density_coverage_hand_example():
  real = np.stack([np.arange(10.0), np.zeros(10)], 1)  # radii (k=1): 1
  fake = np.array([[0.5, 0.0], [20.0, 0.0]])  # radii (k=1): 19.5
  assert feat.precision_recall(real, fake, k=1) == (0.5, 1.0)
  # 0.5 lies in the balls of reals 0 and 1; 20 in none.
  assert feat.density_coverage(real, fake, k=1) == (1.0, 0.2)
  far = fake + 100.0
  assert feat.precision_recall(real, far, k=1) == (0.0, 0.0)


# -------------------------------------------------------------------- image


def _ssim_reference(x, y, data_range, size=11, sigma=1.5):
  """SSIM by the formula, window by window, in float64 (2D or 3D)."""
  g = img.gaussian_window(size, sigma).astype(np.float64)
  w = g
  for _ in range(x.ndim - 1):
    w = np.multiply.outer(w, g)
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  vals = []
  for start in itertools.product(*[range(s - size + 1) for s in x.shape]):
    sl = tuple(slice(s, s + size) for s in start)
    a, b = x[sl].astype(np.float64), y[sl].astype(np.float64)
    ma, mb = (w * a).sum(), (w * b).sum()
    va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
    cov = (w * a * b).sum() - ma * mb
    vals.append((2 * ma * mb + c1) * (2 * cov + c2) /
                ((ma**2 + mb**2 + c1) * (va + vb + c2)))
  return np.mean(vals)


def test_ssim_matches_formula_2d_and_3d():
  rng = np.random.default_rng(3)
  x2 = rng.uniform(0, 4, (13, 12))
  y2 = np.clip(x2 + rng.normal(0, 0.8, x2.shape), 0, 4)
  got = img.ssim(x2[None, ..., None], y2[None, ..., None], data_range=4.0)
  assert float(got[0]) == pytest.approx(_ssim_reference(x2, y2, 4.0),
                                        abs=2e-5)
  x3 = rng.uniform(0, 1, (11, 12, 11))
  y3 = 0.6 * x3 + 0.4 * rng.uniform(0, 1, x3.shape)
  got = img.ssim(x3[None, ..., None], y3[None, ..., None], data_range=1.0)
  assert float(got[0]) == pytest.approx(_ssim_reference(x3, y3, 1.0),
                                        abs=2e-5)


def test_ssim_identity_constants_and_data_range():
  rng = np.random.default_rng(4)
  x = rng.uniform(-1, 1, (2, 16, 16, 2)).astype(np.float32)
  np.testing.assert_allclose(img.ssim(x, x, data_range=2.0), 1.0, atol=1e-6)
  # Constant images: zero variances, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
  a, b, rng_l = 0.2, 0.5, 1.0
  c1 = (0.01 * rng_l)**2
  got = img.ssim(np.full((1, 16, 16, 1), a), np.full((1, 16, 16, 1), b),
                 data_range=rng_l)
  assert float(got[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1),
                                        rel=1e-5)
  # Scaling images and data range together leaves SSIM unchanged; a [B]
  # data range applies per image.
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  base = np.asarray(img.ssim(x, y, data_range=2.0))
  both = np.asarray(img.ssim(np.concatenate([x[:1], 100 * x[1:]]),
                             np.concatenate([y[:1], 100 * y[1:]]),
                             data_range=np.array([2.0, 200.0])))
  np.testing.assert_allclose(both, base, rtol=1e-4)
  with pytest.raises(ValueError, match="smaller than the 11-wide window"):
    img.ssim(x[:, :8, :8], x[:, :8, :8], data_range=2.0)


def test_ms_ssim_scales_adapt_or_fail_clearly():
  rng = np.random.default_rng(5)
  x = rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
  assert img.ms_ssim_num_scales(x.shape) == 2
  assert img.ms_ssim_num_scales((1, 176, 200, 1)) == 5
  np.testing.assert_allclose(img.ms_ssim(x, x, data_range=2.0), 1.0,
                             atol=1e-6)
  two = np.asarray(img.ms_ssim(x, y, data_range=2.0))
  assert ((two > 0) & (two < 1)).all()
  with pytest.raises(ValueError, match=r"too small for 5 scales.*>= 176"):
    img.ms_ssim(x, y, data_range=2.0, num_scales=5)
  # One scale is plain SSIM.
  np.testing.assert_allclose(
      img.ms_ssim(x, y, data_range=2.0, num_scales=1),
      img.ssim(x, y, data_range=2.0), rtol=1e-6)
  vol = rng.uniform(0, 1, (1, 24, 24, 24, 1)).astype(np.float32)
  np.testing.assert_allclose(img.ms_ssim(vol, vol, data_range=1.0), 1.0,
                             atol=1e-6)


def test_psnr_mae_known_values():
  x = np.zeros((2, 4, 4, 1), np.float32)
  y = np.full_like(x, 0.1)
  np.testing.assert_allclose(img.psnr(x, y, data_range=1.0), 20.0, rtol=1e-5)
  np.testing.assert_allclose(img.psnr(x, y, data_range=np.array([1.0, 10.0])),
                             [20.0, 40.0], rtol=1e-5)
  np.testing.assert_allclose(img.mae(x, y), 0.1, rtol=1e-6)
  assert np.isinf(img.psnr(x, x, data_range=1.0)).all()
  with pytest.raises(ValueError, match="data_range must be positive"):
    img.psnr(x, y, data_range=0.0)
  vol = np.zeros((1, 2, 3, 4, 1))
  np.testing.assert_allclose(img.mae(vol, vol + 2.0), 2.0)


def test_ms_ssim_diversity_direction():
  rng = np.random.default_rng(6)
  one = rng.uniform(-1, 1, (1, 16, 16, 1)).astype(np.float32)
  collapsed = np.repeat(one, 6, axis=0)
  diverse = rng.uniform(-1, 1, (6, 16, 16, 1)).astype(np.float32)
  key = jax.random.key(0)
  assert img.ms_ssim_diversity(collapsed, 10, key, 2.0, batch_size=4) == (
      pytest.approx(1.0, abs=1e-6))
  assert img.ms_ssim_diversity(diverse, 10, key, 2.0, batch_size=4) < 0.2


# ------------------------------------------------------------- segmentation


def _square(shape, top, left, side=20):
  m = np.zeros(shape, bool)
  m[top:top + side, left:left + side] = True
  return m


def test_dice_known_overlap_and_empty_convention():
  a = _square((40, 40), 0, 0, 10)
  b = _square((40, 40), 0, 5, 10)  # overlap 50 of 100 + 100
  pred = np.stack([a, a]).astype(np.int32)
  target = np.stack([b, a]).astype(np.int32)
  np.testing.assert_allclose(seg.dice(pred, target, labels=(1,)),
                             [[0.5], [1.0]])
  # Class 2 absent from both: nan by default, or the given empty value.
  d = np.asarray(seg.dice(pred, target, labels=(0, 1, 2)))
  assert np.isnan(d[:, 2]).all()
  assert np.asarray(seg.dice(pred, target, num_classes=3,
                             empty_value=1.0))[0, 2] == 1.0
  # Predicted but absent from the reference: 0.
  assert float(seg.dice(pred * 2, target, labels=(2,))[0, 0]) == 0.0
  with pytest.raises(ValueError, match="exactly one of labels"):
    seg.dice(pred, target)


def test_hd95_shifted_squares_2d_3d_and_spacing():
  a = _square((40, 40), 10, 10)
  b = _square((40, 40), 10, 13)  # shifted 3 voxels along the columns
  np.testing.assert_allclose(seg.hd95(a[None], b[None]), [3.0])
  np.testing.assert_allclose(seg.hausdorff(a[None], b[None]), [3.0])
  c = _square((40, 40), 13, 10)  # shifted 3 rows, rows 2 mm apart
  np.testing.assert_allclose(seg.hd95(a[None], c[None], spacing=(2.0, 1.0)),
                             [6.0])
  cube = np.zeros((24, 24, 24), bool)
  cube[4:14, 4:14, 4:14] = True
  moved = np.roll(cube, 2, axis=0)
  np.testing.assert_allclose(seg.hd95(cube[None], moved[None]), [2.0])
  assert seg.assd(cube[None], cube[None])[0] == 0.0


def test_hd95_ignores_an_outlier_that_hausdorff_sees():
  a = _square((40, 48), 10, 10)
  b = a.copy()
  b[20, 45] = True  # 16 voxels right of the square's edge (column 29)
  np.testing.assert_allclose(seg.hausdorff(a[None], b[None]), [16.0])
  np.testing.assert_allclose(seg.hd95(a[None], b[None]), [0.0])


def test_surface_distance_empty_conventions():
  a = _square((40, 40), 10, 10)[None]
  empty = np.zeros_like(a)
  assert np.isnan(seg.hd95(empty, empty)[0])
  assert np.isinf(seg.hd95(a, empty)[0]) and np.isinf(seg.hd95(empty, a)[0])
  with pytest.raises(ValueError, match="same shape"):
    seg.hd95(a, a[:, :5])


# ----------------------------------------------------------- classification


def _auc_brute_force(pos_scores, neg_scores):
  wins = sum((p > n) + 0.5 * (p == n) for p in pos_scores for n in neg_scores)
  return wins / (len(pos_scores) * len(neg_scores))


def test_roc_auc_matches_pair_count_with_ties():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 2, 60)
  scores = rng.integers(0, 5, 60).astype(float) + labels  # many ties
  expected = _auc_brute_force(scores[labels == 1], scores[labels == 0])
  assert cls.roc_auc(labels, scores) == pytest.approx(expected, rel=1e-12)
  probs = np.stack([1 - scores / 10, scores / 10], 1)
  assert cls.roc_auc(labels, probs) == pytest.approx(expected, rel=1e-12)
  assert cls.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert cls.roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
  assert cls.roc_auc([0, 1], [0.5, 0.5]) == 0.5


def test_roc_auc_multiclass_one_vs_rest_macro():
  rng = np.random.default_rng(8)
  labels = np.repeat(np.arange(3), 15)
  scores = rng.integers(0, 4, (45, 3)).astype(float)
  scores[np.arange(45), labels] += 1
  expected = np.mean([_auc_brute_force(scores[labels == c, c],
                                       scores[labels != c, c])
                      for c in range(3)])
  assert cls.roc_auc(labels, scores, num_classes=3) == pytest.approx(expected)
  with pytest.raises(ValueError, match="class 2 has 0 positive"):
    cls.roc_auc(labels[labels < 2], scores[labels < 2])


def test_accuracy_and_balanced_accuracy_on_imbalanced_labels():
  labels = np.r_[np.zeros(90, int), np.ones(10, int)]
  always_healthy = np.zeros(100, int)
  assert cls.accuracy(labels, always_healthy) == 0.9
  assert cls.balanced_accuracy(labels, always_healthy) == 0.5
  pred = labels.copy()
  pred[:9] = 1  # 81 of 90 negatives right
  pred[90:95] = 0  # 5 of 10 positives right
  assert cls.balanced_accuracy(labels, pred) == pytest.approx((0.9 + 0.5) / 2)
  assert cls.accuracy(labels, pred) == pytest.approx(0.86)
  logits = np.eye(2)[pred]  # [N, C] scores go through argmax
  assert cls.balanced_accuracy(labels, logits) == pytest.approx(0.7)
  with pytest.raises(ValueError, match="predictions has 3 entries"):
    cls.accuracy(labels, [0, 1, 0])
