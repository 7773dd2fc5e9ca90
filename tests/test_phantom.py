"""Tests of the brain phantom simulator and its TFDS builder."""

import numpy as np
import pytest
from scipy import ndimage

from configs import common
from medgen_jax.data import phantom
from medgen_jax.data.builders import brain_phantom

SEED = 0
NUM_SUBJECTS = 8
GEOM = phantom.Geometry(res=32, spatial_dims=2, slices_per_subject=16)
CSF, GM, WM, LESION = (phantom.LABELS[k] for k in phantom.TISSUES)


@pytest.fixture(scope="module")
def subjects():
  return [phantom.simulate_subject(SEED, i, GEOM)
          for i in range(NUM_SUBJECTS)]


def tissue_mean(subjects, contrast, label):
  """Mean of ``contrast`` over all pixels labelled ``label``."""
  return float(np.mean(np.concatenate(
      [s[contrast][s["tissue"] == label] for s in subjects])))


# ----------------------------------------------------------------- atlas ---


def test_atlas_maps_are_partial_volume_fractions():
  atlas = phantom.load_atlas(GEOM.atlas_voxel_mm)
  total = atlas.csf + atlas.gm + atlas.wm
  for m in (atlas.csf, atlas.gm, atlas.wm):
    assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
  assert total.max() <= 1.0 + 1e-5
  # ~1.4-1.9 l of tissue (brain mask volume of ICBM152), in mm^3.
  volume = total.sum() * atlas.voxel_mm ** 3
  assert 1.2e6 < volume < 2.1e6
  assert atlas.wm.sum() > 0.3 * total.sum()


def test_simulated_t1w_matches_real_icbm152_t1():
  # Noise-free T1w from the atlas fractions vs the real ICBM152 T1 image.
  atlas = phantom.load_atlas(GEOM.atlas_voxel_mm)
  params = phantom.PhantomParams(tissue_jitter=0.0)
  tissue = phantom.sample_tissue_params(np.random.default_rng(0), params)
  signals = phantom.contrast_signals(tissue, params.sequence, 2400.0)
  fracs = np.stack([atlas.csf, atlas.gm, atlas.wm])
  brain = fracs.sum(0) > 0.5
  t1w = np.tensordot(signals[0, :3], fracs, axes=1)
  assert np.corrcoef(t1w[brain], atlas.t1[brain])[0, 1] > 0.9
  t2w = np.tensordot(signals[1, :3], fracs, axes=1)
  assert np.corrcoef(t2w[brain], atlas.t1[brain])[0, 1] < -0.5


# --------------------------------------------------------------- physics ---


def test_signal_equations():
  assert phantom.spin_echo(1.0, 1000.0, 100.0, 1e9, 0.0) == pytest.approx(1.0)
  t1, tr = 4000.0, 9000.0
  ti = phantom.null_inversion_time(t1, tr)
  assert 2300 < ti < 2450
  assert phantom.inversion_recovery(1.0, t1, 2000.0, tr, 120.0,
                                    ti) == pytest.approx(0.0, abs=1e-9)
  assert phantom.inversion_recovery(1.0, 600.0, 80.0, tr, 120.0, ti) > 0.1


def test_pure_tissue_signal_ordering():
  params = phantom.PhantomParams(tissue_jitter=0.0)
  tissue = phantom.sample_tissue_params(np.random.default_rng(0), params)
  ti = phantom.null_inversion_time(params.csf[0], params.sequence.flair_tr)
  t1w, t2w, _, flair = phantom.contrast_signals(tissue, params.sequence, ti)
  csf, gm, wm, lesion = range(4)
  assert t1w[wm] > t1w[gm] > t1w[csf]
  assert t2w[csf] > t2w[lesion] > t2w[gm] > t2w[wm]
  assert flair[lesion] > flair[gm] > flair[wm] > flair[csf]


def test_t1w_wm_brighter_than_gm(subjects):
  assert tissue_mean(subjects, "t1w", WM) > 1.05 * tissue_mean(
      subjects, "t1w", GM)
  assert tissue_mean(subjects, "t1w", GM) > tissue_mean(subjects, "t1w", CSF)


def test_t2w_csf_brightest(subjects):
  csf, gm, wm = (tissue_mean(subjects, "t2w", k) for k in (CSF, GM, WM))
  assert csf > gm > wm


def test_flair_csf_darkest(subjects):
  csf, gm, wm = (tissue_mean(subjects, "flair", k) for k in (CSF, GM, WM))
  assert csf < 0.7 * min(gm, wm)


@pytest.mark.parametrize("contrast", ["t2w", "flair"])
def test_lesions_hyperintense(subjects, contrast):
  lesioned = [s for s in subjects if (s["tissue"] == LESION).sum() >= 5]
  assert lesioned, "no subject with lesions"
  for s in lesioned:
    lesion = s[contrast][s["tissue"] == LESION].mean()
    wm = s[contrast][s["tissue"] == WM].mean()
    assert lesion > 1.2 * wm


