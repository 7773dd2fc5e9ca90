"""dicom_folder: series grouping and sorting, HU, windows, DICOM-SEG, errors."""

import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import CTImageStorage, generate_uid

import dicom_files
from configs import common
from medgen_jax.data import pipeline
from medgen_jax.data.builder_lib import DataError
from medgen_jax.data.builders import dicom_folder

ROWS, COLS, SLICES = 10, 12, 5
SPACING = (0.8, 0.7)   # PixelSpacing: row spacing, column spacing (mm)
STEP = 2.5             # slice spacing (mm)
SEG_SOP = dicom_folder.SEG_SOP_CLASS


def ct_values(k):
  """HU of slice ``k``: air around a water/soft-tissue body, a bone spot."""
  hu = np.full((ROWS, COLS), -1000.0)
  hu[2:8, 2:10] = 40.0 + k
  hu[4, 5] = 1200.0
  return hu


def write_series(folder, patient, description="CT HEAD", slices=SLICES,
                 shuffle=True, slope=1.0, intercept=-1024.0):
  """One axial CT series; returns [(sop uid, z)] in z order."""
  uid = generate_uid()
  out = []
  order = np.random.default_rng(0).permutation(slices) if shuffle else range(
      slices)
  for k in order:
    ds = Dataset()
    ds.PatientID = patient
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesDescription = description
    ds.InstanceNumber = int(k) + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-5.0, -4.0, 10.0 + STEP * int(k)]
    ds.PixelSpacing = list(SPACING)
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    stored = np.round((ct_values(int(k)) - intercept) / slope)
    ds.PixelData = stored.astype(np.int16).tobytes()
    path = os.path.join(folder, f"IM{int(k):04d}.dcm")
    dicom_files.save(ds, CTImageStorage, path)
    out.append((int(k), ds.SOPInstanceUID, ds.ImagePositionPatient, path))
  return uid, [x[1:] for x in sorted(out)]


def write_seg(path, series_uid, slices, patient, by_position=False,
              shared=False):
  """Binary SEG: segment 1 on slices 1-2, segment 2 on slice 3; with
  ``shared``, segment 1 on all three, identified once in the shared
  functional groups (as highdicom writes a single-segment SEG)."""
  frames, groups = [], []
  for number, k, box in ((1, 1, (slice(3, 6), slice(3, 7))),
                         (1, 2, (slice(3, 6), slice(3, 7))),
                         (1 if shared else 2, 3, (slice(5, 7), slice(6, 9)))):
    f = np.zeros((ROWS, COLS), np.uint8)
    f[box] = 1
    frames.append(f)
    g = Dataset()
    seg_id = Dataset()
    seg_id.ReferencedSegmentNumber = number
    if not shared:
      g.SegmentIdentificationSequence = [seg_id]
    plane = Dataset()
    plane.ImagePositionPatient = slices[k][1]
    g.PlanePositionSequence = [plane]
    if not by_position:
      src = Dataset()
      src.ReferencedSOPInstanceUID = slices[k][0]
      der = Dataset()
      der.SourceImageSequence = [src]
      g.DerivationImageSequence = [der]
    groups.append(g)
  ds = Dataset()
  ds.PatientID = patient
  ds.Modality = "SEG"
  ds.SeriesInstanceUID = generate_uid()
  ds.SOPInstanceUID = generate_uid()
  ref = Dataset()
  ref.SeriesInstanceUID = series_uid
  ds.ReferencedSeriesSequence = [ref]
  ds.SegmentationType = "BINARY"
  segments = []
  for number, label in ((1, "edema"), (2, "bleed")):
    s = Dataset()
    s.SegmentNumber = number
    s.SegmentLabel = label
    segments.append(s)
  ds.SegmentSequence = segments
  ds.PerFrameFunctionalGroupsSequence = groups
  if shared:
    common_group = Dataset()
    common_group.SegmentIdentificationSequence = [seg_id]
    ds.SharedFunctionalGroupsSequence = [common_group]
  ds.NumberOfFrames = len(frames)
  ds.Rows, ds.Columns = ROWS, COLS
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
  ds.PixelRepresentation = 0
  ds.PixelData = pack_bits(np.stack(frames))
  dicom_files.save(ds, SEG_SOP, path)


