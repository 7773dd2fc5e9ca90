"""Writing small DICOM files in tests."""

import os

from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian


def save(ds, sop_class: str, path: str) -> str:
  """Writes ``ds`` as a Part 10 file of ``sop_class`` (folders made)."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return path
