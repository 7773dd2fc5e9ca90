"""Every own-data example of docs/data.md and docs/study.md, as written,
builds a data set from small files this test writes at the paths the
examples name ("/data/..." is moved under a temporary folder)."""

import ast
import importlib.util
import os
import re

import nibabel as nib
import numpy as np
import nrrd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import generate_uid

import dicom_files
from configs import common
from configs import ddpm
from medgen_jax import commands
from medgen_jax import config_check
from medgen_jax.data import medmnist_info
from medgen_jax.data import pipeline
from medgen_jax.downstream import study
from test_builders_medmnist import write_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 8)


def python_blocks(doc: str):
  with open(os.path.join(ROOT, "docs", doc), encoding="utf-8") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


class _Relocate(ast.NodeTransformer):
  """``"/data/x"`` -> ``"<tmp>/x"``."""

  def __init__(self, base):
    self.base = base

  def visit_Constant(self, node):  # pylint: disable=invalid-name
    if isinstance(node.value, str) and node.value.startswith("/data/"):
      return ast.copy_location(
          ast.Constant(os.path.join(self.base, node.value[len("/data/"):])),
          node)
    return node


def example_calls(block: str, base: str):
  """``(source, call)`` of every ``common.*_data_config(...)`` statement; a
  call written ``f(..., k=v)`` stands for the block's previous full call
  of ``f`` with ``k=v`` added, as the docs mean it."""
  tree = _Relocate(base).visit(ast.parse(block))
  full = {}
  for stmt in tree.body:
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
      continue
    call = stmt.value
    name = ast.unparse(call.func)
    if call.args and isinstance(call.args[0], ast.Constant) and \
        call.args[0].value is Ellipsis:
      given = {k.arg for k in call.keywords}
      call = ast.Call(call.func, [], [k for k in full[name].keywords
                                      if k.arg not in given] + call.keywords)
    else:
      full[name] = call
    yield ast.unparse(stmt), ast.fix_missing_locations(ast.Expression(call))


def config_module(block: str, base: str, path: str):
  """A config-file example written to ``path`` and imported."""
  tree = ast.fix_missing_locations(_Relocate(base).visit(ast.parse(block)))
  with open(path, "w", encoding="utf-8") as f:
    f.write(ast.unparse(tree))
  spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------- the files --


def _volume(i, lesion=True):
  """A head-like block with noise; a lesion (label 4, edema 2 around it)."""
  rng = np.random.default_rng(i)
  x = np.zeros(SHAPE, np.float32)
  x[3:13, 2:14, 1:7] = 100 * (i + 1) + rng.normal(0, 5, (10, 12, 6))
  seg = np.zeros(SHAPE, np.uint8)
  if lesion:
    seg[6:10, 5:9, 3:5] = 2
    seg[7:9, 6:8, 3:5] = 4
  return x, seg


def _nii(arr, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0])), path)


def write_brats(root, n=6):
  for i in range(n):
    s = f"BraTS2021_{i:05d}"
    x, seg = _volume(i, lesion=i % 2 == 0)
    for m, k in (("t1", 1.0), ("t2", 1.5), ("flair", 2.0)):
      _nii(k * x, f"{root}/{s}/{s}_{m}.nii.gz")
    _nii(seg, f"{root}/{s}/{s}_seg.nii.gz")
  with open(f"{root}/participants.csv", "w", encoding="utf-8") as f:
    f.write("subject,label\n" + "".join(
        f"BraTS2021_{i:05d},{('control', 'patient')[i % 2]}\n"
        for i in range(n)))


def write_ixi(root, n=5):
  for i in range(n):
    x, _ = _volume(i)
    s = f"IXI{i:03d}-Guys-0828"
    _nii(x, f"{root}/T1/{s}-T1.nii.gz")
    if i != 2:   # skip_incomplete: IXI002 has no T2
      _nii(1.5 * x, f"{root}/T2/{s}-T2.nii.gz")


def write_slicer(root, n=4):
  for i in range(n):
    x, seg = _volume(i)
    header = {"space": "left-posterior-superior",
              "space directions": np.diag([1.0, 1.0, 2.0]),
              "space origin": np.zeros(3)}
    os.makedirs(f"{root}/case{i}", exist_ok=True)
    nrrd.write(f"{root}/case{i}/CT.nrrd", (x - 1000).astype(np.int16),
               header)
    nrrd.write(f"{root}/case{i}/Segmentation.seg.nrrd", (seg > 0).astype(
        np.uint8), header)


