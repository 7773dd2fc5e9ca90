"""3D volume files -> voxel arrays with RAS affines, chosen by extension.

=====================  ===========================================  ==========
extension              format                                       reader
=====================  ===========================================  ==========
``.nii``, ``.nii.gz``  NIfTI-1/2                                    nibabel
``.nrrd``, ``.nhdr``   NRRD (attached or detached header; 3D        pynrrd
                       Slicer volumes and ``.seg.nrrd``)
``.mha``, ``.mhd``     MetaImage (ITK; data in the ``.mha`` or in   own reader
                       the ``.raw``/``.zraw`` the ``.mhd`` names)
other                  whatever nibabel opens (``.mgz``, ...)       nibabel
=====================  ===========================================  ==========

Every reader returns voxel ``(i, j, k)`` with the 4x4 affine mapping it to
RAS millimetres (the nibabel convention), so volumes of one subject stored in
different formats compare and reorient alike. Geometry:

* NRRD: ``space directions`` holds one vector per axis, in the frame named by
  ``space`` (``left-posterior-superior``/``LPS``/``scanner-xyz`` or
  ``right-anterior-superior``/``RAS`` or ``left-anterior-superior``/
  ``LAS``); axes whose direction is ``none`` (a list/vector axis) must have
  size 1. Without ``space`` the orientation is unknown: the axes are taken
  as RAS with the ``spacings`` (a warning says so).
* MetaImage: ITK's physical space is LPS. ``TransformMatrix`` lists the
  direction cosines one voxel axis after another (its first ``NDims``
  numbers are the direction of axis 0: ITK's ``MetaImageIO`` writes
  ``TransformMatrix[i * N + j] = direction[j][i]``, i.e. the columns of the
  ITK direction matrix), so ``affine = diag(-1, -1, 1) @ [D diag(spacing) |
  Offset]``. Data are stored x fastest.

Bad files raise :class:`~medgen_jax.data.builder_lib.DataError` naming the
file and the problem.
"""

import dataclasses
import os
import zlib
from typing import Dict, Tuple

import nibabel as nib
import nrrd
import numpy as np
from absl import logging

from medgen_jax.data import volumes
from medgen_jax.data.builder_lib import describe, file_error

NIFTI, NRRD, METAIMAGE, OTHER = "NIfTI", "NRRD", "MetaImage", "nibabel"
_EXTENSIONS = ((".nii.gz", NIFTI), (".nii", NIFTI), (".nrrd", NRRD),
               (".nhdr", NRRD), (".mha", METAIMAGE), (".mhd", METAIMAGE))
EXTENSIONS = tuple(e for e, _ in _EXTENSIONS)

# LPS (ITK, DICOM) and LAS -> RAS: negate the flipped world axes.
_TO_RAS = {"RAS": np.diag([1.0, 1.0, 1.0]), "LAS": np.diag([-1.0, 1.0, 1.0]),
           "LPS": np.diag([-1.0, -1.0, 1.0])}
_NRRD_SPACES = {"right-anterior-superior": "RAS", "ras": "RAS",
                "left-anterior-superior": "LAS", "las": "LAS",
                "left-posterior-superior": "LPS", "lps": "LPS",
                # Teem: the DICOM scanner frame equals LPS for a patient
                # lying as usual (head first, supine).
                "scanner-xyz": "LPS"}


@dataclasses.dataclass(frozen=True)
class Grid:
  """The voxel grid of a volume, from its header.

  Attributes:
    shape: ``(X, Y, Z)``; trailing and non-spatial axes of size 1 dropped.
    affine: ``[4, 4]`` voxel ``(i, j, k, 1)`` -> RAS mm.
    note: a caveat about the geometry to log when the data are read
      ("" when none).
  """

  shape: Tuple[int, int, int]
  affine: np.ndarray
  note: str = ""


def volume_format(path: str) -> str:
  """The reader of ``path`` by its (case-insensitive) extension."""
  name = path.lower()
  for ext, fmt in _EXTENSIONS:
    if name.endswith(ext):
      return fmt
  return OTHER