def write_root(root, n=3, seg=True, by_position=False):
  series = {}
  for i in range(n):
    patient = f"P{i:02d}"
    uid, slices = write_series(f"{root}/{patient}/ct", patient)
    series[patient] = slices
    if seg:
      write_seg(f"{root}/{patient}/seg.dcm", uid, slices, patient,
                by_position and i == 0)
  with open(f"{root}/README.txt", "w") as f:
    f.write("not DICOM: skipped\n")
  return str(root), series


def cfg(root, data_dir, **kw):
  args = dict(root=root, res=16, batch_size=4, data_dir=str(data_dir),
              contrasts=("ct:brain",), crop_foreground=False,
              min_foreground=0.0)
  args.update(kw)
  return common.dicom_data_config(**args)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root, series = write_root(tmp_path_factory.mktemp("ct"), by_position=True)
  c = cfg(root, tmp_path_factory.mktemp("data"), keep_aspect=False,
          res=12)
  return c, dicom_folder.prepare(c), series


def _all(c):
  return {s: pipeline.read_split(c, s) for s in ("train", "val", "test")}


def test_series_sorted_rescaled_to_hu_with_seg_masks(built):
  c, builder, _ = built
  splits = _all(c)
  assert sorted(sum(builder.info.metadata["subjects"].values(), [])) == [
      "P00", "P01", "P02"]
  assert builder.info.metadata["segments"] == {"1": "edema", "2": "bleed"}
  for a in splits.values():
    assert a["ct"].shape[1:] == (12, 12) and a["mask"].shape[1:] == (12, 12)
    # Slices were written shuffled; sorted by position, each has HU 40 + k.
    for ct, k in zip(a["ct"], a["slice_index"]):
      body = ct[ct > -500]
      assert abs(float(np.median(body)) - (40 + k)) < 1.0
      assert ct.min() == pytest.approx(-1000.0, abs=1.0)
    for m, k in zip(a["mask"], a["slice_index"]):
      expected = {1: {0, 1}, 2: {0, 1}, 3: {0, 2}}.get(int(k), {0})
      assert set(np.unique(m)) == expected, (k, np.unique(m))
  # Both the SOP-referenced and the position-matched SEG (P00) were used.
  assert all((a["mask"] > 0).any() for a in splits.values())
  # DICOM columns run toward the patient's left (LPS); the display layout
  # is neurological (patient left on the left), so columns are mirrored:
  # segment 2 in DICOM columns 6..8 lands in columns 3..5 of 12.
  a = splits["train"]
  m = a["mask"][list(a["slice_index"]).index(3)]
  assert sorted(set(np.nonzero(m == 2)[1])) == [3, 4, 5]


def test_a_built_set_opens_without_reading_headers(built, monkeypatch):
  c, builder, _ = built
  assert dicom_folder.DicomFolder.name == dicom_folder.NAME

  def no_scan(*args):
    raise AssertionError(f"headers read again: {args}")

  monkeypatch.setattr(dicom_folder, "find_subjects", no_scan)
  again = dicom_folder.prepare(c)
  assert again.data_dir == builder.data_dir
  assert again.info.features.keys() == builder.info.features.keys()
  assert len(again.as_data_source("train")) == builder.info.splits[
      "train"].num_examples


def test_ct_window_preset_in_the_pipeline(built):
  c, _, _ = built
  raw = pipeline.read_split(c, "train")
  stats = pipeline.normalization_stats(raw, c)
  assert stats["ct:brain"] == (40.0, 40.0)      # brain window: W80 L40
  img = pipeline.to_model_arrays(raw, c, stats)["image"][..., 0]
  assert img.min() == -1.0 and img.max() == 1.0  # air and bone clipped
  body = raw["ct"] == 40 + raw["slice_index"][:, None, None]
  np.testing.assert_allclose(img[body], (raw["ct"][body] - 40) / 40,
                             atol=1e-5)
  c2 = c.copy_and_resolve_references()
  c2.contrasts = ("ct",)
  c2.windows = {"ct": (1000.0, 800.0)}
  s2 = pipeline.normalization_stats(raw, c2)
  assert s2["ct"] == (1000.0, 400.0)


