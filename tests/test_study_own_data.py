"""The study on a user's NIfTI folder: tasks follow from what the data has."""

import json
import os

import nibabel as nib
import numpy as np

from configs import common
from configs import study as study_config
from medgen_jax import commands
from medgen_jax import config_check


def _write_subjects(root: str, n: int = 8) -> None:
  """``sub-i/{t1,t2,seg}.nii.gz``: a head-like block whose t2 is brighter
  inside, with a bright lesion (seg = 1) in some slices."""
  rng = np.random.default_rng(0)
  for i in range(n):
    t1 = np.zeros((16, 16, 8), np.float32)
    t1[3:13, 2:14, :] = 80 + rng.normal(0, 4, (10, 12, 8))
    seg = np.zeros(t1.shape, np.uint8)
    seg[6:9, 5:8, 2:5] = 1
    t2 = 1.5 * t1
    t2[seg > 0] += 90  # the lesion shows in t2
    for name, arr in (("t1", t1), ("t2", t2), ("seg", seg)):
      os.makedirs(f"{root}/sub-{i}", exist_ok=True)
      nib.save(nib.Nifti1Image(arr, np.eye(4)), f"{root}/sub-{i}/{name}.nii.gz")


def test_mini_study_on_a_nifti_folder(tmp_path):
  root = str(tmp_path / "nifti")
  _write_subjects(root)
  # The strict protocol: one generator per fraction, trained on exactly
  # that fraction's subjects.
  c = study_config.get_config("runlocal,fractions=0.5+1,seeds=1,tasks=all,"
                              "generators=ddpm,generator_data=per_fraction")
  c.data = common.nifti_data_config(
      root=root, modalities={"t1": "{subject}/t1.nii.gz",
                             "t2": "{subject}/t2.nii.gz"},
      mask="{subject}/seg.nii.gz", res=16, batch_size=8,
      data_dir=str(tmp_path / "data"), min_foreground=0.0,
      split_fractions=(0.5, 0.25, 0.25))
  c.study.arms = ("real", "real+classical", "real+synthetic")
  c.study.classical_strengths = ()
  config_check.validate(c)
  workdir = str(tmp_path / "study")
  commands.run("study", c, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    resolved = json.load(f)
  tasks = resolved["study"]["tasks"]
  # No phantom names: inputs, targets and masks come from this data set.
  assert tasks["classification"]["inputs"] == ["t1", "t2"]
  assert tasks["segmentation"]["target"] == "mask"
  assert (tasks["translation"]["inputs"], tasks["translation"]["target"]) == (
      ["t1"], "t2")
  assert resolved["generators"]["ddpm"]["data"]["mask_channels"] == ["mask"]
  for fraction in (0.5, 1):
    with open(os.path.join(workdir, "generators", f"ddpm_f{fraction:g}",
                           "config.json")) as f:
      gen_data = json.load(f)["data"]
    assert gen_data["subject_fraction"] == fraction
    with open(os.path.join(workdir, "synthetic", f"ddpm_f{fraction:g}",
                           "provenance.json")) as f:
      assert json.load(f)["generator_workdir"].endswith(
          os.path.join("generators", f"ddpm_f{fraction:g}"))
  with open(os.path.join(workdir, "results.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert {(r["task"], r["fraction"], r["arm"]) for r in rows} == {
      (t, f, a) for t in ("classification", "segmentation", "translation")
      for f in (0.5, 1.0) for a in ("real", "real+classical", "real+ddpm")}
  # Each fraction's synthetic arm was fed by that fraction's generator.
  for r in rows:
    if r["arm"] == "real+ddpm":
      assert r["generator"] == f"ddpm_f{r['fraction']:g}", r
  for r in rows:
    assert np.isfinite(r["metrics"][r["primary"]]["mean"]), r
  md = open(os.path.join(workdir, "report.md")).read()
  assert "### segmentation: dice" in md and "| ddpm (diffusion) |" in md
