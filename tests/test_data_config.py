"""Dataset-aware validation of the ``data`` section (no data is built)."""

import pytest

from configs import common, ddpm
from medgen_jax import config_check


def _errors(config):
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(config)
  return str(e.value)


def test_phantom_section_typos_and_contrasts():
  c = ddpm.get_config("runlocal")
  c.data.num_subject = 3
  c.data.contrasts = ("t2",)
  msg = _errors(c)
  assert "data.num_subject is not a key of data.dataset='brain_phantom'" in msg
  assert "data.contrasts ['t2'] are not features" in msg
  c = ddpm.get_config("runlocal")
  del c.data["snr"]
  assert "data.snr is missing (required by data.dataset='brain_phantom')" in (
      _errors(c))


def test_missing_generic_keys_are_named():
  c = ddpm.get_config("runlocal")
  del c.data["cond"]
  del c.data["batch_size"]
  assert "config.data is missing keys ['batch_size', 'cond']" in _errors(c)


def test_windows_and_per_contrast_normalisation_are_checked():
  c = ddpm.get_config("runlocal")
  c.data = common.dicom_data_config(root="/ct", contrasts=("ct:bone", "ct"),
                                    label_source="mask", res=16,
                                    batch_size=8)
  config_check.validate(c)
  c.data.windows = {"ct": "soft"}
  c.data.contrast_normalization = {"ct:bone": "robust"}
  msg = _errors(c)
  assert "data.windows.ct: unknown CT window 'soft'" in msg
  assert "data.contrast_normalization.ct:bone='robust'" in msg


def test_every_helper_gives_a_valid_section():
  # Labelled sections: the DDPM config's in-domain FID encoder needs classes.
  for data in (
      common.nifti_data_config(root="/x", modalities={"t1": "{subject}.nii"},
                               mask="{subject}_seg.nii", res=16,
                               batch_size=8),
      common.dicom_data_config(root="/x", labels_csv="y.csv",
                               class_names=("a", "b"), res=16, batch_size=8),
      common.medmnist_data_config(flag="octmnist", size=64, res=16,
                                  batch_size=8),
      common.image_folder_data_config(root="/x", class_names=("a", "b"),
                                      res=16, batch_size=8)):
    c = ddpm.get_config("runlocal")
    c.data = data
    config_check.validate(c)
  with pytest.raises(ValueError, match=r"unknown data key\(s\) \['slice'\]"):
    common.nifti_data_config(root="/x", modalities={}, slice="axial")
