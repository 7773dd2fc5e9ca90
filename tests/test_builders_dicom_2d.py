"""2D DICOM through image_folder: radiographs (MONOCHROME1, VOI windows and
LUTs, detector spacing), ultrasound cine loops, CT slices; and enhanced
multi-frame volumes and stray 2D images in dicom_folder."""

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import generate_uid

import dicom_files
from configs import common
from medgen_jax import config_check
from medgen_jax.data import dicom_images
from medgen_jax.data import pipeline
from medgen_jax.data.builder_lib import DataError
from medgen_jax.data.builders import dicom_folder
from medgen_jax.data.builders import image_folder

CR = "1.2.840.10008.5.1.4.1.1.1"          # Computed Radiography
US_MULTI = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame
CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
CLASSES = ("normal", "nodule")


def _image(patient, stored, modality="CR", photometric="MONOCHROME2",
           **attrs):
  ds = Dataset()
  ds.PatientID = patient
  ds.Modality = modality
  ds.SeriesInstanceUID = generate_uid()
  ds.SOPInstanceUID = generate_uid()
  ds.Rows, ds.Columns = stored.shape[-2:] if stored.ndim < 4 else \
      stored.shape[1:3]
  color = stored.ndim == 4 or (stored.ndim == 3 and stored.shape[-1] == 3)
  ds.SamplesPerPixel = 3 if color else 1
  ds.PhotometricInterpretation = photometric
  if color:
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
  else:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
  ds.PixelRepresentation = 0
  for k, v in attrs.items():
    setattr(ds, k, v)
  ds.PixelData = stored.astype(np.uint8 if color else np.uint16).tobytes()
  return ds


def radiograph(label):
  """A 12-bit chest-like image as displayed, 24 rows x 16 columns: air (0),
  a body (1000) in columns 2..13, a bright 'bone' bar (3000); class 1 has
  a nodule (2000)."""
  x = np.zeros((24, 16), np.uint16)
  x[2:22, 2:14] = 1000
  x[4:20, 6:9] = 3000
  if label:
    x[10:13, 11:14] = 2000
  return x


def write_radiographs(root, n=3):
  """Per class n patients with two CR images each: MONOCHROME1 (film-like:
  low values bright), a header window, detector pixels 0.2 x 0.1 mm (an
  image 24 rows x 16 columns spans 4.8 x 1.6 mm: wide after padding)."""
  for c, name in enumerate(CLASSES):
    for i in range(n):
      for view in ("pa", "lat"):
        stored = 4095 - radiograph(c)   # MONOCHROME1 stores the inverse.
        ds = _image(f"{name}{i}", stored, photometric="MONOCHROME1",
                    WindowCenter=2047, WindowWidth=4096,
                    ImagerPixelSpacing=[0.2, 0.1])
        dicom_files.save(ds, CR, f"{root}/{name}/{name}{i}_{view}.dcm")
  with open(f"{root}/normal/notes.txt", "w") as f:
    f.write("not an image\n")
  return str(root)


def cfg(root, data_dir, **kw):
  args = dict(root=str(root), class_names=CLASSES, res=16, batch_size=4,
              data_dir=str(data_dir))
  args.update(kw)
  return common.image_folder_data_config(**args)


def _all(c):
  return {s: pipeline.read_split(c, s) for s in ("train", "val", "test")}