def _dicom_series(folder, patient, description, modality, values):
  """Axial slices of ``values`` [X, Y, Z] (stored as int16); returns
  the series uid and [(sop uid, position)]."""
  uid, out = generate_uid(), []
  for k in range(values.shape[2]):
    ds = Dataset()
    ds.PatientID, ds.Modality = patient, modality
    ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesDescription = description
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
    ds.PixelSpacing = [1.0, 1.0]
    ds.Rows, ds.Columns = values.shape[1], values.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.ascontiguousarray(
        values[:, :, k].T).astype(np.int16).tobytes()
    dicom_files.save(ds, "1.2.840.10008.5.1.4.1.1.2",
                     f"{folder}/IM{k:04d}.dcm")
    out.append((ds.SOPInstanceUID, ds.ImagePositionPatient))
  return uid, out


def write_head_ct(root, n=4):
  for i in range(n):
    x, _ = _volume(i)
    _dicom_series(f"{root}/P{i}/ct", f"P{i}", "CT HEAD 5mm", "CT",
                  np.where(x > 0, 40.0 + x / 10, -1000.0))


def write_prostate_mr(root, n=4):
  for i in range(n):
    x, seg = _volume(i)
    uid, slices = _dicom_series(f"{root}/P{i}/t2", f"P{i}", "t2_tse_tra",
                                "MR", x)
    frames, groups = [], []
    for k, (sop, _) in enumerate(slices):
      if (seg[:, :, k] > 0).any():
        frames.append((seg[:, :, k] > 0).T.astype(np.uint8))
        src, der, ident, g = Dataset(), Dataset(), Dataset(), Dataset()
        src.ReferencedSOPInstanceUID = sop
        der.SourceImageSequence = [src]
        ident.ReferencedSegmentNumber = 1
        g.DerivationImageSequence = [der]
        g.SegmentIdentificationSequence = [ident]
        groups.append(g)
    ds = Dataset()
    ds.PatientID, ds.Modality = f"P{i}", "SEG"
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ref = Dataset()
    ref.SeriesInstanceUID = uid
    ds.ReferencedSeriesSequence = [ref]
    ds.SegmentationType = "BINARY"
    segment = Dataset()
    segment.SegmentNumber, segment.SegmentLabel = 1, "lesion"
    ds.SegmentSequence = [segment]
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = SHAPE[1], SHAPE[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelRepresentation = 0
    ds.PixelData = pack_bits(np.stack(frames))
    dicom_files.save(ds, "1.2.840.10008.5.1.4.1.1.66.4",
                     f"{root}/P{i}/seg.dcm")


def _png(arr, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path)


def write_busi(root, n=3):
  for c in ("benign", "malignant", "normal"):
    for i in range(n):
      img = np.full((20, 24), 30, np.uint8)
      img[6:14, 8:16] = 90 + 40 * i
      _png(img, f"{root}/images/{c}/{c} ({i}).png")
      _png(np.where(img > 60, 255, 0).astype(np.uint8),
           f"{root}/masks/{c}/{c} ({i}).png")


def write_derm(root, n=8):
  rows = ["file,label,subject"]
  for i in range(n):
    img = np.full((16, 16, 3), (200, 160, 140), np.uint8)
    img[5:11, 5:11] = (90, 50, 40) if i % 2 else (150, 100, 80)
    os.makedirs(f"{root}/img", exist_ok=True)
    Image.fromarray(img).save(f"{root}/img/ISIC_{i:04d}.jpg")
    rows.append(f"img/ISIC_{i:04d}.jpg,{('nevus', 'melanoma')[i % 2]},p{i}")
  with open(f"{root}/labels.csv", "w", encoding="utf-8") as f:
    f.write("\n".join(rows) + "\n")


def _dicom_2d(path, patient, pixels, modality, photometric, **attrs):
  ds = Dataset()
  ds.PatientID, ds.Modality = patient, modality
  ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
  color = photometric == "RGB"
  ds.Rows, ds.Columns = pixels.shape[-3:-1] if color else pixels.shape[-2:]
  ds.SamplesPerPixel = 3 if color else 1
  ds.PhotometricInterpretation = photometric
  if color:
    ds.PlanarConfiguration = 0
  bits = 8 if color else 12
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8 if color else 16), bits, \
      bits - 1
  ds.PixelRepresentation = 0
  for k, v in attrs.items():
    setattr(ds, k, v)
  ds.PixelData = pixels.astype(np.uint8 if color else np.uint16).tobytes()
  dicom_files.save(ds, "1.2.840.10008.5.1.4.1.1.1", path)