def test_rician_background_matches_snr():
  params = phantom.PhantomParams(snr=20.0)
  s = phantom.simulate_subject(SEED, 1, GEOM, params)
  air = s["fractions"].sum(0) == 0  # pure noise: Rayleigh distributed
  for c in phantom.CONTRASTS:
    sigma = s[c][s["tissue"] > 0].mean() / params.snr
    assert s[c][air].mean() == pytest.approx(sigma * np.sqrt(np.pi / 2),
                                             rel=0.15)


def test_separable_spline_equals_map_coordinates():
  atlas = phantom.load_atlas(GEOM.atlas_voxel_mm)
  field = phantom.random_smooth_field(np.random.default_rng(1), 2, 6, 1.0)
  axes = phantom.grid_axes(GEOM, atlas)
  points = phantom.sample_points(axes)
  idx = (points - atlas.center.reshape(3, 1, 1, 1) + GEOM.fov_mm / 2) * (
      6 / GEOM.fov_mm) - 0.5
  ref = np.stack([ndimage.map_coordinates(f, idx, order=3, mode="nearest")
                  for f in field])
  got = phantom.eval_field(field, axes, atlas.center, GEOM.fov_mm)
  np.testing.assert_allclose(got, ref, atol=1e-10)


# ---------------------------------------------------- outputs and labels ---


def test_output_shapes_and_dtypes(subjects):
  s = subjects[0]
  z = GEOM.slices_per_subject
  for c in phantom.CONTRASTS:
    assert s[c].shape == (z, 32, 32) and s[c].dtype == np.float32
    assert np.isfinite(s[c]).all() and s[c].min() >= 0
  assert s["tissue"].dtype == np.uint8 and s["tissue"].max() <= LESION
  assert s["lesion_mask"].dtype == np.uint8
  assert s["slice_index"].shape == (z,)
  assert np.all(np.diff(s["slice_index"]) > 0)
  # Every slice holds a sizeable brain cross-section that fits the FOV.
  brain = s["tissue"] > 0
  assert brain.sum(axis=(1, 2)).min() > 0.1 * 32 * 32
  assert not brain[:, [0, -1], :].any() and not brain[:, :, [0, -1]].any()


def test_lesion_mask_agrees_with_tissue(subjects):
  for s in subjects:
    mask = s["lesion_mask"].astype(bool)
    assert np.all(s["tissue"][mask] == LESION)
    if s["num_lesions"] == 0:
      assert not (s["tissue"] == LESION).any() and not mask.any()
  healthy = [phantom.is_healthy(SEED, i, 0.2) for i in range(NUM_SUBJECTS)]
  assert [s["num_lesions"] == 0 for s in subjects] == healthy
  assert any(healthy) and not all(healthy)


def test_slice_labels_balanced(subjects):
  labels = np.array([[phantom.has_lesion(m) for m in s["lesion_mask"]]
                     for s in subjects])
  assert 0.15 < labels.mean() < 0.7
  assert phantom.has_lesion(np.array([[1, 1, 0]]))
  assert not phantom.has_lesion(np.array([[1, 0, 0]]))


def test_healthy_fraction_is_stable():
  healthy = [phantom.is_healthy(3, i, 0.2) for i in range(50)]
  assert sum(healthy) in (9, 10, 11)


# ----------------------------------------------------------- determinism ---


def test_same_seed_same_subject(subjects):
  again = phantom.simulate_subject(SEED, 2, GEOM)
  for k, v in subjects[2].items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_different_subject_or_seed_differs(subjects):
  assert not np.array_equal(subjects[0]["t2w"], subjects[1]["t2w"])
  other = phantom.simulate_subject(SEED + 1, 0, GEOM)
  assert not np.array_equal(subjects[0]["tissue"], other["tissue"])


def test_snr_changes_noise_only(subjects):
  clean = phantom.simulate_subject(
      SEED, 0, GEOM, phantom.PhantomParams(snr=float("inf")))
  np.testing.assert_array_equal(clean["tissue"], subjects[0]["tissue"])
  assert not np.array_equal(clean["t1w"], subjects[0]["t1w"])
  brain = clean["tissue"] > 0
  assert np.abs(clean["t1w"] - subjects[0]["t1w"])[brain].mean() < 0.05 * (
      clean["t1w"][brain].mean())


# ------------------------------------------------------------- builder ---


def test_split_subjects():
  splits = brain_phantom.split_subjects(40, seed=0)
  assert [len(splits[k]) for k in brain_phantom.SPLITS] == [28, 6, 6]
  ids = np.concatenate(list(splits.values()))
  assert sorted(ids.tolist()) == list(range(40))
  small = brain_phantom.split_subjects(5, seed=0)
  assert [len(small[k]) for k in brain_phantom.SPLITS] == [3, 1, 1]
  again = brain_phantom.split_subjects(40, seed=0)
  assert all(np.array_equal(splits[k], again[k]) for k in splits)
  other = brain_phantom.split_subjects(40, seed=1)
  assert not np.array_equal(splits["val"], other["val"])


