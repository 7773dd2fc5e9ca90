"""nifti_folder: layouts, geometry, labels, training on it, and bad input."""

import dataclasses
import gzip
import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest

from configs import common, ddpm
from medgen_jax import config_check
from medgen_jax.data import builder_lib
from medgen_jax.data import pipeline
from medgen_jax.data import volumes
from medgen_jax.data.builder_lib import DataError
from medgen_jax.data.builders import nifti_folder

SHAPE = (12, 14, 6)
# LAS voxel axes (x flipped), 2 mm slices: the builder must reorient to RAS.
AFFINE = np.array([[-1.0, 0, 0, 20], [0, 1.0, 0, -30], [0, 0, 2.0, 5],
                   [0, 0, 0, 1]])
MODALITIES = {"t1": "{subject}/t1.nii.gz", "t2": "{subject}/t2.nii.gz"}
CLASSES = ("control", "patient")


def _save(arr, path, affine=AFFINE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(arr, affine), path)


def write_subject(root, name, seed, dtype=np.float32):
  """A head-like blob in t1/t2 (t2 stored as int16) and a 2-class seg."""
  rng = np.random.default_rng(seed)
  x = np.zeros(SHAPE, np.float32)
  x[2:10, 3:12, 1:5] = 100 + rng.normal(0, 3, (8, 9, 4))
  _save(x.astype(dtype), f"{root}/{name}/t1.nii.gz")
  _save((2 * x).astype(np.int16), f"{root}/{name}/t2.nii.gz")
  seg = np.zeros(SHAPE, np.uint8)
  seg[4:7, 5:8, 2:4] = 4        # BraTS-like label values 0/1/4
  seg[3, 4, 1] = 1
  _save(seg, f"{root}/{name}/seg.nii.gz")


def write_root(root, n=4, labels=True):
  for i in range(n):
    write_subject(root, f"sub-{i:02d}", i)
  if labels:
    with open(f"{root}/labels.csv", "w") as f:
      f.write("subject,label\n")
      for i in range(n):
        f.write(f"sub-{i:02d},{CLASSES[i % 2]}\n")
  return str(root)


def cfg(root, data_dir, **kw):
  args = dict(root=root, modalities=MODALITIES, mask="{subject}/seg.nii.gz",
              mask_values=(0, 1, 4), labels_csv="labels.csv",
              class_names=CLASSES, res=16, batch_size=4,
              data_dir=str(data_dir))
  args.update(kw)
  return common.nifti_data_config(**args)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = write_root(tmp_path_factory.mktemp("brats"))
  data_cfg = cfg(root, tmp_path_factory.mktemp("data"))
  return data_cfg, nifti_folder.prepare(data_cfg)


def _all(data_cfg):
  return {s: pipeline.read_split(data_cfg, s) for s in ("train", "val",
                                                        "test")}


def test_slices_masks_labels_and_split_by_subject(built):
  data_cfg, builder = built
  splits = _all(data_cfg)
  subjects = {s: set(a["subject"].astype(str)) for s, a in splits.items()}
  assert sorted(set.union(*subjects.values())) == [f"sub-{i:02d}"
                                                   for i in range(4)]
  assert sum(len(v) for v in subjects.values()) == 4  # disjoint
  meta = builder.info.metadata["subjects"]
  assert {k: set(v) for k, v in meta.items()} == subjects
  for a in splits.values():
    assert a["t1"].shape[1:] == (16, 16) and a["t1"].dtype == np.float32
    assert a["mask"].dtype == np.uint8
    for subj, label in zip(a["subject"].astype(str), a["label"]):
      assert CLASSES[label] == CLASSES[int(subj[-2:]) % 2]
  masks = np.concatenate([a["mask"] for a in splits.values()])
  # 0/1/4 stored as their index in mask_values.
  assert set(np.unique(masks)) == {0, 1, 2}
  # Empty slices (z=0 and z=5 have no foreground) are filtered.
  idx = np.concatenate([a["slice_index"] for a in splits.values()])
  assert set(idx) == {1, 2, 3, 4}
  # volume_norm="auto": each MR volume's foreground p0.5/p99.5 -> [0, 1].
  a = splits["train"]
  assert a["t1"].min() >= 0 and a["t2"].max() <= 1
  np.testing.assert_allclose(a["t2"].max(), a["t1"].max(), rtol=0.02)