def test_rescale_slope_and_intercept(tmp_path):
  for i in range(3):
    write_series(f"{tmp_path}/src/P{i}", f"P{i}", slope=0.5,
                 intercept=-2048.0)
  c = cfg(f"{tmp_path}/src", tmp_path / "data", mask="none", res=12,
          keep_aspect=False, contrasts=("ct",))
  a = pipeline.read_split(c, "train")
  assert "mask" not in a
  for ct, k in zip(a["ct"], a["slice_index"]):
    assert float(np.median(ct[ct > -500])) == pytest.approx(40 + k, abs=0.5)
  assert a["ct"].min() == pytest.approx(-1000.0, abs=1.0)
  assert a["ct"].max() > 600.0   # the (interpolated) bone spot


def test_series_picked_by_description_and_3d(tmp_path):
  for i in range(3):
    write_series(f"{tmp_path}/src/P{i}/a", f"P{i}", "CT HEAD 5mm")
    write_series(f"{tmp_path}/src/P{i}/b", f"P{i}", "SCOUT", slices=2)
  c = cfg(f"{tmp_path}/src", tmp_path / "data", series={"ct": "ct head*"},
          spatial_dims=3, res=8, contrasts=("ct",))
  a = pipeline.read_split(c, "train")
  assert a["ct"].shape[1:] == (8, 8, 8)
  with pytest.raises(DataError, match=r"2 series of subject 'P0' match 'ct'"):
    dicom_folder.prepare(cfg(f"{tmp_path}/src", tmp_path / "data",
                             series={"ct": "*"}))


def test_subject_without_a_matching_series(tmp_path):
  root, _ = write_root(tmp_path / "src", n=3, seg=False)
  write_series(f"{root}/P09/scout", "P09", "SCOUT", slices=2)
  with pytest.raises(DataError, match=r"P09/scout: missing series 'ct' for "
                     r"subject 'P09': no SeriesDescription matches 'ct\*'"):
    dicom_folder.prepare(cfg(root, tmp_path / "data", series={"ct": "ct*"}))
  b = dicom_folder.prepare(cfg(root, tmp_path / "data", series={"ct": "ct*"},
                               skip_incomplete=True))
  assert sorted(sum(b.info.metadata["subjects"].values(), [])) == [
      "P00", "P01", "P02"]


# -------------------------------------------------------------- bad input --


def _fails(c, *patterns):
  with pytest.raises(DataError) as e:
    dicom_folder.prepare(c)
  for p in patterns:
    assert p in str(e.value), str(e.value)
  path = os.path.join(c.data_dir, "dicom_folder")
  assert not os.path.exists(path) or not os.listdir(path)


def test_corrupt_dicom_file(tmp_path):
  root, series = write_root(tmp_path / "src", seg=False)
  bad = series["P01"][2][2]
  with open(bad, "wb") as f:
    f.write(b"garbage" * 50)
  _fails(cfg(root, tmp_path / "data"), bad, "not a valid DICOM file")


def test_truncated_pixel_data(tmp_path):
  root, series = write_root(tmp_path / "src", seg=False)
  bad = series["P02"][3][2]
  with open(bad, "rb") as f:
    raw = f.read()
  with open(bad, "wb") as f:
    f.write(raw[:-60])
  _fails(cfg(root, tmp_path / "data"), bad, "cannot read pixel data",
         "truncated")


def test_missing_slice_and_duplicate_position(tmp_path):
  root, series = write_root(tmp_path / "a", seg=False)
  os.remove(series["P01"][2][2])
  _fails(cfg(root, tmp_path / "data"), series["P01"][3][2],
         "missing slice?")
  root, series = write_root(tmp_path / "b", seg=False)
  ds = pydicom.dcmread(series["P00"][1][2])
  ds.SOPInstanceUID = generate_uid()
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  ds.save_as(f"{tmp_path}/b/P00/ct/copy.dcm")
  _fails(cfg(root, tmp_path / "data"), "same slice position")


def test_seg_frames_must_fit_the_series(tmp_path):
  root, series = write_root(tmp_path / "src", seg=False)
  uid = pydicom.dcmread(series["P00"][0][2]).SeriesInstanceUID
  moved = [(sop, [p[0], p[1], p[2] + 100.0], path)
           for sop, p, path in series["P00"]]
  write_seg(f"{root}/P00/seg.dcm", uid, moved, "P00", by_position=True)
  for p in ("P01", "P02"):
    u = pydicom.dcmread(series[p][0][2]).SeriesInstanceUID
    write_seg(f"{root}/{p}/seg.dcm", u, series[p], p)
  _fails(cfg(root, tmp_path / "data"), f"{root}/P00/seg.dcm",
         "lies on no slice")