def test_config_names():
  a = brain_phantom.make_builder_config(2, 32, 40, 30.0, 0)
  assert a.name == "d2_r32_n40_snr30_s0_k16_l24"
  assert a is brain_phantom.BrainPhantom.BUILDER_CONFIGS[0]
  b = brain_phantom.make_builder_config(3, 64, 10, 12.5, 7,
                                        slices_per_subject=4, max_lesions=3)
  assert b.name == "d3_r64_n10_snr12p5_s7_k4_l3"
  assert (b.spatial_dims, b.res, b.num_subjects, b.snr, b.seed) == (
      3, 64, 10, 12.5, 7)


def _data_cfg(data_dir, **kw):
  cfg = common.data_config(res=kw.pop("res", 32), **kw)
  cfg.data_dir = str(data_dir)
  return cfg


@pytest.fixture(scope="module")
def built_2d(tmp_path_factory):
  cfg = _data_cfg(tmp_path_factory.mktemp("tfds2d"),
                  num_subjects=NUM_SUBJECTS, seed=SEED)
  return cfg, brain_phantom.prepare(cfg)


def test_builder_2d_splits(built_2d):
  cfg, builder = built_2d
  assert builder.is_prepared()
  assert set(builder.info.splits) == set(brain_phantom.SPLITS)
  expected = brain_phantom.split_subjects(NUM_SUBJECTS, SEED)
  seen = {}
  for split in brain_phantom.SPLITS:
    source = builder.as_data_source(split)
    examples = [source[i] for i in range(len(source))]
    seen[split] = {int(e["subject_id"]) for e in examples}
    assert seen[split] == set(expected[split].tolist())
    assert len(examples) == len(seen[split]) * GEOM.slices_per_subject
  assert not seen["train"] & seen["val"]
  assert not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
  train = builder.as_data_source("train")
  labels = {int(train[i]["label"]) for i in range(len(train))}
  assert labels == {0, 1}
  assert builder.builder_config.res == cfg.res


def test_builder_2d_features(built_2d):
  _, builder = built_2d
  source = builder.as_data_source("val")
  e = source[0]
  for c in phantom.CONTRASTS:
    assert e[c].shape == (32, 32) and e[c].dtype == np.float32
  for k in ("tissue", "lesion_mask"):
    assert e[k].shape == (32, 32) and e[k].dtype == np.uint8
  assert builder.info.features["label"].names == ["no_lesion", "lesion"]
  assert int(e["label"]) == int(phantom.has_lesion(e["lesion_mask"]))
  assert e["slice_index"] >= 0
  # The stored example is exactly the simulated one.
  cfg = builder.builder_config
  key = f"s{int(e['subject_id']):05d}_z{int(e['slice_index']):03d}"
  regenerated = dict(brain_phantom.subject_examples(cfg,
                                                    int(e["subject_id"])))
  for k, v in regenerated[key].items():
    np.testing.assert_array_equal(e[k], v, err_msg=k)


def test_prepare_reuses_existing(built_2d):
  cfg, builder = built_2d
  again = brain_phantom.prepare(cfg)
  assert again.data_dir == builder.data_dir
  assert again.info.splits["train"].num_examples == (
      builder.info.splits["train"].num_examples)


def test_builder_3d(tmp_path):
  cfg = _data_cfg(tmp_path, res=16, spatial_dims=3, num_subjects=5)
  builder = brain_phantom.prepare(cfg)
  assert builder.builder_config.name.startswith("d3_r16_n5_")
  sizes = [builder.info.splits[k].num_examples for k in brain_phantom.SPLITS]
  assert sizes == [3, 1, 1]
  e = builder.as_data_source("test")[0]
  for c in phantom.CONTRASTS + ("tissue", "lesion_mask"):
    assert e[c].shape == (16, 16, 16)
  assert e["t2w"].dtype == np.float32 and e["tissue"].dtype == np.uint8
  assert e["slice_index"] == -1
  assert (e["tissue"] > 0).sum() > 0.1 * 16 ** 3


def test_failed_build_leaves_no_dataset(tmp_path, monkeypatch):
  cfg = _data_cfg(tmp_path, res=16, spatial_dims=3, num_subjects=5, seed=3)

  def boom(*args, **kwargs):
    raise RuntimeError("killed")
    yield  # pylint: disable=unreachable

  monkeypatch.setattr(brain_phantom, "subject_examples", boom)
  with pytest.raises(RuntimeError, match="killed"):
    brain_phantom.prepare(cfg)
  assert not brain_phantom.load_builder(cfg).is_prepared()
  assert not list(tmp_path.glob("brain_phantom/*/1.0.0"))