def test_same_settings_reuse_the_build_and_new_settings_get_a_new_dir(built):
  data_cfg, builder = built
  again = nifti_folder.load_builder(data_cfg)
  assert again.builder_config.name == builder.builder_config.name
  assert again.is_prepared()
  other = nifti_folder.load_builder(cfg(data_cfg.root, data_cfg.data_dir,
                                        split_seed=1))
  assert other.builder_config.name != builder.builder_config.name
  assert not other.is_prepared()


def test_model_arrays_pass_the_mask_through(built):
  data_cfg, _ = built
  raw = pipeline.read_split(data_cfg, "train")
  stats = pipeline.normalization_stats(raw, data_cfg)
  out = pipeline.to_model_arrays(raw, data_cfg, stats)
  assert out["image"].shape == raw["t1"].shape + (2,)
  np.testing.assert_array_equal(out["mask"], raw["mask"])


def test_reorients_to_ras_display_layout(tmp_path):
  """A marker right-anterior in LAS voxels shows up top-right on screen."""
  for i in range(3):
    x = np.full(SHAPE, 10.0, np.float32)
    seg = np.zeros(SHAPE, np.uint8)
    # LAS: small voxel i = patient right; large j = anterior.
    seg[0:3, 11:14, :] = 1
    _save(x, f"{tmp_path}/src/s{i}/t1.nii.gz")
    _save(seg, f"{tmp_path}/src/s{i}/seg.nii.gz")
  c = cfg(f"{tmp_path}/src", tmp_path / "data",
          modalities={"t1": "{subject}/t1.nii.gz"}, labels_csv="",
          class_names=(), mask_values=(), res=12, crop_foreground=False,
          keep_aspect=False, min_foreground=0.0, foreground_threshold=0.0)
  assert c.label_source == "mask" and c.num_classes == 2
  a = pipeline.read_split(c, "train")
  m = a["mask"][0]
  rows, cols = np.nonzero(m)
  assert rows.max() < 4 and cols.min() >= 8   # anterior top, right side
  assert a["label"].all()
  # Axial slices of a 6-slice volume, every one kept.
  assert sorted(set(a["slice_index"])) == list(range(SHAPE[2]))


def test_ixi_like_layout_with_modality_folders(tmp_path):
  for i, name in enumerate(["IXI002-Guys-0828", "IXI012-HH-1211",
                            "IXI013-HH-1212"]):
    write_subject(tmp_path / "tmp", name, i)
    for m in ("t1", "t2"):
      os.makedirs(tmp_path / "ixi" / m.upper(), exist_ok=True)
      os.rename(tmp_path / "tmp" / name / f"{m}.nii.gz",
                tmp_path / "ixi" / m.upper() / f"{name}-{m.upper()}.nii.gz")
  c = cfg(str(tmp_path / "ixi"), tmp_path / "data",
          modalities={"t1": "T1/{subject}-T1.nii.gz",
                      "t2": "T2/{subject}-T2.nii.gz"},
          mask="", labels_csv="", class_names=(), mask_values=())
  assert c.label_source == "none" and c.num_classes == 1
  assert not nifti_folder.validate_config(c)
  builder = nifti_folder.prepare(c)
  names = sorted(n for v in builder.info.metadata["subjects"].values()
                 for n in v)
  assert names == ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212"]
  assert "mask" not in builder.info.features


def test_3d_volumes_patches_and_resampling(tmp_path):
  root = write_root(tmp_path / "src", n=3)
  vol = pipeline.read_split(cfg(root, tmp_path / "d1", spatial_dims=3, res=8),
                            "train")
  assert vol["t1"].shape[1:] == (8, 8, 8) and vol["mask"].shape[1:] == (8,) * 3
  assert (vol["slice_index"] == -1).all()
  pc = cfg(root, tmp_path / "d2", spatial_dims=3, res=4, volume_mode="patches",
           crop_foreground=False, min_foreground=0.0,
           foreground_threshold=0.0)
  patches = pipeline.read_split(pc, "train")
  assert patches["t1"].shape[1:] == (4, 4, 4)
  # Display volume [6 slices, 14 rows, 12 cols] -> 2 x 4 x 3 patches of 4.
  per_subject = len(patches["t1"]) // len(set(patches["subject"]))
  assert per_subject == 2 * 4 * 3
  assert patches["patch_origin"].max(axis=0).tolist() == [2, 10, 8]
  # 2 mm slices resampled to 1 mm: twice as many axial slices.
  rc = cfg(root, tmp_path / "d3", target_spacing=(1.0, 1.0, 1.0),
           min_foreground=0.0, foreground_threshold=0.0,
           crop_foreground=False)
  one = pipeline.read_split(rc, "train")
  per = np.unique(one["subject"], return_counts=True)[1]
  assert (per == 2 * SHAPE[2]).all()