def read_grid(path: str) -> Grid:
  """The volume's grid from its header only (data are not read)."""
  fmt = volume_format(path)
  if fmt == NRRD:
    return _nrrd_grid(_nrrd_header(path), path)
  if fmt == METAIMAGE:
    return _meta_header(path).grid
  img = _nib_load(path, fmt)
  return Grid(volumes.squeeze_3d(img.shape, path), np.asarray(img.affine))


def read_volume(path: str) -> Tuple[np.ndarray, np.ndarray]:
  """``(data [X, Y, Z] float32, affine [4, 4] voxel -> RAS mm)``.

  Integer and float storage alike become float32 (NIfTI scaling applied).

  Raises:
    DataError: an unreadable header, truncated or corrupt voxel data, a
      geometry that cannot be placed in RAS, or more than one value per
      voxel.
  """
  fmt = volume_format(path)
  if fmt == NRRD:
    header = _nrrd_header(path)
    grid = _nrrd_grid(header, path)
    data = _data_or_error(path, lambda: _nrrd_data(header, path))
  elif fmt == METAIMAGE:
    meta = _meta_header(path)
    grid = meta.grid
    data = _meta_data(meta, path)
  else:
    img = _nib_load(path, fmt)
    grid = Grid(volumes.squeeze_3d(img.shape, path), np.asarray(img.affine))
    data = _data_or_error(path, lambda: img.get_fdata(dtype=np.float32))
  if grid.note:
    logging.warning("%s: %s", path, grid.note)
  return np.asarray(data, np.float32).reshape(grid.shape), grid.affine


def _data_or_error(path, read):
  try:
    return read()
  except Exception as e:  # readers raise many types for short/bad data.
    raise file_error(path, f"truncated or corrupt image data "
                     f"({describe(e)})") from None


def _check_affine(affine: np.ndarray, path: str) -> np.ndarray:
  linear = affine[:3, :3]
  if not np.isfinite(affine).all() or abs(np.linalg.det(linear)) < 1e-12:
    raise file_error(path, "the header's voxel geometry is degenerate "
                     f"(zero spacing, parallel or missing axes: "
                     f"{np.round(affine[:3], 4).tolist()}); fix the header")
  return affine


def _affine(linear: np.ndarray, origin: np.ndarray, space: str
            ) -> np.ndarray:
  """4x4 voxel -> RAS from ``[3, 3]`` axis vectors (columns) and origin."""
  out = np.eye(4)
  out[:3, :3] = _TO_RAS[space] @ linear
  out[:3, 3] = _TO_RAS[space] @ origin
  return out


# ------------------------------------------------------------------ NIfTI --


def _nib_load(path: str, fmt: str):
  try:
    return nib.load(path)
  except Exception as e:  # nibabel raises many types for broken files.
    if fmt == NIFTI:
      what = "not a readable NIfTI file"
    else:
      what = (f"not a readable volume file (nifti_folder reads "
              f"{', '.join(EXTENSIONS)} by extension, other names through "
              "nibabel)")
    raise file_error(path, f"{what} ({describe(e)})") from None


# ------------------------------------------------------------------- NRRD --


def _nrrd_header(path: str) -> Dict:
  try:
    header = nrrd.read_header(path)
  except Exception as e:  # pynrrd raises NRRDError, ValueError, ...
    raise file_error(path, f"not a readable NRRD header "
                     f"({describe(e)})") from None
  missing = [k for k in ("dimension", "type", "encoding", "sizes")
             if k not in header]
  if missing:
    raise file_error(path, f"NRRD header lacks the required field(s) "
                     f"{missing}")
  if header["type"].strip().lower() == "block":
    raise file_error(path, "NRRD type 'block' is not a numeric volume")
  datafile = header.get("data file", header.get("datafile"))
  if datafile is not None:
    if datafile.split()[0].upper() == "LIST" or "%" in datafile:
      raise file_error(path, f"the data are split over several files "
                       f"(data file: {datafile}); only one data file is "
                       "read: re-save the volume as one .nrrd")
    full = os.path.join(os.path.dirname(path), datafile)
    if not os.path.isfile(full):
      raise file_error(path, f"its data file {full} does not exist")
  return header