def write_chest_cr(root, n=3):
  for c, name in enumerate(("normal", "pneumonia")):
    for i in range(n):
      x = np.zeros((24, 20), np.uint16)
      x[2:22, 3:17] = 1500
      x[4:20, 9:11] = 3500       # spine
      if c:
        x[8:14, 4:8] = 2500      # an opacity
      _dicom_2d(f"{root}/{name}/{name}{i}/IM0001", f"{name}{i}", 4095 - x,
                "CR", "MONOCHROME1", WindowCenter=2048, WindowWidth=4096,
                ImagerPixelSpacing=[0.2, 0.2])


def write_us(root, n=2):
  for c, name in enumerate(("benign", "malignant")):
    for i in range(n):
      x = np.zeros((3, 12, 12, 3), np.uint8)
      for f in range(3):
        x[f, 4:8, 3 + f:7 + f] = 120 + 60 * c
      _dicom_2d(f"{root}/{name}/{i}.dcm", f"{name}{i}", x, "US", "RGB",
                NumberOfFrames=3)


WRITERS = {"BraTS2021": write_brats, "IXI": write_ixi,
           "slicer_cases": write_slicer, "head_ct": write_head_ct,
           "prostate_mr": write_prostate_mr, "busi": write_busi,
           "derm": write_derm, "chest_cr": write_chest_cr, "us": write_us,
           "brats": write_brats}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """The example folders, and a data dir with the MedMNIST files."""
  base = str(tmp_path_factory.mktemp("examples"))
  for name, write in WRITERS.items():
    write(os.path.join(base, name))
  data_dir = str(tmp_path_factory.mktemp("built"))
  manual = os.path.join(data_dir, "downloads", "manual")
  n = dict(train=6, val=2, test=2)
  for flag, size in (("pneumoniamnist", 64), ("dermamnist", 224),
                     ("organmnist3d", 64)):
    write_npz(os.path.join(manual, medmnist_info.file_name(flag, size)),
              flag, size, n)
  return base, data_dir


def _with_method(data_cfg):
  c = ddpm.get_config("res=16,runlocal")
  c.data = data_cfg
  return c


def test_every_data_section_example_builds(data, monkeypatch):
  base, data_dir = data
  monkeypatch.setenv("MEDGEN_DATA_DIR", data_dir)
  examples = [x for b in python_blocks("data.md") if "def get_config" not in b
              for x in example_calls(b, base)]
  assert len(examples) >= 14, [s for s, _ in examples]
  for source, expr in examples:
    cfg = eval(compile(expr, "docs/data.md", "eval"),  # pylint: disable=eval-used
               {"common": common})
    config_check.validate(_with_method(cfg))
    builder = pipeline.prepare(cfg)
    train = pipeline.read_split(cfg, "train")
    for c in cfg.contrasts:
      key = c.split(":")[0]
      assert key in builder.info.features, (source, c)
      assert train[key].shape[1:] == (cfg.res,) * cfg.spatial_dims, source
      assert np.isfinite(train[key]).all(), source
    if "mask" in source:   # mask=, masks_dir= or label_source="mask"
      assert "mask" in train and train["mask"].max() > 0, source


def test_the_config_file_example_inspects_as_documented(data, tmp_path,
                                                        monkeypatch, capsys):
  base, data_dir = data
  monkeypatch.setenv("MEDGEN_DATA_DIR", data_dir)
  block = next(b for b in python_blocks("data.md") if "def get_config" in b)
  module = config_module(block, base, str(tmp_path / "my_brats.py"))
  c = module.get_config("res=16")
  # The documented override of the same file.
  c.data.slice_axis = "coronal"
  config_check.validate(c)
  commands.run("inspect", c, str(tmp_path / "w"))
  out = capsys.readouterr().out
  assert "train:" in out and "flair" in out
  grids = os.listdir(tmp_path / "w" / "inspect")
  assert any(g.endswith("_grid.png") for g in grids), grids


def test_the_study_example_keeps_all_three_tasks(data, tmp_path,
                                                 monkeypatch):
  base, data_dir = data
  monkeypatch.setenv("MEDGEN_DATA_DIR", data_dir)
  block = next(b for b in python_blocks("study.md") if "def get_config" in b)
  c = config_module(block, base, str(tmp_path / "my_study.py")).get_config()
  config_check.validate(c)
  train = pipeline.read_split(c.data, "train")
  resolved, notes = study.resolve_for_data(c, train)
  assert notes == [] and set(resolved.study.tasks) == {
      "classification", "segmentation", "translation"}
  assert resolved.study.mask_key == "mask"
  seg = resolved.study.tasks.segmentation
  assert tuple(seg.inputs) == ("flair",) and seg.target == "mask"