def test_volume_zscore_normalisation(tmp_path):
  root = write_root(tmp_path / "src", n=3)
  c = cfg(root, tmp_path / "d", volume_norm="zscore", crop_foreground=False)
  a = pipeline.read_split(c, "train")
  inside = a["t1"][a["t1"] > -0.5]
  assert abs(float(np.median(inside))) < 1.0 and a["t1"].min() < -0.5


def test_inspect_prints_summary_and_writes_grid(built, tmp_path, capsys):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from medgen_jax import commands  # pylint: disable=import-outside-toplevel
  data_cfg, builder = built
  out = commands.run("inspect", _ddpm_with(data_cfg), str(tmp_path))
  text = capsys.readouterr().out
  n = {s: builder.info.splits[s].num_examples for s in ("train", "val",
                                                         "test")}
  assert f"train: {n['train']} examples, 2 subjects" in text
  train = out["splits"]["train"]
  assert sum(train["classes"].values()) == n["train"]
  assert "t2" in text and "p99.5=" in text and "mask values" in text
  assert set(train["masks"]["mask"]["values"]) == {0, 1, 2}
  assert train["features"]["t1"] == {"shape": [16, 16], "dtype": "float32"}
  assert train["intensity"]["t2"]["max"] > train["intensity"]["t1"]["max"]
  png = tmp_path / "inspect" / "nifti_folder_grid.png"
  assert out["grid"] == str(png)
  grid = np.asarray(Image.open(png))
  # Two contrast blocks; mask labels drawn in colour (R != G somewhere).
  assert grid.ndim == 3 and grid.shape[0] > grid.shape[1]
  assert (grid[..., 0] != grid[..., 1]).any()
  assert (tmp_path / "inspect" / "nifti_folder_summary.json").exists()


# ------------------------------------------------------ DDPM on NIfTI data --


def _ddpm_with(data):
  c = ddpm.get_config("res=16,runlocal")
  c.data = data
  return c


def test_ddpm_trains_on_a_nifti_folder_by_changing_only_the_data_section(
    built, tmp_path):
  from medgen_jax.train import trainer  # pylint: disable=import-outside-toplevel
  data_cfg, _ = built
  c = _ddpm_with(cfg(data_cfg.root, data_cfg.data_dir, batch_size=4))
  config_check.validate(c)
  c.train.update(num_steps=2, sample_every=0, log_every=1)
  out = trainer.train(c, str(tmp_path))
  assert out["step"] == 2 and np.isfinite(out["metrics"]["loss"])
  with open(tmp_path / "data_stats.json") as f:
    meta = json.load(f)
  assert meta["contrasts"] == ["t1", "t2"]
  assert meta["image_shape"] == [16, 16, 2]


# -------------------------------------------------------------- bad input --


def _no_dataset_left(data_dir):
  path = os.path.join(data_dir, "nifti_folder")
  return not os.path.exists(path) or not os.listdir(path)


def _fails(c, *patterns):
  with pytest.raises(DataError) as e:
    nifti_folder.prepare(c)
  msg = str(e.value)
  for p in patterns:
    assert p in msg, msg
  assert _no_dataset_left(c.data_dir)
  return msg


def test_corrupt_file(tmp_path):
  root = write_root(tmp_path / "src", n=3)
  bad = f"{root}/sub-01/t2.nii.gz"
  with open(bad, "wb") as f:
    f.write(b"this is not a nifti file" * 10)
  _fails(cfg(root, tmp_path / "data"), bad, "not a readable NIfTI file")


