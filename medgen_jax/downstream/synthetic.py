"""Synthetic data sets: sample a trained generator, export with provenance.

A generator trained with ``data.mask_channels`` produces images whose last
channels are masks; :func:`generate` splits them off, so every synthetic
example has contrasts, masks and (for conditional generators) the label it
was sampled for. :func:`export` writes a directory that is at the same time
a reproducible record and a TFDS data set (``data.dataset="synthetic"``)::

  samples.npz        image [N, *spatial, C] in [-1, 1], label [N], masks
  provenance.json    generator config, checkpoint step, seed, sampler,
                     normalisation, metrics, time
  grid.png           the first examples, masks overlaid
  nifti/             optional: one NIfTI per sample (+ _mask)
"""

import json
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np

from medgen_jax import sampling
from medgen_jax import viz
from medgen_jax.data.builders import synthetic as synthetic_builder
from medgen_jax.train import trainer

Arrays = Dict[str, np.ndarray]


def generate(gen_config: ml_collections.ConfigDict, gen_workdir: str,
             per_class: int, seed: int,
             batch_size: Optional[int] = None) -> Dict[str, Any]:
  """Samples ``per_class`` examples of every class from the latest checkpoint.

  Args:
    gen_config: the generator's config (``data.cond == "label"`` for a
      class-conditional generator; otherwise ``per_class * num_classes``
      unlabelled samples get the label implied by their mask, when any).
    gen_workdir: its training workdir.
    per_class: samples per class.
    seed: sampling seed.
    batch_size: sampling batch (default ``gen_config.sample.batch_size``).

  Returns:
    ``{"arrays": {image, label, <masks>}, "step": checkpoint step,
    "meta": checkpoint meta, "seconds": sampling time}``.
  """
  exp, step, state, meta = trainer.load_for_sampling(gen_config, gen_workdir)
  num_classes = int(gen_config.data.num_classes)
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  cond = {"label": labels} if sampling.conditional(gen_config.data) else None
  t0 = time.time()
  if sampling.needs(exp.method, "mask"):
    # Masks of the generator's own training data: each synthetic image is
    # drawn for a real mask and carries it.
    cond = dict(cond or {}, mask=sampling.masks_for(
        exp.data.batcher.arrays["image"], gen_config.data, len(labels),
        seed))
  arrays: Arrays = sampling.draw(
      exp.method, state, gen_config.data, len(labels), jax.random.key(seed),
      int(batch_size or gen_config.sample.batch_size), cond,
      desc="synthesise")
  mask_keys = tuple(gen_config.data.get("mask_channels", ()))
  if "label" not in arrays:
    arrays["label"] = (mask_label(arrays[mask_keys[0]]) if mask_keys
                       else np.zeros(len(labels), np.int32))
  return {"arrays": arrays, "step": int(step), "meta": meta,
          "seconds": time.time() - t0}


def mask_label(mask: np.ndarray, min_voxels: int = 2) -> np.ndarray:
  """Label implied by a mask: 1 when at least ``min_voxels`` are foreground
  (the brain_phantom rule for "lesion visible")."""
  axes = tuple(range(1, mask.ndim))
  return (np.sum(mask > 0, axis=axes) >= min_voxels).astype(np.int32)


def export(directory: str, arrays: Arrays, provenance: Dict[str, Any],
           spatial_dims: int = 2, nifti: bool = False) -> str:
  """Writes an export directory atomically (temp dir, then rename).

  Args:
    directory: target; replaced if it exists.
    arrays: ``image [N, *spatial, C]``, ``label [N]`` and masks.
    provenance: must hold ``contrasts``, ``num_classes`` and ``mask_keys``;
      everything else (generator config, checkpoint step, seed, metrics) is
      recorded as given.
    spatial_dims: 2 or 3 (for the grid and NIfTI files).
    nifti: also write ``nifti/sample_XXXXX.nii.gz`` (+ ``_<mask>.nii.gz``).

  Returns:
    ``directory``.
  """
  for key in ("contrasts", "num_classes", "mask_keys"):
    if key not in provenance:
      raise ValueError(f"provenance lacks {key!r}")
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".incomplete_", dir=parent)
  try:
    np.savez_compressed(os.path.join(tmp, synthetic_builder.SAMPLES), **arrays)
    record = dict(provenance, num_examples=int(len(arrays["image"])),
                  class_counts=np.bincount(
                      arrays["label"],
                      minlength=int(provenance["num_classes"])).tolist(),
                  written=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(os.path.join(tmp, synthetic_builder.PROVENANCE), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True, default=str)
    mask_keys = provenance["mask_keys"]
    masks = arrays[mask_keys[0]][:32] if mask_keys else None
    viz.save_png(viz.image_grid(arrays["image"][:32, ..., :1], spatial_dims,
                                masks=masks), os.path.join(tmp, "grid.png"))
    if nifti:
      _write_nifti(os.path.join(tmp, "nifti"), arrays, mask_keys)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _write_nifti(directory: str, arrays: Arrays, mask_keys) -> None:
  """One NIfTI per sample: contrasts as the 4th axis; 2D as one-slice 3D."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  os.makedirs(directory)
  image = arrays["image"]
  if image.ndim == 4:  # [N, H, W, C] -> [N, H, W, 1, C]
    image = image[..., None, :]
  for i in range(len(image)):
    nib.save(nib.Nifti1Image(image[i].astype(np.float32), np.eye(4)),
             os.path.join(directory, f"sample_{i:05d}.nii.gz"))
    for k in mask_keys:
      m = arrays[k][i]
      m = m[..., None] if m.ndim == 2 else m
      nib.save(nib.Nifti1Image(m.astype(np.uint8), np.eye(4)),
               os.path.join(directory, f"sample_{i:05d}_{k}.nii.gz"))
