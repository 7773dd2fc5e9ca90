"""2D DICOM images: radiographs, mammograms, ultrasound, single slices.

The ``image_folder`` builder reads DICOM files beside PNG/JPEG/TIFF through
this module. What a viewer shows is reproduced in order:

1. the modality LUT (RescaleSlope/Intercept, or a Modality LUT Sequence):
   CT in Hounsfield units;
2. the VOI transform (``window``): ``header`` applies the file's VOI LUT
   Sequence or its first WindowCenter/WindowWidth (LINEAR, LINEAR_EXACT or
   SIGMOID VOILUTFunction) and maps the displayed range to [0, 1]; a
   ``(center, width)`` pair applies that window; ``none`` keeps modality
   units; ``auto`` is ``none`` for CT (windows then belong to the input
   pipeline, as for volumes) and ``header`` otherwise;
3. MONOCHROME1 (brighter = lower value, common in CR/DX and mammography)
   is inverted, so bone is bright in every image;
4. colour images (ultrasound RGB/YBR, palette colour) become RGB.

A multi-frame 2D file (an ultrasound or angiography cine loop) is refused,
split into one image per frame, or reduced to its middle frame
(``frames``); an enhanced CT/MR volume is refused with a pointer to the
``dicom_folder`` builder. Pixel spacing (PixelSpacing, ImagerPixelSpacing,
or an ultrasound region's physical deltas) keeps the aspect ratio when the
image is padded to a square.
"""

import dataclasses
import os
from typing import Any, List, Sequence, Tuple, Union

import numpy as np
import pydicom
from pydicom import pixels as dicom_pixels
from pydicom.errors import InvalidDicomError

from medgen_jax.data import builder_lib
from medgen_jax.data.builder_lib import DataError, file_error

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
WINDOW_MODES = ("auto", "header", "none")
FRAME_MODES = ("refuse", "split", "middle")
# Modalities whose pixel values are physical units worth keeping.
QUANTITATIVE = ("CT",)
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
          "PALETTE COLOR")

Window = Union[str, Tuple[float, float]]


def parse_window(window: Any) -> Window:
  """A mode of :data:`WINDOW_MODES`, or ``(center, width)`` from a pair or
  a ``"center/width"`` text (``"40/400"``: command lines pass text).

  Raises:
    ValueError: anything else, or a width that is not positive.
  """
  if isinstance(window, str) and window in WINDOW_MODES:
    return window
  try:
    parts = window.split("/") if isinstance(window, str) else list(window)
    center, width = (float(v) for v in parts)
  except (TypeError, ValueError):
    raise ValueError(f"data.dicom_window={window!r} must be one of "
                     f"{WINDOW_MODES}, (center, width) or 'center/width' "
                     "(e.g. '40/400')") from None
  if width <= 0:
    raise ValueError(f"data.dicom_window={window!r}: the width must be "
                     "positive")
  return center, width


def window_problems(window: Any) -> List[str]:
  """``data.dicom_window`` problems, as messages."""
  try:
    parse_window(window)
  except ValueError as e:
    return [str(e)]
  return []


def is_dicom(path: str) -> bool:
  """A DICOM extension, or an extensionless file with the ``DICM`` preamble
  (PACS exports often name files ``IM0001``); DICOMDIR is not an image."""
  name = os.path.basename(path)
  if name.upper() == "DICOMDIR":
    return False
  if name.lower().endswith(DICOM_SUFFIXES):
    return True
  if "." in name:
    return False
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b"DICM"


def read_header(path: str) -> pydicom.Dataset:
  try:
    return pydicom.dcmread(path, stop_before_pixels=True)
  except InvalidDicomError as e:
    raise file_error(path, f"not a valid DICOM file ({e})") from None
  except Exception as e:  # truncated headers raise many types.
    raise file_error(path, f"corrupt or truncated DICOM header "
                     f"({builder_lib.describe(e)})") from None


def num_frames(ds: pydicom.Dataset) -> int:
  return int(ds.get("NumberOfFrames", 1) or 1)


