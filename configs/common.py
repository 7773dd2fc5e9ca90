"""Shared pieces of every experiment config.

``get_config(arg)`` functions take a ``"key=value,flag"`` string, e.g.
``"res=64,contrast=t1w,runlocal"``. :func:`parse_arg` turns it into a dict and
rejects keys the config does not know, so a typo fails before any compilation.
"""

import os
from typing import Any, Dict, Mapping

import ml_collections

CONTRASTS = ("t1w", "t2w", "pd", "flair")


def _convert(value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", ""):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean, got {value!r}")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def parse_arg(arg: str, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"k1=v1,k2,k3=v3"`` against ``defaults``.

  A bare key is a boolean switch set to True. Values take the type of their
  default. Unknown keys and unconvertible values raise ``ValueError`` naming
  the key and the allowed keys.
  """
  out: Dict[str, Any] = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"unknown config arg {key!r} in {arg!r}; known: {sorted(defaults)}")
    try:
      out[key] = _convert(value.strip(), defaults[key]) if "=" in item else True
    except ValueError as e:
      raise ValueError(f"config arg {key!r}: {e}") from None
  return ml_collections.ConfigDict(out)


def default_data_dir() -> str:
  """Where built data sets are cached (``$MEDGEN_DATA_DIR`` overrides)."""
  return os.environ.get(
      "MEDGEN_DATA_DIR",
      os.path.join(os.path.expanduser("~"), ".cache", "medgen_jax", "data"))


def data_config(*, res: int, contrasts=("t2w",), batch_size: int = 32,
                spatial_dims: int = 2, num_subjects: int = 40,
                snr: float = 30.0, seed: int = 0,
                cond: str = "") -> ml_collections.ConfigDict:
  """The ``data`` section for the built-in ``brain_phantom`` data set.

  Args:
    res: in-plane resolution of slices (2D) or cube side of volumes (3D).
    contrasts: which contrasts form the image channels, in order.
    batch_size: global batch size (split over all devices).
    spatial_dims: 2 for axial slices, 3 for volumes.
    num_subjects: virtual subjects simulated (split 70/15/15 by subject).
    snr: Rician-noise SNR of the simulated scans.
    seed: phantom seed (the data set is deterministic given it).
    cond: "" or "label" - which batch key is passed as conditioning.
  """
  return ml_collections.ConfigDict(dict(
      dataset="brain_phantom",
      data_dir=default_data_dir(),
      spatial_dims=spatial_dims,
      res=res,
      num_subjects=num_subjects,
      snr=snr,
      phantom_seed=seed,
      contrasts=tuple(contrasts),
      # Per-contrast intensity normalisation: "minmax" maps [p_low, p_high]
      # percentiles of the training split to [-1, 1]; "zscore" uses its mean
      # and std; "none" keeps physical signal units.
      normalization="minmax",
      clip_percentiles=(0.5, 99.5),
      batch_size=batch_size,
      shuffle_seed=0,
      num_classes=2,            # lesion absent / present
      train_split="train",
      eval_split="val",
      cond=cond,
  ))


def base_config() -> ml_collections.ConfigDict:
  """Sections common to every generative-method config."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-4, schedule="constant", warmup_steps=100,
      final_lr_frac=0.0, weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=10_000,
      log_every=50,
      ckpt_every=500,
      keep_ckpts=3,
      sample_every=2_000,
      num_grid_samples=16,
      ema=0.999,
      ema_warmup=100,
      # Devices on the data axis (-1: all) and on the parameter-sharding axis.
      mesh_data=-1,
      mesh_fsdp=1,
      # Parameters larger than this many elements are sharded over "fsdp".
      fsdp_min_size=2**18,
      distributed=False,
  ))
  return c


def augment_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The ``augment`` section: classical on-device augmentation.

  Read by :func:`medgen_jax.data.augment.make_augment_fn`. Every transform
  has its own probability, drawn independently per example. Symmetric ranges
  take a number ``s`` (meaning ``[-s, s]``) or a pair ``(lo, hi)``; ``scale``,
  ``contrast`` and ``noise_std`` take pairs. Defaults are a strong
  TorchIO/MONAI/nnU-Net-like baseline for 2D/3D brain MRI at 32-64 px; scale
  the pixel-valued ``elastic_magnitude_px`` with the resolution.

  Spatial (one resampling of image and masks per example):
    flip_prob: per listed axis, probability of mirroring it.
    flip_axes: spatial axes that may flip (negative counts from the last).
      The default -1 is the patient left-right axis (columns) of the
      phantom's display layout; anatomy is not up-down symmetric.
    affine_prob: probability of a random affine about the image centre.
    rotate_deg: rotation in degrees (in-plane in 2D, about each axis in 3D);
      positive is counter-clockwise as displayed (rows down, columns right).
    scale: per-axis zoom factors (> 1 enlarges the anatomy).
    isotropic_scale: one zoom factor for all axes.
    translate_frac: shift as a fraction of each axis' size.
    shear: off-diagonal shear coefficients.
    elastic_prob: probability of a smooth random elastic deformation.
    elastic_grid: control points per axis (cubic interpolation between).
    elastic_magnitude_px: maximum control-point displacement in pixels.

  Intensity (image only, after the spatial transform, in this order):
    gamma_prob, log_gamma: x01 ** exp(U(log_gamma)) on the per-example,
      per-channel [0, 1]-rescaled intensities (range preserved).
    bias_prob, bias_order, bias_strength: multiplicative field
      exp(polynomial of total degree <= bias_order), coefficients in
      U(-bias_strength, bias_strength), log-mean removed; it scales the
      signal above the background.
    contrast_prob, contrast: (x - mean) * c + mean per channel.
    brightness_prob, brightness: additive shift in normalised units (the
      [-1, 1] range is 2 wide).
    noise_prob, noise_std, noise_type: noise with std ~ U(noise_std),
      "gaussian" or "rician" (magnitude noise on the signal above background).
    clip: "input" clips the result to each example's per-channel input
      range (background stays the minimum); "none" leaves it unclipped.

  Args:
    **overrides: field values replacing the defaults; unknown names raise
      ``ValueError``.
  """
  defaults = dict(
      enabled=True,
      flip_prob=0.5,
      flip_axes=(-1,),
      affine_prob=0.5,
      rotate_deg=10.0,
      scale=(0.9, 1.1),
      isotropic_scale=False,
      translate_frac=0.05,
      shear=0.05,
      elastic_prob=0.25,
      elastic_grid=5,
      elastic_magnitude_px=2.0,
      gamma_prob=0.3,
      log_gamma=0.3,
      bias_prob=0.3,
      bias_order=3,
      bias_strength=0.3,
      contrast_prob=0.2,
      contrast=(0.75, 1.25),
      brightness_prob=0.2,
      brightness=0.1,
      noise_prob=0.2,
      noise_std=(0.0, 0.05),
      noise_type="gaussian",
      clip="input",
  )
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(
        f"unknown augment field(s) {unknown}; known: {sorted(defaults)}")
  # Merged before the ConfigDict exists so an override may change a field's
  # type (a number -> a (lo, hi) pair).
  return ml_collections.ConfigDict({**defaults, **overrides})
