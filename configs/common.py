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