def _nrrd_spatial_axes(header: Dict, path: str) -> Tuple[list, list]:
  """``(spatial axis indices, their direction vectors or None)``."""
  sizes = [int(s) for s in header["sizes"]]
  dirs = header.get("space directions")
  if dirs is not None:
    rows = [None if r is None or not np.isfinite(np.asarray(r, float)).all()
            else np.asarray(r, float) for r in dirs]
    if len(rows) != len(sizes):
      raise file_error(path, f"'space directions' has {len(rows)} vectors "
                       f"for {len(sizes)} axes")
    spatial = [a for a, r in enumerate(rows) if r is not None]
    vectors = [rows[a] for a in spatial]
  else:
    kinds = header.get("kinds", ["domain"] * len(sizes))
    spatial = [a for a, k in enumerate(kinds)
               if k.lower() in ("domain", "space", "???", "none")]
    vectors = None
  for a in range(len(sizes)):
    if a not in spatial and sizes[a] > 1:
      kind = header.get("kinds", ["?"] * len(sizes))[a]
      raise file_error(path, f"{sizes[a]} values per voxel along axis {a} "
                       f"(kind {kind!r}); nifti_folder reads one value per "
                       "voxel: save one channel per file (3D Slicer "
                       "segmentations with overlapping segments: export a "
                       "label map)")
  return spatial, vectors


def _nrrd_grid(header: Dict, path: str) -> Grid:
  sizes = [int(s) for s in header["sizes"]]
  spatial, vectors = _nrrd_spatial_axes(header, path)
  shape = volumes.squeeze_3d([sizes[a] for a in spatial], path)
  note = ""
  space = header.get("space")
  if space is not None:
    frame = _NRRD_SPACES.get(space.strip().lower())
    if frame is None:
      raise file_error(path, f"NRRD space {space!r} is not a patient space "
                       f"nifti_folder can place in RAS (reads "
                       f"{sorted(k for k in _NRRD_SPACES if len(k) > 3)}"
                       " and their abbreviations)")
  if vectors is not None:
    if any(len(v) != 3 for v in vectors):
      listed = [v.tolist() for v in vectors]
      raise file_error(path, f"space directions {listed} are not 3D vectors")
    linear = np.stack(vectors[:3], axis=1)
    origin = np.asarray(header.get("space origin", np.zeros(3)), float)
    if origin.shape != (3,):
      raise file_error(path, f"space origin {origin.tolist()} is not a 3D "
                       "point")
    if space is None:
      frame = "RAS"
      note = ("NRRD header has no 'space': its orientation is unknown, read "
              "as RAS; check the orientation with --mode=inspect")
  else:
    frame = "RAS"
    spacings = np.asarray(header.get("spacings", [1.0] * len(sizes)), float)
    step = [spacings[a] if np.isfinite(spacings[a]) else 1.0
            for a in spatial[:3]]
    linear, origin = np.diag(step), np.zeros(3)
    note = ("NRRD header has no 'space directions': its orientation is "
            "unknown, read as RAS with spacings "
            f"{[float(s) for s in step]}; check the orientation with "
            "--mode=inspect")
  return Grid(shape, _check_affine(_affine(linear, origin, frame), path),
              note)


def _nrrd_data(header: Dict, path: str) -> np.ndarray:
  with open(path, "rb") as fh:
    nrrd.read_header(fh)  # leaves fh at the data of an attached header.
    # index_order F: data[i, j, k] is voxel (i, j, k), axis 0 fastest, as
    # 'sizes' and 'space directions' list the axes.
    return nrrd.read_data(header, fh, path, index_order="F")