def test_radiographs_monochrome1_window_spacing_and_patient_splits(tmp_path):
  root = write_radiographs(tmp_path / "cr")
  c = cfg(root, tmp_path / "data")
  from configs import ddpm  # pylint: disable=import-outside-toplevel
  d = ddpm.get_config("res=16,runlocal")
  d.data = c
  config_check.validate(d)
  builder = image_folder.prepare(c)
  assert builder.info.metadata["bit_depth"] == (
      "DICOM display values (VOI window -> [0, 1])")
  splits = _all(c)
  assert sum(len(a["image"]) for a in splits.values()) == 12
  # Both views of a patient share a split (subject = PatientID).
  meta = builder.info.metadata["subjects"]
  assert sorted(sum(meta.values(), [])) == sorted(
      f"{n}{i}" for n in CLASSES for i in range(3))
  for a in splits.values():
    for img, label, f in zip(a["image"], a["label"], a["file"].astype(str)):
      assert 0 <= img.min() and img.max() <= 1
      # MONOCHROME1 inverted: the bone bar (stored low) is the brightest.
      col = img[8]  # a row through the middle of the padded image
      assert col.argmax() in range(5, 11), (f, col)
      # 0.2 x 0.1 mm pixels: 4.8 mm tall, 1.6 mm wide -> padded left and
      # right to 4.8 mm; the body's 1.2 mm are 4 of 16 columns (12 if the
      # spacing were ignored).
      body = (img > 0.1).mean(axis=0)
      assert 3 <= int((body > 0.5).sum()) <= 5, (f, body)
      assert CLASSES[label] in f


def test_voi_lut_sequence_explicit_window_and_ct_in_hu(tmp_path):
  x = radiograph(1)
  lut = Dataset()
  # A gamma-like curve: input 0..4095 -> output 0..65535 (16 bits).
  curve = np.round(65535 * (np.arange(4096) / 4095) ** 0.5)
  lut.LUTDescriptor = [4096, 0, 16]
  lut.LUTData = curve.astype("<u2").tobytes()
  ds = _image("M1", x, modality="MG", VOILUTSequence=[lut])
  path = dicom_files.save(ds, CR, f"{tmp_path}/mg.dcm")
  img = dicom_images.read_image(path, 0, "auto").pixels
  np.testing.assert_allclose(img, curve[x] / 65535.0, atol=1e-6)
  img = dicom_images.read_image(path, 0, "2000/2000").pixels  # [1000, 3000]
  assert img.min() == 0.0 and img.max() == 1.0
  np.testing.assert_allclose(img[11, 12], 0.5, atol=1e-3)
  # A CT slice keeps Hounsfield units with "auto".
  hu = np.full((8, 8), -1000.0)
  hu[2:6, 2:6] = 40.0
  ct = _image("C1", (hu + 1024).astype(np.uint16), modality="CT",
              RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40,
              WindowWidth=80, PixelSpacing=[0.5, 0.5])
  path = dicom_files.save(ct, CT, f"{tmp_path}/ct.dcm")
  np.testing.assert_allclose(dicom_images.read_image(path, 0, "auto").pixels,
                             hu)
  # "header": the file's 40/80 window; 40 HU is its centre.
  img = dicom_images.read_image(path, 0, "header").pixels
  assert img.min() == 0.0 and img[3, 3] == pytest.approx(0.5, abs=0.01)


def _cine(patient, frames=5, rgb=True):
  """A colour ultrasound loop: a bright blob moving right frame by frame."""
  x = np.zeros((frames, 12, 12, 3) if rgb else (frames, 12, 12), np.uint8)
  for f in range(frames):
    x[f, 4:8, 2 + f:5 + f] = 200
  ds = _image(patient, x, modality="US",
              photometric="RGB" if rgb else "MONOCHROME2")
  ds.NumberOfFrames = frames
  return ds


def test_ultrasound_cine_refused_split_or_middle(tmp_path):
  for c, name in enumerate(CLASSES):
    for i in range(2):
      dicom_files.save(_cine(f"{name}{i}"), US_MULTI, f"{tmp_path}/us/{name}/{i}.dcm")
  root = f"{tmp_path}/us"
  with pytest.raises(DataError, match=r"5 frames \(a cine loop\); set "
                     r"data.dicom_frames='split'"):
    image_folder.prepare(cfg(root, tmp_path / "d0"))
  c = cfg(root, tmp_path / "d1", dicom_frames="split", color_mode="rgb")
  b = image_folder.prepare(c)
  assert b.info.metadata["bit_depth"] == "DICOM colour (8-bit RGB)"
  splits = _all(c)
  files = sorted(sum((list(a["file"].astype(str)) for a in splits.values()),
                     []))
  assert len(files) == 4 * 5 and files[:2] == ["nodule/0.dcm#1",
                                               "nodule/0.dcm#2"]
  c = cfg(root, tmp_path / "d2", dicom_frames="middle", color_mode="rgb")
  splits = _all(c)
  assert sum(len(a["red"]) for a in splits.values()) == 4
  a = next(a for a in splits.values() if len(a["red"]))
  # The middle frame (index 2): the blob spans columns 4..6 of 12.
  assert a["red"][0].max() == 200.0


