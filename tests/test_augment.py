"""Classical augmentation: exactness of the trivial cases, geometry, masks.

Each config is jitted once per module (fixtures) and reused across tests.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from medgen_jax.data import augment

OFF = dict(flip_prob=0.0, affine_prob=0.0, elastic_prob=0.0, gamma_prob=0.0,
           bias_prob=0.0, contrast_prob=0.0, brightness_prob=0.0,
           noise_prob=0.0)
INTENSITY = ("gamma_prob", "bias_prob", "contrast_prob", "brightness_prob",
             "noise_prob")


def _jit(spatial_dims=2, **overrides):
  cfg = common.augment_config(**{**OFF, **overrides})
  return jax.jit(augment.make_augment_fn(cfg, spatial_dims))


def _blobs(shape, rng):
  """Integer label map ``[*shape]`` in {0..3}: off-centre ellipses."""
  grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
  labels = np.zeros(shape, np.uint8)
  for lab in (1, 2, 3):
    centre = rng.uniform(-0.5, 0.5, len(shape))
    radii = rng.uniform(0.25, 0.5, len(shape))
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    labels[inside < 1] = lab
  return labels


def _batch(shape, seed=0):
  """Image ``[B, *S, 2]`` that is asymmetric, plus masks and labels."""
  rng = np.random.default_rng(seed)
  b, spatial = shape[0], shape[1:]
  tissue = np.stack([_blobs(spatial, rng) for _ in range(b)])
  ramp = np.linspace(0, 1, int(np.prod(spatial))).reshape(spatial)
  ramp = np.broadcast_to(ramp, tissue.shape)
  image = np.stack([tissue / 3.0 * 2 - 1, ramp * 2 - 1], -1)
  image = image + 0.05 * rng.standard_normal(image.shape)
  return {
      "image": jnp.asarray(image, jnp.float32),
      "tissue": jnp.asarray(tissue, jnp.uint8),
      "lesion_mask": jnp.asarray(tissue == 3, jnp.uint8),
      "label": jnp.arange(b, dtype=jnp.int32),
  }


@pytest.fixture(scope="module")
def batch2d():
  return _batch((6, 24, 24))


@pytest.fixture(scope="module")
def batch3d():
  return _batch((2, 8, 8, 8))


@pytest.fixture(scope="module")
def spatial_fn():
  """Strong flip + affine + elastic, no intensity changes."""
  return _jit(flip_prob=0.5, affine_prob=1.0, rotate_deg=30.0,
              scale=(0.8, 1.2), translate_frac=0.1, shear=0.1,
              elastic_prob=1.0, elastic_grid=4, elastic_magnitude_px=1.5)


@pytest.fixture(scope="module")
def intensity_fn():
  """Every intensity transform, on channel 0 only (channel 1 as a target)."""
  cfg = common.augment_config(**{**OFF, **{k: 1.0 for k in INTENSITY}},
                              log_gamma=0.5, noise_std=(0.05, 0.1))
  return jax.jit(augment.make_augment_fn(cfg, 2, intensity_channels=(0,)))


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), k)


def test_all_probabilities_zero_is_identity(batch2d):
  out = _jit()(jax.random.key(0), batch2d)
  _assert_same(out, batch2d)


def test_strength_scales_every_probability(batch2d):
  fn = jax.jit(augment.make_augment_fn(
      common.augment_config(**{**OFF, "affine_prob": 1.0, "rotate_deg": 30.0,
                               "brightness_prob": 1.0}), 2))
  key = jax.random.key(0)
  _assert_same(fn(key, batch2d, 0.0), batch2d)  # one program, any strength
  full = fn(key, batch2d, 1.0)
  assert not np.array_equal(np.asarray(full["image"]),
                            np.asarray(batch2d["image"]))
  _assert_same(fn(key, batch2d), full)  # 1 is the default


def test_disabled_is_identity(batch2d):
  fn = augment.make_augment_fn(common.augment_config(enabled=False), 2)
  _assert_same(fn(jax.random.key(0), batch2d), batch2d)


def test_flip_matches_jnp_flip(batch2d):
  out = _jit(flip_prob=1.0)(jax.random.key(1), batch2d)
  # Default flip axis: the last spatial axis (patient left-right).
  np.testing.assert_array_equal(out["image"], jnp.flip(batch2d["image"], 2))
  for k in ("tissue", "lesion_mask"):
    np.testing.assert_array_equal(out[k], jnp.flip(batch2d[k], 2))
  np.testing.assert_array_equal(out["label"], batch2d["label"])


def test_rotation_90_matches_rot90(batch2d):
  fn = _jit(affine_prob=1.0, rotate_deg=(90.0, 90.0), scale=(1.0, 1.0),
            translate_frac=0.0, shear=0.0)
  out = fn(jax.random.key(2), batch2d)
  # Positive angles are counter-clockwise as displayed, like rot90(k=1).
  want = jnp.rot90(batch2d["image"], k=1, axes=(1, 2))
  np.testing.assert_allclose(out["image"], want, atol=1e-4)
  np.testing.assert_array_equal(
      out["tissue"], jnp.rot90(batch2d["tissue"], k=1, axes=(1, 2)))


def test_image_and_mask_stay_aligned(spatial_fn):
  batch = _batch((6, 24, 24), seed=3)
  lesion = batch["lesion_mask"]
  image = (2.0 * lesion - 1.0)[..., None].astype(jnp.float32)
  batch["image"] = jnp.concatenate([image, image], axis=-1)
  out = spatial_fn(jax.random.key(3), batch)
  thresholded = np.asarray(out["image"][..., 0] > 0)
  nearest = np.asarray(out["lesion_mask"]) == 1
  # The transform moved things (otherwise alignment is trivial) ...
  assert (nearest != np.asarray(lesion == 1)).mean() > 0.02
  # ... and linear-then-threshold agrees with nearest except on boundaries.
  assert (thresholded == nearest).mean() > 0.97


def test_masks_keep_label_set_and_dtype(spatial_fn, batch2d):
  out = spatial_fn(jax.random.key(4), batch2d)
  for k in ("tissue", "lesion_mask"):
    assert out[k].dtype == batch2d[k].dtype
    assert set(np.unique(out[k])) <= set(np.unique(batch2d[k]))
  # Out-of-field image fill is the per-channel minimum, so no value drops
  # below it and no NaN appears.
  lo = batch2d["image"].min(axis=(1, 2))
  assert np.all(np.asarray(out["image"].min(axis=(1, 2))) >= lo - 1e-6)


def test_deterministic_given_key(spatial_fn, intensity_fn, batch2d):
  for fn in (spatial_fn, intensity_fn):
    a = fn(jax.random.key(5), batch2d)
    b = fn(jax.random.key(5), batch2d)
    c = fn(jax.random.key(6), batch2d)
    _assert_same(a, b)
    assert not np.array_equal(a["image"], c["image"])


def test_parameters_differ_across_batch(spatial_fn, intensity_fn):
  one = _batch((1, 24, 24), seed=7)
  same = {k: jnp.repeat(v, 6, axis=0) for k, v in one.items()}
  for fn in (spatial_fn, intensity_fn):
    img = np.asarray(fn(jax.random.key(7), same)["image"])
    for i in range(len(img)):
      for j in range(i):
        assert not np.allclose(img[i], img[j]), (i, j)


def test_intensity_leaves_masks_and_stays_finite(intensity_fn, batch2d):
  out = intensity_fn(jax.random.key(8), batch2d)
  for k in ("tissue", "lesion_mask", "label"):
    np.testing.assert_array_equal(out[k], batch2d[k])
  # intensity_channels=(0,): channel 1 is untouched.
  np.testing.assert_array_equal(out["image"][..., 1],
                                batch2d["image"][..., 1])
  x = np.asarray(out["image"][..., :1])
  x0 = np.asarray(batch2d["image"][..., :1])
  assert np.isfinite(x).all()
  assert np.abs(x - x0).mean() > 0.02
  # clip="input": each example keeps its per-channel input range.
  assert np.all(x.min(axis=(1, 2)) >= x0.min(axis=(1, 2)) - 1e-6)
  assert np.all(x.max(axis=(1, 2)) <= x0.max(axis=(1, 2)) + 1e-6)


def test_3d_full_pipeline_shapes_and_flip(batch3d):
  """Every 3D code path at once: degenerate affine and elastic (identity)
  composed with a two-axis flip, intensity transforms on channel 0 only."""
  cfg = common.augment_config(
      flip_prob=1.0, flip_axes=(0, -1), affine_prob=1.0, rotate_deg=0.0,
      scale=(1.0, 1.0), translate_frac=0.0, shear=0.0, elastic_prob=1.0,
      elastic_magnitude_px=0.0, **{k: 1.0 for k in INTENSITY})
  fn = jax.jit(augment.make_augment_fn(cfg, 3, intensity_channels=(0,)))
  out = fn(jax.random.key(9), batch3d)
  for k in batch3d:
    assert out[k].shape == batch3d[k].shape and out[k].dtype == batch3d[k].dtype
  flipped = jnp.flip(batch3d["image"], (1, 3))
  np.testing.assert_array_equal(out["image"][..., 1], flipped[..., 1])
  for k in ("tissue", "lesion_mask"):
    np.testing.assert_array_equal(out[k], jnp.flip(batch3d[k], (1, 3)))
  x = np.asarray(out["image"][..., 0])
  assert np.isfinite(x).all()
  assert np.abs(x - np.asarray(flipped[..., 0])).mean() > 0.01


def test_resample_matches_map_coordinates():
  rng = np.random.default_rng(10)
  image = jnp.asarray(rng.standard_normal((9, 7, 3)), jnp.float32)
  fill = jnp.asarray([-1.0, 0.5, 2.0])
  # Coordinates partly outside the field of view, and exact integers.
  coords = jnp.asarray(rng.uniform(-2, 10, (2, 5, 6)), jnp.float32)
  coords = coords.at[:, 0].set(jnp.round(coords[:, 0]))

  @jax.jit
  def both(img, q):
    return [(augment.resample(img, q, o, fill),
             augment.resample_map_coordinates(img, q, o, fill))
            for o in (0, 1)]

  for ours, ref in both(image, coords):
    assert ours.shape == (5, 6, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_bias_field_and_gamma_blocks():
  @jax.jit
  def blocks(key, x):
    field = augment.bias_field(key, (16, 12), order=3, strength=0.3)
    return field, augment.apply_gamma(x, 2.0)

  x = jnp.linspace(-1.0, 0.6, 40).reshape(5, 8, 1)
  field, y = blocks(jax.random.key(11), x)
  log = np.log(np.asarray(field))
  assert field.shape == (16, 12) and np.isfinite(log).all()
  np.testing.assert_allclose(log.mean(), 0.0, atol=1e-5)
  # Smooth but not flat: neighbours differ by a few percent at most.
  assert np.abs(np.diff(log, axis=0)).max() < 0.2 and log.std() > 0.01
  y = np.asarray(y)
  np.testing.assert_allclose([y.min(), y.max()], [-1.0, 0.6], atol=1e-6)
  assert (np.diff(y.ravel()) > 0).all()
  assert (y <= np.asarray(x) + 1e-6).all()  # gamma > 1 darkens mid-tones


def test_rician_noise_stays_above_background():
  x = jnp.full((6, 6, 1), -1.0).at[2:4, 2:4].set(0.5)
  bg = jnp.full((1, 1, 1), -1.0)
  noisy = jax.jit(lambda k: augment.random_noise(k, x, (0.2, 0.2), "rician",
                                                 bg))
  y = np.asarray(noisy(jax.random.key(12)))
  assert (y >= -1.0).all() and np.abs(y - np.asarray(x)).max() > 0.01


def test_config_errors_name_each_field():
  bad = common.augment_config(flip_prob=1.5, scale=(1.2, 0.8),
                              flip_axes=(2,), noise_type="poisson",
                              rotate_deg=-5.0)
  with pytest.raises(ValueError) as e:
    augment.make_augment_fn(bad, 2)
  for key in ("augment.flip_prob", "augment.scale", "augment.flip_axes",
              "augment.noise_type", "augment.rotate_deg"):
    assert key in str(e.value)
  assert augment.config_errors(common.augment_config(), 2) == []
  assert augment.config_errors(common.augment_config(flip_axes=(2,)), 3) == []
  with pytest.raises(ValueError, match="flip_probb"):
    common.augment_config(flip_probb=0.5)
  missing = ml_collections.ConfigDict(dict(enabled=True))
  assert "missing" in augment.config_errors(missing, 2)[0]


def test_bad_batch_names_the_key(batch2d):
  fn = augment.make_augment_fn(common.augment_config(), 3)
  with pytest.raises(ValueError, match=r"batch\['image'\].*\[B, D, H, W, C\]"):
    fn(jax.random.key(0), batch2d)
  fn = augment.make_augment_fn(common.augment_config(), 2)
  bad = {**batch2d, "tissue": batch2d["tissue"][:, :8]}
  with pytest.raises(ValueError, match="tissue"):
    fn(jax.random.key(0), bad)