# -------------------------------------------------------------- MetaImage --

_MET_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2",
              "MET_USHORT": "u2", "MET_INT": "i4", "MET_UINT": "u4",
              # MetaIO's LONG is 4 bytes on every platform.
              "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8",
              "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}
_MAX_HEADER_LINES = 1000


@dataclasses.dataclass(frozen=True)
class MetaHeader:
  """What a MetaImage header says about its voxel data.

  Attributes:
    grid: the voxel grid in RAS.
    dims: ``DimSize`` as written (x fastest).
    dtype: element type with byte order.
    data_file: the file holding the voxels (the ``.mha`` itself if LOCAL).
    offset: byte offset of the voxels in ``data_file``; -1: its last bytes.
    compressed: zlib/gzip-compressed voxels.
    compressed_size: bytes of compressed data (0: up to the end of file).
  """

  grid: Grid
  dims: Tuple[int, ...]
  dtype: np.dtype
  data_file: str
  offset: int
  compressed: bool
  compressed_size: int


def _meta_fields(path: str) -> Tuple[Dict[str, str], int]:
  """``(lower-case key -> value, byte offset after the header)``."""
  fields: Dict[str, str] = {}
  try:
    with open(path, "rb") as f:
      for number in range(1, _MAX_HEADER_LINES + 1):
        raw = f.readline(1 << 16)
        if not raw:
          break
        line = raw.decode("latin-1").strip()
        if not line:
          continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or not key.strip().isprintable():
          raise file_error(path, f"not a MetaImage header: line {number} is "
                           f"not 'Key = Value' ({line[:40]!r})")
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
          return fields, f.tell()
  except OSError as e:
    raise file_error(path, f"cannot read the file ({describe(e)})") from None
  raise file_error(path, "MetaImage header has no ElementDataFile line "
                   "(truncated or not a MetaImage file)")


def _numbers(fields, keys, n, path, default=None, kind=float):
  """The ``n`` numbers of the first of ``keys`` present, else ``default``."""
  for key in keys:
    if key.lower() in fields:
      words = fields[key.lower()].split()
      try:
        values = [kind(w) for w in words]
      except ValueError:
        values = []
      if len(values) != n:
        raise file_error(path, f"MetaImage {key} = {fields[key.lower()]!r} "
                         f"must be {n} numbers")
      return values
  if default is None:
    raise file_error(path, f"MetaImage header lacks {keys[0]}")
  return default


def _flag(fields, keys, default=False) -> bool:
  for key in keys:
    if key.lower() in fields:
      return fields[key.lower()][:1] in ("T", "t", "1", "Y", "y")
  return default


