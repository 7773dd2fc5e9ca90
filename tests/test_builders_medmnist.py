"""medmnist: official npz layout, every flag's metadata, opt-in download."""

import os
import pathlib

import numpy as np
import pytest

from configs import common
from medgen_jax import config_check
from medgen_jax.data import medmnist_info
from medgen_jax.data import pipeline
from medgen_jax.data.builder_lib import DataError
from medgen_jax.data.builders import medmnist

COUNTS = {"train": 6, "val": 2, "test": 3}


def write_npz(path, flag, size=28, n=COUNTS, **replace):
  """A file with the official keys, shapes and dtypes of ``flag``."""
  info = medmnist_info.info(flag)
  shape = (size,) * info.spatial_dims + ((3,) if info.n_channels == 3 else ())
  width = len(info.labels) if info.task == "multi-label" else 1
  top = 2 if info.task == "multi-label" else len(info.labels)
  rng = np.random.default_rng(0)
  arrays = {}
  for split, k in n.items():
    arrays[f"{split}_images"] = rng.integers(0, 256, (k,) + shape, np.uint8)
    arrays[f"{split}_labels"] = (np.arange(k * width).reshape(k, width)
                                 % top).astype(np.uint8)
  arrays.update(replace)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez_compressed(path, **arrays)
  return arrays


def cfg(flag, tmp_path, **kw):
  c = common.medmnist_data_config(flag=flag, data_dir=str(tmp_path / "data"),
                                  manual_dir=str(tmp_path / "manual"), **kw)
  return c


def test_every_flag_has_consistent_metadata_and_a_valid_config():
  assert len(medmnist_info.INFO) == 18
  for flag, info in medmnist_info.INFO.items():
    assert info.task in medmnist_info.TASKS
    assert info.n_channels in (1, 3) and info.spatial_dims in (2, 3)
    assert len(set(info.labels)) == len(info.labels) >= 2
    for size in medmnist_info.sizes(flag):
      c = common.medmnist_data_config(flag=flag, size=size, res=32)
      errors = medmnist.validate_config(c)
      assert not errors, (flag, size, errors)
  assert medmnist_info.file_name("pathmnist", 28) == "pathmnist.npz"
  assert medmnist_info.file_name("organmnist3d", 64) == "organmnist3d_64.npz"
  with pytest.raises(ValueError, match="sizes"):
    medmnist_info.file_name("organmnist3d", 224)
  assert medmnist_info.class_names("octmnist")[-1] == "normal"
  assert medmnist_info.channel_names("bloodmnist") == ("red", "green", "blue")


def test_rgb_2d_keeps_official_splits_labels_and_resizes(tmp_path):
  arrays = write_npz(tmp_path / "manual" / "dermamnist_64.npz", "dermamnist",
                     size=64)
  c = cfg("dermamnist", tmp_path, size=64, res=32)
  assert c.contrasts == ("red", "green", "blue") and c.num_classes == 7
  builder = medmnist.prepare(c)
  assert {s: builder.info.splits[s].num_examples for s in COUNTS} == COUNTS
  train = pipeline.read_split(c, "train")
  assert train["red"].shape == (6, 32, 32) and train["red"].dtype == np.float32
  order = np.argsort(train["subject_id"])
  np.testing.assert_array_equal(train["label"][order],
                                arrays["train_labels"][:, 0])
  # A 2x downsampled image keeps its mean intensity per channel.
  blue = arrays["train_images"][..., 2].astype(np.float32)
  np.testing.assert_allclose(train["blue"][order].mean(axis=(1, 2)),
                             blue.mean(axis=(1, 2)), atol=1.0)
  val = pipeline.read_split(c, "val")
  assert sorted(val["subject_id"]) == [6, 7]   # ids run over train+val+test


def test_multilabel_chest_and_3d(tmp_path):
  arrays = write_npz(tmp_path / "manual" / "chestmnist.npz", "chestmnist")
  c = cfg("chestmnist", tmp_path)
  test = pipeline.read_split(c, "test")
  order = np.argsort(test["subject_id"])
  np.testing.assert_array_equal(test["findings"][order],
                                arrays["test_labels"])
  np.testing.assert_array_equal(test["label"][order],
                                arrays["test_labels"].any(axis=1))
  write_npz(tmp_path / "manual" / "nodulemnist3d.npz", "nodulemnist3d")
  c3 = cfg("nodulemnist3d", tmp_path)
  assert c3.spatial_dims == 3
  config_check.validate(_ddpm(c3))
  assert pipeline.read_split(c3, "train")["image"].shape == (6, 28, 28, 28)


def _ddpm(data):
  from configs import ddpm  # pylint: disable=import-outside-toplevel
  c = ddpm.get_config("runlocal")
  c.data = data
  return c


def test_missing_file_says_where_to_put_it_and_download_is_opt_in(tmp_path):
  c = cfg("breastmnist", tmp_path, size=128)
  expected = str(tmp_path / "manual" / "breastmnist_128.npz")
  with pytest.raises(DataError) as e:
    medmnist.prepare(c)
  msg = str(e.value)
  assert msg.startswith(expected) and "MedMNIST file not found" in msg
  assert "zenodo.org/records/10519652/files/breastmnist_128.npz" in msg
  assert "data.download=True" in msg
  # With download=True the file is fetched from the URL (here a local one).
  source = tmp_path / "mirror" / "breastmnist_128.npz"
  write_npz(source, "breastmnist", size=128)
  c = cfg("breastmnist", tmp_path, size=128, download=True)
  c.download_url = pathlib.Path(tmp_path / "mirror").as_uri() + "/{file}"
  b = medmnist.prepare(c)
  assert os.path.isfile(expected) and b.info.splits["val"].num_examples == 2


def _fails(c, *patterns):
  with pytest.raises(DataError) as e:
    medmnist.prepare(c)
  for p in patterns:
    assert p in str(e.value), str(e.value)
  path = os.path.join(c.data_dir, "medmnist")
  assert not os.path.exists(path) or not os.listdir(path)


def test_corrupt_truncated_and_malformed_files(tmp_path):
  path = tmp_path / "manual" / "pneumoniamnist.npz"
  write_npz(path, "pneumoniamnist")
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  _fails(cfg("pneumoniamnist", tmp_path), str(path),
         "not a readable .npz file, corrupt or truncated")
  write_npz(path, "pneumoniamnist", test_labels=np.array([[0], [5], [1]]))
  _fails(cfg("pneumoniamnist", tmp_path), str(path),
         "test_labels has unknown label value 5 (expected 0..1)")
  write_npz(path, "pneumoniamnist",
            val_images=np.zeros((2, 28, 28, 3), np.uint8))
  _fails(cfg("pneumoniamnist", tmp_path), str(path),
         "val_images has shape (2, 28, 28, 3)")
  arrays = write_npz(path, "pneumoniamnist")
  del arrays["val_labels"]
  np.savez(path, **arrays)
  _fails(cfg("pneumoniamnist", tmp_path), str(path),
         "missing arrays ['val_labels']")


def test_config_errors():
  c = _ddpm(common.medmnist_data_config(flag="pathmnist"))
  c.data.flag = "pathmnist3d"
  with pytest.raises(config_check.ConfigError,
                     match="unknown MedMNIST data set 'pathmnist3d'"):
    config_check.validate(c)
  c.data.flag = "pathmnist"
  c.data.contrasts = ("image",)
  with pytest.raises(config_check.ConfigError,
                     match=r"data.contrasts \['image'\] are not features"):
    config_check.validate(c)
