"""Preprocessing functions and the pipeline's windows / per-contrast norms."""

import ml_collections
import numpy as np
import pytest

from medgen_jax.data import pipeline
from medgen_jax.data import preprocess


def test_window_presets_and_custom_windows():
  assert preprocess.resolve_window("lung") == (-600.0, 1500.0)
  assert preprocess.resolve_window((40, 80)) == (40.0, 80.0)
  x = np.array([-1000.0, 0.0, 40.0, 100.0, 3000.0])
  np.testing.assert_array_equal(preprocess.apply_window(x, "brain"),
                                [0.0, 0.0, 40.0, 80.0, 80.0])
  with pytest.raises(ValueError, match="unknown CT window 'lungs'"):
    preprocess.resolve_window("lungs")
  with pytest.raises(ValueError, match="width > 0"):
    preprocess.resolve_window((40, 0))
  assert preprocess.window_bounds({}, "ct:bone") == (-500.0, 1300.0)
  assert preprocess.window_bounds({"ct": (0, 100)}, "ct") == (-50.0, 50.0)
  assert preprocess.window_bounds({}, "t1") is None


def test_resize_nearest_keeps_labels_and_linear_keeps_the_mean():
  labels = np.zeros((8, 12), np.uint8)
  labels[2:6, 3:9] = 4
  up = preprocess.resize(labels, (16, 24), nearest=True)
  assert up.dtype == np.uint8 and set(np.unique(up)) == {0, 4}
  assert (up == 4).sum() == 4 * (labels == 4).sum()
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 100, (64, 48)).astype(np.float32)
  small = preprocess.resize(img, (16, 16))   # anisotropic: 4x and 3x
  assert small.shape == (16, 16)
  assert abs(float(small.mean()) - float(img.mean())) < 1.0
  # Anti-aliasing: white noise averaged down has a much smaller spread.
  assert small.std() < 0.5 * img.std()


def test_pad_to_extent_uses_physical_size():
  x = np.ones((10, 20), np.float32)
  # 10 rows of 2 mm = 20 mm = 20 columns of 1 mm: already square.
  assert preprocess.pad_to_extent(x, (2.0, 1.0), 0.0).shape == (10, 20)
  padded = preprocess.pad_to_extent(x, (1.0, 1.0), -5.0)
  assert padded.shape == (20, 20) and padded[0, 0] == -5.0
  assert padded[5:15].min() == 1.0


def test_display_orientation_of_ras_volumes():
  vol = np.zeros((4, 5, 6))   # [X (L->R), Y (P->A), Z (I->S)]
  vol[3, 4, 5] = 1            # right, anterior, superior corner
  ax = preprocess.to_display(vol, "axial")
  assert ax.shape == (6, 5, 4) and ax[5, 0, 3] == 1   # top row, right col
  cor = preprocess.to_display(vol, "coronal")
  assert cor.shape == (5, 6, 4) and cor[4, 0, 3] == 1  # superior at the top
  sag = preprocess.to_display(vol, "sagittal")
  assert sag.shape == (4, 6, 5) and sag[3, 0, 0] == 1  # anterior on the left
  assert preprocess.display_spacing((1, 2, 3), "axial") == (3.0, 2.0, 1.0)


def test_mask_values_foreground_bbox_and_patches():
  m = np.array([[0, 1], [4, 4]])
  labels, problem = preprocess.mask_to_labels(m, (0, 1, 4))
  assert problem == "" and labels.tolist() == [[0, 1], [2, 2]]
  _, problem = preprocess.mask_to_labels(m, (0, 1))
  assert problem == "unknown label values [4] (expected data.mask_values=(0, 1))"
  _, problem = preprocess.mask_to_labels(np.array([0.0, 0.4]), ())
  assert problem.startswith("non-integer label values (e.g. 0.4)")
  x = np.zeros((10, 10))
  x[3:5, 6:9] = 100
  fg = preprocess.foreground(x, 0.05)
  assert preprocess.bbox(fg, margin=1) == (slice(2, 6), slice(5, 10))
  assert preprocess.patch_starts(10, 4, 4).tolist() == [0, 4, 6]
  assert preprocess.patch_starts(3, 4, 4).tolist() == [0]


def test_volume_normalisation_over_the_foreground():
  x = np.zeros((20, 20), np.float32)
  x[5:15, 5:15] = np.linspace(100, 200, 100).reshape(10, 10)
  fg = x > 0
  z = preprocess.normalize_volume(x, "zscore", fg)
  assert abs(z[fg].mean()) < 1e-5 and abs(z[fg].std() - 1) < 1e-5
  mm = preprocess.normalize_volume(x, "minmax", fg, (0, 100))
  assert mm[fg].min() == 0.0 and mm[fg].max() == 1.0
  # A flat foreground falls back to the volume's range, not to all zeros.
  flat = np.where(fg, 100.0, 0.0).astype(np.float32)
  mm = preprocess.normalize_volume(flat, "minmax", fg)
  assert mm[fg].min() == 1.0 and mm[~fg].max() == 0.0


def test_pipeline_windows_and_per_contrast_normalisation():
  rng = np.random.default_rng(0)
  raw = {"ct": rng.uniform(-1000, 1500, (4, 8, 8)).astype(np.float32),
         "t1": rng.normal(5, 2, (4, 8, 8)).astype(np.float32)}
  cfg = ml_collections.ConfigDict(dict(
      contrasts=("ct:lung", "ct:bone", "t1"), normalization="minmax",
      clip_percentiles=(0.0, 100.0), windows={},
      contrast_normalization={"t1": "zscore"}))
  stats = pipeline.normalization_stats(raw, cfg)
  assert stats["ct:lung"] == (-600.0, 750.0)
  out = pipeline.to_model_arrays(raw, cfg, stats)["image"]
  assert out.shape == (4, 8, 8, 3)
  np.testing.assert_allclose(out[..., 0],
                             np.clip((raw["ct"] + 600) / 750, -1, 1),
                             atol=1e-5)
  assert abs(out[..., 2].mean()) < 1e-5 and out[..., 2].max() > 1.0
  cfg.contrast_normalization = {"t1": "robust"}
  with pytest.raises(ValueError, match="for contrast 't1'"):
    pipeline.normalization_stats(raw, cfg)