def test_truncated_file_fails_mid_build_and_leaves_nothing(tmp_path):
  root = write_root(tmp_path / "src", n=3)
  bad = f"{root}/sub-02/t1.nii.gz"
  with gzip.open(bad) as f:
    raw = f.read()
  with gzip.open(bad, "wb") as f:
    f.write(raw[:len(raw) // 2])   # header intact, voxels cut
  _fails(cfg(root, tmp_path / "data"), bad, "truncated or corrupt image data")


def test_missing_modality(tmp_path):
  root = write_root(tmp_path / "src", n=4)
  os.remove(f"{root}/sub-03/t2.nii.gz")
  _fails(cfg(root, tmp_path / "data"), f"{root}/sub-03/t2.nii.gz",
         "missing modality 't2' for subject 'sub-03'")
  # Opting in skips the subject instead.
  c = cfg(root, tmp_path / "data", skip_incomplete=True)
  subjects = nifti_folder.prepare(c).info.metadata["subjects"]
  assert "sub-03" not in sum(subjects.values(), [])


def test_mismatched_shapes_and_affines(tmp_path):
  root = write_root(tmp_path / "a", n=3)
  _save(np.zeros((12, 14, 7), np.float32), f"{root}/sub-01/t2.nii.gz")
  _fails(cfg(root, tmp_path / "data"), f"{root}/sub-01/t2.nii.gz",
         "shape (12, 14, 7) differs from (12, 14, 6)", "co-registered")
  root = write_root(tmp_path / "b", n=3)
  moved = AFFINE.copy()
  moved[0, 3] += 1.5
  _save(np.zeros(SHAPE, np.uint8), f"{root}/sub-02/seg.nii.gz", moved)
  _fails(cfg(root, tmp_path / "data"), f"{root}/sub-02/seg.nii.gz",
         "affine differs", "by up to 1.5 mm")


def test_nan_voxels(tmp_path):
  root = write_root(tmp_path / "src", n=3)
  x = np.ones(SHAPE, np.float32)
  x[1, 1, 1] = np.nan
  x[2, 2, 2] = np.inf
  _save(x, f"{root}/sub-00/t1.nii.gz")
  _fails(cfg(root, tmp_path / "data"), f"{root}/sub-00/t1.nii.gz",
         "2 NaN/Inf voxels")


def test_empty_folder_and_no_match(tmp_path):
  os.makedirs(tmp_path / "empty")
  _fails(cfg(str(tmp_path / "empty"), tmp_path / "data"), "empty folder")
  root = write_root(tmp_path / "src", n=3)
  _fails(cfg(root, tmp_path / "data", modalities={"t1": "{subject}/T1w.nii"}),
         root, "no file matches the modality 't1' pattern")


def test_unknown_mask_values(tmp_path):
  root = write_root(tmp_path / "src", n=3)
  seg = np.zeros(SHAPE, np.uint8)
  seg[5, 5, 2] = 3
  _save(seg, f"{root}/sub-01/seg.nii.gz")
  _fails(cfg(root, tmp_path / "data"), f"{root}/sub-01/seg.nii.gz",
         "unknown label values [3]", "data.mask_values=(0, 1, 4)")
  soft = np.zeros(SHAPE, np.float32)
  soft[5, 5, 2] = 0.5
  _save(soft, f"{root}/sub-01/seg.nii.gz")
  _fails(cfg(root, tmp_path / "data"), f"{root}/sub-01/seg.nii.gz",
         "non-integer label values")


def test_unknown_and_missing_csv_labels(tmp_path):
  root = write_root(tmp_path / "src", n=3)
  with open(f"{root}/labels.csv", "w") as f:
    f.write("subject,label\nsub-00,control\nsub-01,sick\nsub-02,patient\n")
  _fails(cfg(root, tmp_path / "data"), f"{root}/labels.csv",
         "line 3: unknown label 'sick' for 'sub-01'")
  with open(f"{root}/labels.csv", "w") as f:
    f.write("subject,label\nsub-00,control\nsub-02,1\n")
  _fails(cfg(root, tmp_path / "data"), f"{root}/labels.csv",
         "no row for subject 'sub-01'")


def test_ambiguous_pattern(tmp_path):
  root = write_root(tmp_path / "src", n=3)
  _fails(cfg(root, tmp_path / "data", modalities={"t": "{subject}/t*.nii.gz"}),
         "2 files match modality 't' pattern '{subject}/t*.nii.gz' for "
         "subject 'sub-00'", "more specific")


def test_explicit_split_column(tmp_path):
  root = write_root(tmp_path / "src", n=4)
  with open(f"{root}/labels.csv", "w") as f:
    f.write("subject,label,split\nsub-00,control,test\nsub-01,patient,val\n"
            "sub-02,control,train\nsub-03,patient,train\n")
  b = nifti_folder.prepare(cfg(root, tmp_path / "data"))
  assert b.info.metadata["subjects"] == {
      "train": ["sub-02", "sub-03"], "val": ["sub-01"], "test": ["sub-00"]}


def test_helper_defaults_are_the_builder_defaults():
  """configs/common.py spells out every key; its defaults must not drift."""
  c = common.nifti_data_config(root="/r", modalities=MODALITIES)
  s = nifti_folder.settings(c)
  assert s.volume == dataclasses.replace(volumes.VolumeSettings(), res=64)
  assert s.labels == builder_lib.LabelSettings()
  base = nifti_folder.NiftiSettings(root=s.root, modalities=MODALITIES)
  assert s == base
  assert not nifti_folder.validate_config(c)


def test_config_errors_name_the_key():
  c = _ddpm_with(cfg("/nowhere", "/tmp", modalities={"t1": "t1.nii.gz"},
                     contrasts=("t1", "pd")))
  c.data.slice_axis = "oblique"
  c.data.num_classes = 5
  c.data.modalitis = {}
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  assert "data.modalitis is not a key of data.dataset='nifti_folder'" in str(
      e.value)
  del c.data["modalitis"]
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  msg = str(e.value)
  assert "data.modalities.t1='t1.nii.gz' must be a path pattern" in msg
  assert "data.slice_axis='oblique'" in msg
  assert "data.contrasts ['pd'] are not features" in msg
  assert "data.num_classes=5 must equal the number of classes 2" in msg
  del c.data["root"]
  with pytest.raises(config_check.ConfigError, match=r"data.root is missing"):
    config_check.validate(c)


def _subject_levels(c):
  """Each subject's brightest t1 value in the built data set."""
  out = {}
  for split in pipeline.prepare(c).info.splits:
    a = pipeline.read_split(c, split)
    for name, x in zip(a["subject"], a["t1"]):
      name = name.decode() if isinstance(name, bytes) else str(name)
      out[name] = max(out.get(name, -np.inf), float(x.max()))
  return out


def test_volumes_ten_times_brighter_named_with_none_and_evened_by_auto(
    tmp_path, caplog):
  root = write_root(tmp_path / "src", n=6, labels=False)
  for name in ("t1", "t2"):  # one scanner stores 10x the values
    path = f"{root}/sub-04/{name}.nii.gz"
    img = nib.load(path)
    _save((np.asarray(img.dataobj) * 10).astype(img.get_data_dtype()), path)
  c = cfg(root, tmp_path / "data", labels_csv="", class_names=(),
          split_fractions=(1.0, 0.0, 0.0), volume_norm="none")
  with caplog.at_level(logging.WARNING):
    nifti_folder.prepare(c)
  assert "intensities differ more than 4x" in caplog.text
  assert "sub-04 t1" in caplog.text and "sub-04 t2" in caplog.text
  assert "sub-01" not in caplog.text.split("volume_norm='none':")[1]
  assert "data.volume_norm='auto'" in caplog.text
  # "none" keeps the stored units: sub-04 is ten times brighter.
  raw = _subject_levels(c)
  others = np.median([v for k, v in raw.items() if k != "sub-04"])
  np.testing.assert_allclose(raw["sub-04"] / others, 10, rtol=0.1)
  caplog.clear()
  c = cfg(root, tmp_path / "data2", labels_csv="", class_names=(),
          split_fractions=(1.0, 0.0, 0.0))   # volume_norm="auto"
  with caplog.at_level(logging.WARNING):
    nifti_folder.prepare(c)
  assert "intensities differ" not in caplog.text
  # Each volume in [0, 1] (resizing smooths the brightest voxels a bit).
  levels = np.asarray(list(_subject_levels(c).values()))
  assert levels.max() <= 1 and levels.max() / levels.min() < 1.3
