"""image_folder: class folders or a CSV, bit depths, colour, masks, errors."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import common
from medgen_jax import config_check
from medgen_jax.data import pipeline
from medgen_jax.data.builder_lib import DataError
from medgen_jax.data.builders import image_folder

CLASSES = ("benign", "malignant")


def _png(arr, path, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


def write_class_folders(root, n=4, h=20, w=10, masks=True):
  """Tall 8-bit images with a bright block; masks 0/255 beside them."""
  for c, name in enumerate(CLASSES):
    for i in range(n):
      img = np.full((h, w), 20, np.uint8)
      img[5:15, 2:8] = 100 + 50 * c
      _png(img, f"{root}/{name}/img{i}.png")
      if masks:
        m = np.zeros((h, w), np.uint8)
        m[5:15, 2:8] = 255
        _png(m, f"{root}_masks/{name}/img{i}.png")
  return str(root)


def cfg(root, data_dir, **kw):
  args = dict(root=root, class_names=CLASSES, res=16, batch_size=4,
              data_dir=str(data_dir))
  args.update(kw)
  return common.image_folder_data_config(**args)


def _all(c):
  return {s: pipeline.read_split(c, s) for s in ("train", "val", "test")}


def test_class_folders_with_masks_padded_to_square(tmp_path):
  root = write_class_folders(tmp_path / "imgs")
  c = cfg(root, tmp_path / "data", masks_dir=f"{root}_masks",
          mask_values=(0, 255))
  config_check.validate(_ddpm(c))
  splits = _all(c)
  files = sorted(sum((list(a["file"].astype(str)) for a in splits.values()),
                     []))
  assert len(files) == 8 and files[0] == "benign/img0.png"
  for a in splits.values():
    assert a["image"].shape[1:] == (16, 16) and a["mask"].dtype == np.uint8
    for f, label, img, m in zip(a["file"].astype(str), a["label"],
                                a["image"], a["mask"]):
      assert CLASSES[label] == f.split("/")[0]
      # 20x10 padded to 20x20 and resized: the block stays 10/20 tall and
      # 6/20 wide (not stretched); mask 255 stored as class 1.
      rows, cols = np.nonzero(m)
      assert set(np.unique(m)) == {0, 1}
      assert rows.max() - rows.min() + 1 == 8
      assert 4 <= cols.max() - cols.min() + 1 <= 5
      assert img.max() == pytest.approx(100 + 50 * label, abs=1)


def test_csv_with_subjects_rgb_jpeg(tmp_path):
  rng = np.random.default_rng(0)
  lines = ["file,label,subject"]
  for p in range(5):
    for k in range(2):
      rgb = np.zeros((16, 16, 3), np.uint8)
      rgb[..., 0] = 200
      rgb[..., 2] = rng.integers(0, 50)
      name = f"scans/p{p}_{k}.jpg"
      _png(rgb, f"{tmp_path}/src/{name}")
      lines.append(f"{name},{CLASSES[p % 2]},patient{p}")
  with open(f"{tmp_path}/src/labels.csv", "w") as f:
    f.write("\n".join(lines) + "\n")
  c = cfg(f"{tmp_path}/src", tmp_path / "data", labels_csv="labels.csv",
          color_mode="rgb")
  assert c.contrasts == ("red", "green", "blue")
  splits = _all(c)
  seen = [set(a["subject"].astype(str)) for a in splits.values()]
  assert sum(len(s) for s in seen) == 5            # subjects not shared
  for a in splits.values():
    assert abs(float(a["red"].mean()) - 200) < 3   # JPEG is lossy
    assert float(a["green"].mean()) < 5
    assert (np.unique(a["subject"], return_counts=True)[1] == 2).all()


def test_16_bit_and_float_inputs_keep_their_values(tmp_path):
  for name, arr in (("a", 40000), ("b", 1000), ("c", 65535)):
    img = np.full((8, 8), arr, np.uint16)
    _png(img, f"{tmp_path}/u16/benign/{name}.png")
    f = np.full((8, 8), arr / 1000.0, np.float32)
    _png(f, f"{tmp_path}/f32/benign/{name}.tif", mode="F")
  u16 = pipeline.read_split(cfg(f"{tmp_path}/u16", tmp_path / "d1", res=8),
                            "train")
  assert u16["image"].max() > 1000.0 and u16["image"].max() <= 65535.0
  assert set(np.unique(u16["image"])) <= {40000.0, 1000.0, 65535.0}
  f32 = pipeline.read_split(cfg(f"{tmp_path}/f32", tmp_path / "d2", res=8),
                            "train")
  assert set(np.round(np.unique(f32["image"]), 3)) <= {40.0, 1.0, 65.535}


def _ddpm(data):
  from configs import ddpm  # pylint: disable=import-outside-toplevel
  c = ddpm.get_config("runlocal")
  c.data = data
  return c


# -------------------------------------------------------------- bad input --


def _fails(c, *patterns):
  with pytest.raises(DataError) as e:
    image_folder.prepare(c)
  for p in patterns:
    assert p in str(e.value), str(e.value)
  path = os.path.join(c.data_dir, "image_folder")
  assert not os.path.exists(path) or not os.listdir(path)


def test_corrupt_and_truncated_images(tmp_path):
  root = write_class_folders(tmp_path / "a", masks=False)
  bad = f"{root}/malignant/img2.png"
  with open(bad, "wb") as f:
    f.write(b"\x89PNG not really")
  _fails(cfg(root, tmp_path / "data"), bad, "unreadable image")
  root = write_class_folders(tmp_path / "b", h=64, w=64, masks=False)
  bad = f"{root}/benign/img1.png"
  noisy = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
  _png(noisy, bad)
  with open(bad, "rb") as f:
    raw = f.read()
  with open(bad, "wb") as f:
    f.write(raw[:len(raw) // 2])
  _fails(cfg(root, tmp_path / "data"), bad, "corrupt or truncated")


def test_mixed_bit_depths(tmp_path):
  root = write_class_folders(tmp_path / "src", masks=False)
  bad = f"{root}/malignant/img3.png"
  _png(np.full((20, 10), 3000, np.uint16), bad)
  _fails(cfg(root, tmp_path / "data"), bad, "16-bit image among 8-bit images")


def test_mask_shape_and_values(tmp_path):
  root = write_class_folders(tmp_path / "src")
  bad = f"{root}_masks/benign/img0.png"
  _png(np.zeros((10, 10), np.uint8), bad)
  c = cfg(root, tmp_path / "data", masks_dir=f"{root}_masks",
          mask_values=(0, 255))
  _fails(c, bad, "mask shape (10, 10) differs from image shape (20, 10)")
  m = np.zeros((20, 10), np.uint8)
  m[0, 0] = 128
  _png(m, bad)
  _fails(c, bad, "unknown label values [128]")
  os.remove(bad)
  _fails(c, bad, "missing mask of image 'benign/img0.png'")


def test_unknown_labels(tmp_path):
  root = write_class_folders(tmp_path / "src", masks=False)
  os.rename(f"{root}/malignant", f"{root}/cancer")
  _fails(cfg(root, tmp_path / "data"), f"{root}/cancer/img0.png",
         "unknown label: class folder 'cancer'")
  with open(f"{root}/labels.csv", "w") as f:
    f.write("file,label\nbenign/img0.png,benign\ncancer/img1.png,tumour\n")
  _fails(cfg(root, tmp_path / "data", labels_csv="labels.csv"),
         f"{root}/labels.csv", "line 3: unknown label 'tumour'")
  with open(f"{root}/labels.csv", "w") as f:
    f.write("file,label\nbenign/img9.png,benign\n")
  _fails(cfg(root, tmp_path / "data", labels_csv="labels.csv"),
         f"{root}/benign/img9.png", "listed on line 2")


def test_nan_pixels_and_empty_folder(tmp_path):
  for i in range(3):
    f = np.ones((8, 8), np.float32)
    if i == 1:
      f[2, 2] = np.nan
    _png(f, f"{tmp_path}/src/benign/{i}.tif", mode="F")
  _fails(cfg(f"{tmp_path}/src", tmp_path / "data"),
         f"{tmp_path}/src/benign/1.tif", "1 NaN/Inf pixels")
  os.makedirs(tmp_path / "empty")
  _fails(cfg(str(tmp_path / "empty"), tmp_path / "data"), "empty folder")


def test_config_errors():
  c = _ddpm(cfg("/x", "/tmp", class_names=()))
  c.data.color_mode = "cmyk"
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  assert "data.class_names is empty" in str(e.value)
  assert "data.color_mode='cmyk'" in str(e.value)
