"""NRRD and MetaImage volumes: same geometry as NIfTI, in the builder too."""

import logging
import os
import zlib

import nibabel as nib
import nrrd
import numpy as np
import pytest

from configs import common
from medgen_jax.data import pipeline
from medgen_jax.data import volume_files
from medgen_jax.data import volumes
from medgen_jax.data.builder_lib import DataError
from medgen_jax.data.builders import nifti_folder

SHAPE = (12, 10, 8)
# Permuted, flipped axes with unequal spacing and an offset origin: voxel i
# runs anterior (1.5 mm), j inferior (1 mm), k to patient right (2 mm).
# Every number is exact in float32, so NIfTI's stored affine is exact too.
AFFINE = np.array([[0.0, 0.0, -2.0, 10.5], [1.5, 0.0, 0.0, -20.25],
                   [0.0, -1.0, 0.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _oblique():
  """AFFINE turned by 30 degrees about the superior axis."""
  c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
  rot = np.eye(4)
  rot[:2, :2] = [[c, -s], [s, c]]
  return rot @ AFFINE


def _volume(seed=0, dtype=np.float32):
  """Distinct values everywhere: any axis mix-up changes the data."""
  x = np.random.default_rng(seed).normal(100, 20, SHAPE)
  return x.astype(dtype)


# ---------------------------------------------------------------- writers --


def write_nifti(path, data, affine=AFFINE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), path)


def write_nrrd(path, data, affine=AFFINE, encoding="gzip", **options):
  """As 3D Slicer writes: LPS space, one direction vector per axis."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lps = RAS_TO_LPS @ affine
  header = {"space": "left-posterior-superior", "encoding": encoding,
            "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]}
  nrrd.write(path, data, header, **options)


def _floats(values):
  return " ".join(repr(float(v)) for v in values)


def write_metaimage(path, data, affine=AFFINE, compressed=False, msb=False,
                    channels=1, data_file="LOCAL"):
  """An ITK-style .mha (data after the header) or .mhd + data file.

  ITK's MetaImageIO writes ``TransformMatrix[i*N + j] = direction[j][i]``:
  the direction of voxel axis 0, then of axis 1, ...
  """
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lps = RAS_TO_LPS @ affine
  spacing = np.linalg.norm(lps[:3, :3], axis=0)
  direction = lps[:3, :3] / spacing
  types = {np.dtype(np.float32): "MET_FLOAT", np.dtype(np.int16): "MET_SHORT",
           np.dtype(np.uint8): "MET_UCHAR"}
  element = types[np.dtype(data.dtype)]
  payload = data.astype(data.dtype.newbyteorder(">" if msb else "<")
                        ).tobytes(order="F")
  if compressed:
    payload = zlib.compress(payload)
  lines = ["ObjectType = Image", "NDims = 3", "BinaryData = True",
           f"BinaryDataByteOrderMSB = {msb}",
           f"CompressedData = {compressed}",
           f"TransformMatrix = {_floats(direction.T.ravel())}",
           f"Offset = {_floats(lps[:3, 3])}", "CenterOfRotation = 0 0 0",
           "AnatomicalOrientation = RAI",
           f"ElementSpacing = {_floats(spacing)}",
           f"DimSize = {' '.join(str(s) for s in data.shape)}"]
  if compressed:
    lines.append(f"CompressedDataSize = {len(payload)}")
  if channels != 1:
    lines.append(f"ElementNumberOfChannels = {channels}")
  lines += [f"ElementType = {element}", f"ElementDataFile = {data_file}"]
  header = ("\n".join(lines) + "\n").encode()
  with open(path, "wb") as f:
    f.write(header + (payload if data_file == "LOCAL" else b""))
  if data_file != "LOCAL":
    with open(os.path.join(os.path.dirname(path), data_file), "wb") as f:
      f.write(payload)


WRITERS = {
    "nrrd_gzip": ("v.nrrd", lambda p, x, a: write_nrrd(p, x, a)),
    "nrrd_raw": ("v.nrrd", lambda p, x, a: write_nrrd(p, x, a,
                                                      encoding="raw")),
    "nhdr_detached": ("v.nhdr", lambda p, x, a: write_nrrd(
        p, x, a, detached_header=True)),
    "mha_raw": ("v.mha", write_metaimage),
    "mha_zlib": ("v.mha", lambda p, x, a: write_metaimage(p, x, a,
                                                          compressed=True)),
    "mha_big_endian": ("v.mha", lambda p, x, a: write_metaimage(p, x, a,
                                                                msb=True)),
    "mhd_raw": ("v.mhd", lambda p, x, a: write_metaimage(
        p, x, a, data_file="v.raw")),
    "mhd_zraw": ("v.mhd", lambda p, x, a: write_metaimage(
        p, x, a, compressed=True, data_file="v.zraw")),
}


# --------------------------------------------------------------- geometry --


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_same_voxels_and_ras_affine_as_nifti(tmp_path, fmt, dtype):
  x = _volume(dtype=dtype)
  write_nifti(f"{tmp_path}/ref.nii.gz", x)
  name, write = WRITERS[fmt]
  write(f"{tmp_path}/{name}", x, AFFINE)
  ref_data, ref_affine = volume_files.read_volume(f"{tmp_path}/ref.nii.gz")
  data, affine = volume_files.read_volume(f"{tmp_path}/{name}")
  np.testing.assert_array_equal(ref_affine, AFFINE)
  np.testing.assert_array_equal(affine, ref_affine)
  np.testing.assert_array_equal(data, ref_data)
  assert data.dtype == np.float32 and data.shape == SHAPE
  grid = volume_files.read_grid(f"{tmp_path}/{name}")
  assert grid.shape == SHAPE and not grid.note
  np.testing.assert_array_equal(grid.affine, AFFINE)


@pytest.mark.parametrize("fmt", ["nrrd_gzip", "mha_zlib"])
def test_oblique_volume_is_reoriented_like_nifti(tmp_path, fmt):
  x, oblique = _volume(), _oblique()
  write_nifti(f"{tmp_path}/ref.nii.gz", x, oblique)
  name, write = WRITERS[fmt]
  write(f"{tmp_path}/{name}", x, oblique)
  ref = volumes.Scan(*volume_files.read_volume(f"{tmp_path}/ref.nii.gz"), "")
  got = volumes.Scan(*volume_files.read_volume(f"{tmp_path}/{name}"), "")
  # NIfTI keeps its affine in float32; NRRD and MetaImage in decimal text.
  np.testing.assert_allclose(got.affine, oblique, atol=1e-12)
  np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5)
  (a, sa), (b, sb) = (volumes.canonical(s, True) for s in (ref, got))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(sa, sb, rtol=1e-6)


def test_metaimage_transform_matrix_lists_one_axis_direction_after_another(
    tmp_path):
  """A hand-written header: axis 0 points posterior, 1 superior, 2 left."""
  header = ("ObjectType = Image\nNDims = 3\nTransformMatrix = 0 1 0 0 0 1 "
            "1 0 0\nOffset = 1 2 3\nElementSpacing = 2 3 4\nDimSize = 2 2 2\n"
            "ElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
  path = f"{tmp_path}/hand.mha"
  with open(path, "wb") as f:
    f.write(header.encode() + bytes(range(8)))
  data, affine = volume_files.read_volume(path)
  # LPS (1, 2, 3) is RAS (-1, -2, 3); one step along axis 0 is 2 mm
  # posterior (RAS y -2), along axis 2 4 mm left (RAS x -4).
  np.testing.assert_array_equal(affine @ [0, 0, 0, 1], [-1, -2, 3, 1])
  np.testing.assert_array_equal(affine @ [1, 0, 0, 1], [-1, -4, 3, 1])
  np.testing.assert_array_equal(affine @ [0, 1, 0, 1], [-1, -2, 6, 1])
  np.testing.assert_array_equal(affine @ [0, 0, 1, 1], [-5, -2, 3, 1])
  # x fastest on disk.
  assert data[1, 0, 0] == 1 and data[0, 1, 0] == 2 and data[0, 0, 1] == 4


def _nrrd_text(path, fields, payload=bytes(range(8))):
  text = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
  with open(path, "wb") as f:
    f.write((text + fields + "\n").encode() + payload)
  return path


@pytest.mark.parametrize("space,flip", [
    ("right-anterior-superior", [1, 1, 1]), ("RAS", [1, 1, 1]),
    ("left-anterior-superior", [-1, 1, 1]), ("LPS", [-1, -1, 1]),
    ("scanner-xyz", [-1, -1, 1])])
def test_nrrd_spaces(tmp_path, space, flip):
  path = _nrrd_text(f"{tmp_path}/s.nrrd", (
      f"space: {space}\nspace directions: (0,2,0) (0,0,3) (4,0,0)\n"
      "space origin: (1,2,3)\n"))
  data, affine = volume_files.read_volume(path)
  flip = np.asarray(flip, float)
  np.testing.assert_array_equal(affine[:3, 3], flip * [1, 2, 3])
  np.testing.assert_array_equal(affine[:3, 0], flip * [0, 2, 0])
  np.testing.assert_array_equal(affine[:3, 2], flip * [4, 0, 0])
  assert data[1, 0, 0] == 1 and data[0, 0, 1] == 4


def test_nrrd_without_space_warns_and_uses_spacings(tmp_path, caplog):
  path = _nrrd_text(f"{tmp_path}/n.nrrd", "spacings: 0.5 2 3\n")
  with caplog.at_level(logging.WARNING):
    _, affine = volume_files.read_volume(path)
  np.testing.assert_array_equal(affine, np.diag([0.5, 2, 3, 1]))
  assert "no 'space directions'" in caplog.text and path in caplog.text


def test_nrrd_singleton_list_axis_is_dropped_and_others_refused(tmp_path):
  # 3D Slicer segmentation layout: a leading 'list' axis without direction.
  fields = ("space: LPS\nspace directions: none (1,0,0) (0,1,0) (0,0,1)\n"
            "kinds: list domain domain domain\n")
  text = "NRRD0004\ntype: uint8\ndimension: 4\nencoding: raw\n"
  one = f"{tmp_path}/one.seg.nrrd"
  with open(one, "wb") as f:
    f.write((text + "sizes: 1 2 2 2\n" + fields + "\n").encode() +
            bytes(range(8)))
  data, _ = volume_files.read_volume(one)
  assert data.shape == (2, 2, 2) and data[1, 1, 1] == 7
  two = f"{tmp_path}/two.seg.nrrd"
  with open(two, "wb") as f:
    f.write((text + "sizes: 2 2 2 2\n" + fields + "\n").encode() +
            bytes(range(16)))
  with pytest.raises(DataError, match=r"two.seg.nrrd: 2 values per voxel "
                     r"along axis 0 \(kind 'list'\).*export a label map"):
    volume_files.read_grid(two)


# ---------------------------------------------------------------- builder --


def _subject_volumes(seed):
  """A bright block with noise in t1/t2 and a 2-label segmentation."""
  rng = np.random.default_rng(seed)
  x = np.zeros(SHAPE, np.float32)
  x[2:10, 2:8, 1:7] = 100 + rng.normal(0, 3, (8, 6, 6))
  seg = np.zeros(SHAPE, np.uint8)
  seg[4:8, 3:6, 2:5] = 2
  seg[3, 3, 3] = 1
  return x, (2 * x).astype(np.int16), seg


def _write_set(root, layout):
  """Three subjects; ``layout`` maps t1/t2/seg to (file name, writer)."""
  for i in range(3):
    t1, t2, seg = _subject_volumes(i)
    for key, vol in (("t1", t1), ("t2", t2), ("seg", seg)):
      name, write = layout[key]
      write(f"{root}/s{i}/{name}", vol, AFFINE)
  return str(root)


def _cfg(root, data_dir, layout):
  seg = layout["seg"][0]
  seg = "*.seg.nrrd" if seg.endswith(".seg.nrrd") else seg
  return common.nifti_data_config(
      root=root, modalities={"t1": "{subject}/" + layout["t1"][0],
                             "t2": "{subject}/" + layout["t2"][0]},
      mask="{subject}/" + seg, mask_values=(0, 1, 2), res=16, batch_size=4,
      data_dir=str(data_dir))


NIFTI_SET = {"t1": ("t1.nii.gz", write_nifti), "t2": ("t2.nii.gz", write_nifti),
             "seg": ("seg.nii.gz", write_nifti)}
SLICER_SET = {"t1": ("T1.nrrd", write_nrrd), "t2": ("T2.nrrd", write_nrrd),
              "seg": ("Segmentation.seg.nrrd", write_nrrd)}
# A subject mixing formats: .mha, .mhd + .zraw and a NIfTI label map.
MIXED_SET = {"t1": ("t1.mha", write_metaimage),
             "t2": ("t2.mhd", lambda p, x, a: write_metaimage(
                 p, x, a, compressed=True, data_file="t2.zraw")),
             "seg": ("seg.nii.gz", write_nifti)}


@pytest.fixture(scope="module")
def nifti_split(tmp_path_factory):
  root = _write_set(tmp_path_factory.mktemp("nifti"), NIFTI_SET)
  c = _cfg(root, tmp_path_factory.mktemp("data"), NIFTI_SET)
  return pipeline.read_split(c, "train")


@pytest.mark.parametrize("layout", [SLICER_SET, MIXED_SET],
                         ids=["nrrd_with_seg_nrrd", "mha_mhd_nifti_mixed"])
def test_builder_reads_them_like_the_same_nifti_set(tmp_path, nifti_split,
                                                     layout):
  root = _write_set(tmp_path / "src", layout)
  c = _cfg(root, tmp_path / "data", layout)
  assert not nifti_folder.validate_config(c)
  builder = nifti_folder.prepare(c)
  assert "mask" in builder.info.features
  a = pipeline.read_split(c, "train")
  assert a["t1"].shape[1:] == (16, 16) and a["mask"].dtype == np.uint8
  assert set(np.unique(a["mask"])) == {0, 1, 2}
  assert set(a["label"]) == {0, 1}  # label_source='mask'
  assert sorted(a) == sorted(nifti_split)
  for key in nifti_split:
    np.testing.assert_array_equal(a[key], nifti_split[key], err_msg=key)


# -------------------------------------------------------------- bad input --


def test_truncated_nrrd_data_fails_mid_build_and_names_the_file(tmp_path):
  root = _write_set(tmp_path / "src", SLICER_SET)
  bad = f"{root}/s1/T2.nrrd"
  write_nrrd(bad, _subject_volumes(1)[1], encoding="raw")
  with open(bad, "rb") as f:
    raw = f.read()
  with open(bad, "wb") as f:
    f.write(raw[:-100])  # header intact, voxels cut
  with pytest.raises(DataError) as e:
    nifti_folder.prepare(_cfg(root, tmp_path / "data", SLICER_SET))
  msg = str(e.value)
  assert msg.startswith(f"{bad}: truncated or corrupt image data") and (
      "\n" not in msg), msg
  left = tmp_path / "data" / "nifti_folder"
  assert not left.exists() or not os.listdir(left)  # nothing half-built


@pytest.mark.parametrize("header,problem", [
    (b"ObjectType = Image\nNDims = 3\nElementType = MET_FLOAT\n"
     b"ElementDataFile = LOCAL\n", "MetaImage header lacks DimSize"),
    (b"ObjectType = Image\nNDims = 3\nDimSize = 12 10\nElementType = "
     b"MET_FLOAT\nElementDataFile = LOCAL\n",
     "MetaImage DimSize = '12 10' must be 3 numbers"),
    (b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\n",
     "MetaImage header has no ElementDataFile line"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a MetaImage header: line 1"),
    (b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_BOOL\n"
     b"ElementDataFile = LOCAL\n", "MetaImage ElementType = 'MET_BOOL'"),
    (b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
     b"ElementDataFile = slice%03d.raw 1 2 1\n",
     "ElementDataFile = slice%03d.raw 1 2 1 splits the voxels over"),
])
def test_corrupt_metaimage_header(tmp_path, header, problem):
  path = f"{tmp_path}/bad.mha"
  with open(path, "wb") as f:
    f.write(header)
  with pytest.raises(DataError) as e:
    nifti_folder.header_grid(path)
  assert str(e.value).startswith(f"{path}: {problem}"), str(e.value)


def test_two_channel_metaimage_is_refused(tmp_path):
  path = f"{tmp_path}/rgb.mha"
  write_metaimage(path, _volume(), channels=2)
  with pytest.raises(DataError, match=r"rgb.mha: 2 channels per voxel "
                     r"\(ElementNumberOfChannels\).*one channel per file"):
    nifti_folder.header_grid(path)


def test_short_raw_and_bad_zlib_stream(tmp_path):
  write_metaimage(f"{tmp_path}/a.mhd", _volume(), data_file="a.raw")
  with open(f"{tmp_path}/a.raw", "r+b") as f:
    f.truncate(1000)
  with pytest.raises(DataError, match=r"a.mhd: truncated voxel data \(data "
                     r"file .*a.raw\): 1000 of the 3840 bytes"):
    nifti_folder.read_scan(f"{tmp_path}/a.mhd")
  path = f"{tmp_path}/z.mha"
  write_metaimage(path, _volume(), compressed=True)
  with open(path, "r+b") as f:
    f.seek(-200, os.SEEK_END)
    f.write(b"\xff" * 50)
  with pytest.raises(DataError, match=r"z.mha: corrupt compressed voxel data "
                     r"\(zlib: "):
    nifti_folder.read_scan(path)


def test_unknown_space_and_missing_data_file(tmp_path):
  path = _nrrd_text(f"{tmp_path}/h.nrrd", (
      "space: 3D-right-handed\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"))
  with pytest.raises(DataError, match=r"h.nrrd: NRRD space '3D-right-handed'"
                     r" is not a patient space"):
    nifti_folder.header_grid(path)
  nhdr = f"{tmp_path}/d.nhdr"
  with open(nhdr, "w") as f:
    f.write("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\n"
            "encoding: raw\ndata file: d.raw\n\n")
  with pytest.raises(DataError, match=r"d.nhdr: its data file .*d.raw does "
                     "not exist"):
    nifti_folder.header_grid(nhdr)