def test_extensionless_dicom_and_mixed_units_refused(tmp_path):
  x = radiograph(0)
  dicom_files.save(_image("A", x, WindowCenter=2000, WindowWidth=4000), CR,
        f"{tmp_path}/set/normal/IM0001")
  dicom_files.save(_image("B", x), CR, f"{tmp_path}/set/normal/IM0002")  # no window
  dicom_files.save(_image("C", x, WindowCenter=2000, WindowWidth=4000), CR,
        f"{tmp_path}/set/nodule/IM0003")
  with pytest.raises(DataError, match=r"IM0002: DICOM modality units \(CR\) "
                     r"among DICOM display values.*data.dicom_window"):
    image_folder.prepare(cfg(f"{tmp_path}/set", tmp_path / "d0"))
  c = cfg(f"{tmp_path}/set", tmp_path / "d1", dicom_window="none",
          split_fractions=(0.34, 0.33, 0.33))
  b = image_folder.prepare(c)
  assert b.info.metadata["bit_depth"] == "DICOM modality units (CR)"
  with pytest.raises(config_check.ConfigError, match="dicom_window"):
    bad = cfg(f"{tmp_path}/set", tmp_path / "d1", dicom_window="soft")
    from configs import ddpm  # pylint: disable=import-outside-toplevel
    d = ddpm.get_config("res=16,runlocal")
    d.data = bad
    config_check.validate(d)


# -------------------------------------------------- dicom_folder: volumes --


def enhanced_ct(patient, hu, spacing=2.5, temporal=None):
  """One enhanced CT file holding ``hu`` [slices, rows, cols] (frames
  listed in reverse order; per-frame rescale; with ``temporal``, every
  slice again at a second time point)."""
  n = hu.shape[0]
  frames, groups = [], []
  for t in ([1] if temporal is None else [1, 2]):
    for k in reversed(range(n)):
      slope, intercept = 1.0, -1024.0 - k  # differs per frame
      frames.append(np.round((hu[k] - intercept) / slope).astype(np.uint16))
      g = Dataset()
      pos = Dataset()
      pos.ImagePositionPatient = [-5.0, -4.0, 10.0 + spacing * k]
      g.PlanePositionSequence = [pos]
      tr = Dataset()
      tr.RescaleSlope, tr.RescaleIntercept = slope, intercept
      g.PixelValueTransformationSequence = [tr]
      if temporal is not None:
        content = Dataset()
        content.TemporalPositionIndex = t
        g.FrameContentSequence = [content]
      groups.append(g)
  shared = Dataset()
  orient = Dataset()
  orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
  shared.PlaneOrientationSequence = [orient]
  measures = Dataset()
  measures.PixelSpacing = [0.8, 0.7]
  measures.SliceThickness = spacing
  shared.PixelMeasuresSequence = [measures]
  ds = _image(patient, np.stack(frames), modality="CT",
              SeriesDescription="CT HEAD")
  ds.NumberOfFrames = len(frames)
  ds.SharedFunctionalGroupsSequence = [shared]
  ds.PerFrameFunctionalGroupsSequence = groups
  return ds


def _hu(k_slices=5):
  hu = np.full((k_slices, 10, 12), -1000.0)
  for k in range(k_slices):
    hu[k, 2:8, 2:10] = 40.0 + k
  return hu


def _ct_cfg(root, data_dir, **kw):
  args = dict(root=str(root), res=12, batch_size=4, data_dir=str(data_dir),
              contrasts=("ct:brain",), crop_foreground=False,
              min_foreground=0.0, keep_aspect=False)
  args.update(kw)
  return common.dicom_data_config(**args)