def test_seg_identified_in_the_shared_functional_groups(tmp_path):
  root, series = write_root(tmp_path / "src", seg=False)
  for p in ("P00", "P01", "P02"):
    uid = pydicom.dcmread(series[p][0][2]).SeriesInstanceUID
    write_seg(f"{root}/{p}/seg.dcm", uid, series[p], p, shared=True)
  found = dicom_folder.find_subjects(dicom_folder.settings(
      cfg(root, tmp_path / "data")))
  sub = [x for x in found if x.name == "P00"][0]
  scan, segments = dicom_folder.read_seg(sub.seg, sub.series["ct"])
  assert segments == {1: "edema", 2: "bleed"}
  # Every frame is segment 1: slices 1-3 carry it, slice 0 nothing.
  present = [int(scan.data[:, :, k].max())
             for k in range(scan.data.shape[2])]
  assert present[:4] == [0, 1, 1, 1], present


def test_missing_seg_for_one_subject(tmp_path):
  root, _ = write_root(tmp_path / "src")
  os.remove(f"{root}/P02/seg.dcm")
  _fails(cfg(root, tmp_path / "data"), f"{root}/P02/ct",
         "no DICOM-SEG for subject 'P02'")


def test_empty_folder_and_no_series(tmp_path):
  os.makedirs(tmp_path / "empty")
  _fails(cfg(str(tmp_path / "empty"), tmp_path / "data"), "empty folder")
  os.makedirs(tmp_path / "txt")
  with open(tmp_path / "txt" / "notes.txt", "w") as f:
    f.write("x")
  _fails(cfg(str(tmp_path / "txt"), tmp_path / "data"),
         "no DICOM image series found")


def _add_second_echo(slices, folder):
  """Every image of a series again as echo 2 (same positions, same series):
  a multi-echo acquisition."""
  for _, _, path in slices:
    ds = pydicom.dcmread(path)
    ds.EchoNumbers = 1
    ds.save_as(path)
    ds.EchoNumbers = 2
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(os.path.join(folder, "echo2_" + os.path.basename(path)))


def test_multi_echo_series_named_and_selected_by_an_image_filter(tmp_path):
  root, series = write_root(tmp_path / "src", seg=False)
  _add_second_echo(series["P01"], f"{root}/P01/ct")
  _fails(cfg(root, tmp_path / "data"), "the series is multi-echo",
         "EchoNumbers", "data.image_filter={'EchoNumbers':")
  # Echo 1 only (images without the attribute, P00 and P02, fail a filter
  # on it: give them one too).
  for p in ("P00", "P02"):
    for _, _, path in series[p]:
      ds = pydicom.dcmread(path)
      ds.EchoNumbers = 1
      ds.save_as(path)
  b = dicom_folder.prepare(cfg(root, tmp_path / "data",
                               image_filter={"EchoNumbers": 1}))
  assert sorted(sum(b.info.metadata["subjects"].values(), [])) == [
      "P00", "P01", "P02"]


def test_a_series_the_config_does_not_select_is_not_checked(tmp_path):
  root, series = write_root(tmp_path / "src", seg=False)
  extra, slices = write_series(f"{root}/P01/perf", "P01", "PERFUSION 4D")
  del extra
  _add_second_echo(slices, f"{root}/P01/perf")  # same positions twice
  b = dicom_folder.prepare(cfg(root, tmp_path / "data",
                               series={"ct": "ct head"}))
  assert sorted(sum(b.info.metadata["subjects"].values(), [])) == [
      "P00", "P01", "P02"]


def test_gantry_tilt_is_refused_by_name(tmp_path):
  root, series = write_root(tmp_path / "src", seg=False)
  # A 10 degree tilt: each slice also steps along y.
  for k, (_, pos, path) in enumerate(series["P02"]):
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [pos[0], pos[1] + k * STEP * np.tan(
        np.radians(10.0)), pos[2]]
    ds.save_as(path)
  _fails(cfg(root, tmp_path / "data"), "10.0 degrees off their normal",
         "gantry tilt", "dcm2niix")