def frames_of(ds: pydicom.Dataset, path: str, mode: str) -> List[int]:
  """The frames (0-based) of a file that become images.

  Raises:
    DataError: an enhanced CT/MR volume, or a cine loop with
      ``mode="refuse"``.
  """
  n = num_frames(ds)
  if n == 1:
    return [0]
  if ds.get("PerFrameFunctionalGroupsSequence") and ds.get(
      "Modality") in ("CT", "MR", "PT"):
    raise file_error(path, (
        f"an enhanced multi-frame {ds.Modality} volume ({n} frames): read "
        "volumes with the dicom_folder builder"))
  if mode == "split":
    return list(range(n))
  if mode == "middle":
    return [n // 2]
  raise file_error(path, (
      f"{n} frames (a cine loop); set data.dicom_frames='split' (one image "
      "per frame) or 'middle' (its middle frame)"))


def subject_of(ds: pydicom.Dataset, tag: str, fallback: str) -> str:
  """The patient an image belongs to (``tag``), else ``fallback``."""
  value = ds.get(tag) if tag else None
  return str(value) if value not in (None, "") else fallback


def pixel_spacing(ds: pydicom.Dataset) -> Tuple[float, float]:
  """``(row, column)`` spacing in mm, or its ratio; ``(1, 1)`` if none."""
  for name in ("PixelSpacing", "ImagerPixelSpacing"):
    value = ds.get(name)
    if value and len(value) == 2 and min(float(v) for v in value) > 0:
      return float(value[0]), float(value[1])
  for region in ds.get("SequenceOfUltrasoundRegions") or []:
    dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
    if dx and dy and float(dx) > 0 and float(dy) > 0:
      return abs(float(dy)), abs(float(dx))
  return 1.0, 1.0


def _stored_range(ds: pydicom.Dataset) -> Tuple[float, float]:
  bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
  if int(ds.get("PixelRepresentation", 0) or 0):
    return -2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
  return 0.0, 2.0 ** bits - 1


def resolve_window(ds: pydicom.Dataset, window: Window) -> Window:
  """``auto`` made concrete for this file (and text windows parsed)."""
  window = parse_window(window)
  if window != "auto":
    return window
  return "none" if str(ds.get("Modality", "")).upper() in QUANTITATIVE \
      else "header"


def has_voi(ds: pydicom.Dataset) -> bool:
  return bool(ds.get("VOILUTSequence")) or (
      ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None)


def units(ds: pydicom.Dataset, window: Window) -> str:
  """What the values of an image read with ``window`` mean: images of one
  data set must agree."""
  if str(ds.get("PhotometricInterpretation", "")).upper() in _COLOR:
    return "DICOM colour (8-bit RGB)"
  w = resolve_window(ds, window)
  if w == "none" or (w == "header" and not has_voi(ds)):
    return ("DICOM modality units" +
            (f" ({ds.Modality})" if ds.get("Modality") else ""))
  return "DICOM display values (VOI window -> [0, 1])"


def _first(value: Any) -> float:
  if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
    value = value[0]
  return float(value)


def apply_window(x: np.ndarray, center: float, width: float,
                 function: str = "LINEAR") -> np.ndarray:
  """The DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]."""
  function = function.upper()
  if function == "SIGMOID":
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
  if function == "LINEAR_EXACT":
    return np.clip((x - center) / width + 0.5, 0.0, 1.0)
  if width <= 1:  # LINEAR needs width >= 1; a degenerate window thresholds.
    return (x > center - 0.5).astype(np.float32)
  return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _voi(x: np.ndarray, ds: pydicom.Dataset, path: str) -> np.ndarray:
  """The header's VOI transform to [0, 1] (``x`` unchanged without one)."""
  if ds.get("VOILUTSequence"):
    lut = ds.VOILUTSequence[0]
    try:
      bits = int(lut.LUTDescriptor[2])
      # LUTs are indexed by integers (modality values are integral).
      y = dicom_pixels.apply_voi(np.rint(x).astype(np.int64), ds, 0)
    except Exception as e:  # malformed LUTs raise many types.
      raise file_error(path, f"unusable VOI LUT Sequence "
                       f"({builder_lib.describe(e)}); set data.dicom_window="
                       "'none' or (center, width)") from None
    return np.asarray(y, np.float32) / float(2 ** bits - 1)
  if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
    return x
  try:
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
  except (TypeError, ValueError, IndexError):
    raise file_error(path, f"unreadable WindowCenter/WindowWidth "
                     f"{ds.WindowCenter!r}/{ds.WindowWidth!r}; set "
                     "data.dicom_window") from None
  if width <= 0:
    raise file_error(path, f"WindowWidth {width} must be positive; set "
                     "data.dicom_window")
  return apply_window(x, center, width,
                      str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR"))


@dataclasses.dataclass(frozen=True)
class Image2D:
  """One 2D image as read.

  Attributes:
    pixels: ``[H, W]`` float32 (grayscale) or ``[H, W, 3]`` (RGB).
    spacing: ``(row, column)`` mm (or their ratio).
  """

  pixels: np.ndarray
  spacing: Tuple[float, float]


def read_pixels(path: str) -> Tuple[pydicom.Dataset, np.ndarray]:
  """The full dataset and its pixel array (errors name the file)."""
  try:
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array
  except Exception as e:  # truncated pixel data, missing codecs, ...
    raise file_error(path, f"cannot read pixel data, file corrupt or "
                     f"truncated ({builder_lib.describe(e)})") from None


def read_image(path: str, frame: int, window: Window) -> Image2D:
  """Frame ``frame`` of a DICOM file as displayed (see the module doc)."""
  ds, arr = read_pixels(path)
  n = num_frames(ds)
  photometric = str(ds.get("PhotometricInterpretation", "")).upper()
  color = photometric in _COLOR
  if n > 1:
    arr = arr[frame]
  if photometric == "PALETTE COLOR":
    arr = dicom_pixels.apply_color_lut(arr, ds)
    # 16-bit palette entries: back to 8 bits like every other colour image.
    if arr.dtype == np.uint16:
      arr = (arr >> 8).astype(np.uint8)
  expected = (int(ds.Rows), int(ds.Columns)) + ((3,) if color else ())
  if arr.shape != expected:
    raise file_error(path, f"pixel array {arr.shape} does not match Rows x "
                     f"Columns {expected}")
  if color:
    return Image2D(arr.astype(np.float32), pixel_spacing(ds))
  x = np.asarray(dicom_pixels.apply_modality_lut(arr, ds), np.float32)
  w = resolve_window(ds, window)
  windowed = False
  if isinstance(w, (tuple, list)):
    x, windowed = apply_window(x, float(w[0]), float(w[1])), True
  elif w == "header" and has_voi(ds):
    x, windowed = _voi(x, ds, path), True
  if photometric == "MONOCHROME1":
    if windowed:
      x = 1.0 - x
    else:  # mirror within the stored range, in modality units.
      lo, hi = _stored_range(ds)
      ends = np.asarray(dicom_pixels.apply_modality_lut(
          np.asarray([lo, hi]), ds), np.float32)
      x = float(ends.min() + ends.max()) - x
  return Image2D(np.asarray(x, np.float32), pixel_spacing(ds))


def read_mask(path: str, frame: int) -> np.ndarray:
  """A label map stored as DICOM: raw values ``[H, W]`` of ``frame``."""
  ds, arr = read_pixels(path)
  if num_frames(ds) > 1:
    if frame >= num_frames(ds):
      raise file_error(path, f"mask has {num_frames(ds)} frames; image frame "
                       f"{frame + 1} has none")
    arr = arr[frame]
  if arr.ndim != 2:
    raise file_error(path, f"mask has shape {arr.shape}; a label map is a "
                     "single-channel image")
  return arr


def check_units(found: Sequence[Tuple[str, str]]) -> str:
  """The one value meaning of ``[(path, units)]``; mixing is an error."""
  path0, first = found[0]
  for path, u in found[1:]:
    if u != first:
      raise DataError(f"{path}: {u} among {first} (e.g. {path0}); set "
                      "data.dicom_window to one mode (e.g. 'header' for "
                      "display values or (center, width)) so all images "
                      "share one scale")
  return first