def _meta_header(path: str) -> MetaHeader:
  fields, header_end = _meta_fields(path)
  kind = fields.get("objecttype", "Image")
  if kind.lower() != "image":
    raise file_error(path, f"MetaImage ObjectType = {kind}, not Image")
  (ndims,) = _numbers(fields, ["NDims"], 1, path, kind=int)
  if not 1 <= ndims <= 10:
    raise file_error(path, f"MetaImage NDims = {ndims} is not 1..10")
  dims = tuple(_numbers(fields, ["DimSize"], ndims, path, kind=int))
  if min(dims) < 1:
    raise file_error(path, f"MetaImage DimSize = {dims} has empty axes")
  type_name = fields.get("elementtype", "").upper()
  if type_name not in _MET_TYPES:
    raise file_error(path, f"MetaImage ElementType = "
                     f"{fields.get('elementtype')!r} is not one of "
                     f"{sorted(_MET_TYPES)}")
  (channels,) = _numbers(fields, ["ElementNumberOfChannels"], 1, path, [1],
                         kind=int)
  if channels != 1:
    raise file_error(path, f"{channels} channels per voxel "
                     "(ElementNumberOfChannels); nifti_folder reads one "
                     "value per voxel: save one channel per file")
  if not _flag(fields, ["BinaryData"], default=True):
    raise file_error(path, "ASCII voxel data (BinaryData = False) are not "
                     "read; re-save the image as binary .mha")
  big = _flag(fields, ["ElementByteOrderMSB", "BinaryDataByteOrderMSB"])
  dtype = np.dtype(_MET_TYPES[type_name]).newbyteorder(">" if big else "<")
  grid = _meta_grid(fields, ndims, dims, path)
  (header_size,) = _numbers(fields, ["HeaderSize"], 1, path, [0], kind=int)
  compressed = _flag(fields, ["CompressedData"])
  (compressed_size,) = _numbers(fields, ["CompressedDataSize"], 1, path, [0],
                                kind=int)
  name = fields["elementdatafile"]
  if name.lower() == "local":
    data_file, offset = path, header_end
  elif name.split()[0].upper() == "LIST" or "%" in name:
    raise file_error(path, f"ElementDataFile = {name} splits the voxels over "
                     "several files; only one data file is read: re-save "
                     "the image as one .mha")
  else:
    data_file, offset = os.path.join(os.path.dirname(path), name), 0
    if not os.path.isfile(data_file):
      raise file_error(path, f"its ElementDataFile {data_file} does not "
                       "exist")
  if header_size > 0 or header_size == -1:  # MetaIO: from the file start.
    offset = header_size
  if compressed and offset == -1:
    raise file_error(path, "HeaderSize = -1 with CompressedData: the start "
                     "of the compressed voxels is unknown")
  return MetaHeader(grid, dims, dtype, data_file, offset, compressed,
                    compressed_size)


def _meta_grid(fields, ndims, dims, path) -> Grid:
  shape = volumes.squeeze_3d(dims, path)
  spacing = _numbers(fields, ["ElementSpacing", "ElementSize"], ndims, path,
                     [1.0] * ndims)
  origin = _numbers(fields, ["Offset", "Position", "Origin"], ndims, path,
                    [0.0] * ndims)
  matrix = _numbers(fields, ["TransformMatrix", "Rotation", "Orientation"],
                    ndims * ndims, path, list(np.eye(ndims).ravel()))
  # Row i of the file's N x N block is the direction of voxel axis i, so the
  # ITK direction matrix (axis directions as columns) is its transpose.
  direction = np.asarray(matrix, float).reshape(ndims, ndims).T[:3, :3]
  linear = direction * np.asarray(spacing[:3], float)[None, :]
  affine = _affine(linear, np.asarray(origin[:3], float), "LPS")
  return Grid(shape, _check_affine(affine, path))


def _meta_data(meta: MetaHeader, path: str) -> np.ndarray:
  nbytes = int(np.prod(meta.dims)) * meta.dtype.itemsize
  where = "" if meta.data_file == path else f" (data file {meta.data_file})"
  try:
    with open(meta.data_file, "rb") as f:
      if meta.offset == -1:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - nbytes, 0))
      else:
        f.seek(meta.offset)
      if meta.compressed:
        packed = f.read(meta.compressed_size or -1)
        # MetaIO inflates with window bits 47: zlib or gzip headers.
        inflater = zlib.decompressobj(47)
        raw = inflater.decompress(packed, nbytes)
        if len(raw) < nbytes and not inflater.eof:
          raise file_error(path, f"truncated compressed voxel data{where}: "
                           f"{len(raw)} of {nbytes} bytes")
      else:
        raw = f.read(nbytes)
  except zlib.error as e:
    raise file_error(path, f"corrupt compressed voxel data{where} "
                     f"(zlib: {e})") from None
  except OSError as e:
    raise file_error(path, f"cannot read the voxel data{where} "
                     f"({describe(e)})") from None
  if len(raw) != nbytes:
    raise file_error(path, f"truncated voxel data{where}: {len(raw)} of the "
                     f"{nbytes} bytes DimSize x ElementType need")
  # x fastest: Fortran order over DimSize.
  return np.frombuffer(raw, meta.dtype).reshape(meta.dims, order="F")