def seg_on_frame(ct, frame):
  """A one-segment SEG on frame ``frame`` (1-based) of an enhanced CT,
  referenced by ReferencedSOPInstanceUID + ReferencedFrameNumber only."""
  ds = _image(ct.PatientID, np.ones((1, 10, 12), np.uint16), modality="SEG")
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
  ds.PixelData = pack_bits(np.ones((1, 10, 12), np.uint8))
  ds.NumberOfFrames = 1
  ref = Dataset()
  ref.SeriesInstanceUID = ct.SeriesInstanceUID
  ds.ReferencedSeriesSequence = [ref]
  ds.SegmentationType = "BINARY"
  segment = Dataset()
  segment.SegmentNumber, segment.SegmentLabel = 1, "lesion"
  ds.SegmentSequence = [segment]
  src = Dataset()
  src.ReferencedSOPInstanceUID = ct.SOPInstanceUID
  src.ReferencedFrameNumber = frame
  der = Dataset()
  der.SourceImageSequence = [src]
  ident = Dataset()
  ident.ReferencedSegmentNumber = 1
  g = Dataset()
  g.DerivationImageSequence = [der]
  g.SegmentIdentificationSequence = [ident]
  ds.PerFrameFunctionalGroupsSequence = [g]
  return ds


def test_enhanced_multiframe_ct_is_read_per_frame(tmp_path):
  for i in range(3):
    ct = enhanced_ct(f"P{i}", _hu())
    dicom_files.save(ct, ENHANCED_CT, f"{tmp_path}/src/P{i}/ct.dcm")
    # Frames are stored in reverse: frame 3 of 5 is slice 2.
    dicom_files.save(seg_on_frame(ct, 3), dicom_folder.SEG_SOP_CLASS,
                     f"{tmp_path}/src/P{i}/seg.dcm")
  # A dose-report screenshot (2D, no geometry) beside the CT is not
  # selected, so it does not stop the folder.
  dicom_files.save(_image("P1", np.zeros((8, 8), np.uint16), modality="CT",
               SeriesDescription="DOSE REPORT"), CT,
        f"{tmp_path}/src/P1/dose.dcm")
  c = _ct_cfg(f"{tmp_path}/src", tmp_path / "data",
              series={"ct": "ct head"})
  dicom_folder.prepare(c)
  splits = _all(c)
  for a in splits.values():
    for ct, m, k in zip(a["ct"], a["mask"], a["slice_index"]):
      body = ct[ct > -500]   # HU from each frame's own rescale, in order
      assert abs(float(np.median(body)) - (40 + k)) < 1.0
      assert m.any() == (k == 2), k
  # Selecting the screenshot names what it is and where 2D images go.
  with pytest.raises(DataError, match=r"dose.dcm: no ImagePositionPatient: "
                     r"a 2D image.*image_folder"):
    dicom_folder.prepare(_ct_cfg(f"{tmp_path}/src", tmp_path / "d2",
                                 series={"ct": "dose*"},
                                 skip_incomplete=True))


def test_enhanced_4d_ct_named_and_one_time_point_selected(tmp_path):
  for i in range(3):
    dicom_files.save(enhanced_ct(f"P{i}", _hu(), temporal=True), ENHANCED_CT,
          f"{tmp_path}/src/P{i}/ct.dcm")
  with pytest.raises(DataError, match=r"4D \(time points\): "
                     r"TemporalPositionIndex.*data.image_filter="
                     r"\{'TemporalPositionIndex'"):
    dicom_folder.prepare(_ct_cfg(f"{tmp_path}/src", tmp_path / "d0"))
  c = _ct_cfg(f"{tmp_path}/src", tmp_path / "d1",
              image_filter={"TemporalPositionIndex": 2})
  dicom_folder.prepare(c)
  assert sum(len(a["ct"]) for a in _all(c).values()) == 3 * 5
  # An enhanced volume given to image_folder is sent to dicom_folder.
  with pytest.raises(DataError, match="enhanced multi-frame CT volume.*"
                     "dicom_folder"):
    image_folder.prepare(cfg(f"{tmp_path}/src", tmp_path / "d2",
                             class_names=("P0",), images_glob="P0/*"))
