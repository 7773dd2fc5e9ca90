"""Frozen inputs: parameters a method reads from another run.

A latent diffusion model reads its stage-1 autoencoder, a perceptual loss its
feature network. They live in ``TrainState.frozen``, are never updated and
are never written into the reading run's checkpoints: the run records where
they came from (:attr:`FrozenInputs.record`: workdir, checkpoint step,
method, a digest of that run's config) in ``frozen_inputs.json``, in its
checkpoints' metadata and, through those, in the study's cache keys. A
checkpoint trained on other frozen inputs than the config names is refused
(:func:`check_same`), so a retrained stage 1 cannot silently pair with an
old stage 2.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import orbax.checkpoint as ocp

from medgen_jax import errors
from medgen_jax.train import checkpoint

PyTree = Any


class FrozenInputError(errors.UserError, ValueError):
  """A frozen input is missing, unreadable or not the one a checkpoint was
  trained with."""


@dataclasses.dataclass(frozen=True)
class FrozenInputs:
  """What a method loaded from other runs.

  Attributes:
    tree: ``{name: parameters}`` as host arrays (becomes ``state.frozen``).
    record: ``{name: {workdir, step, method, config_sha256}}``.
  """

  tree: PyTree
  record: Dict[str, Any]


def config_digest(config: Dict[str, Any]) -> str:
  """SHA-256 of a config dict in canonical JSON."""
  text = json.dumps(config, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _params_from_saved(saved: Dict[str, Any], which: str) -> PyTree:
  """The sampling parameters of a checkpointed state read without a target
  (a dict of its fields): the EMA in place of the sub-tree it follows."""
  params = saved["params"]
  ema = saved.get("ema_params")
  if which == "raw" or ema is None:
    return params
  # The EMA's structure says which sub-tree it follows.
  if isinstance(params, dict) and not _same_keys(ema, params):
    for k, sub in params.items():
      if _same_keys(ema, sub):
        return {**params, k: ema}
  return ema


def _same_keys(a: Any, b: Any) -> bool:
  if isinstance(a, dict) and isinstance(b, dict):
    return set(a) == set(b) and all(_same_keys(a[k], b[k]) for k in a)
  return not isinstance(a, dict) and not isinstance(b, dict)


def load_run(workdir: str, step: Optional[int] = None, which: str = "ema",
             with_model_state: bool = False
             ) -> Tuple[PyTree, Dict[str, Any], Dict[str, Any]]:
  """Parameters, config and record of a finished run in ``workdir``.

  Args:
    workdir: a trainer workdir (``config.json``, ``checkpoints/``).
    step: the checkpoint (default: the latest).
    which: ``ema`` (what the run samples with) or ``raw``.
    with_model_state: return ``{"params", "model_state"}`` instead of the
      parameters alone.

  Returns:
    ``(params as numpy arrays, the run's config dict, record)``.
  """
  workdir = os.path.abspath(workdir)
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise FrozenInputError(
        f"{workdir} is not a finished training run ({e}); train it first "
        "with launch.py --workdir=" + workdir) from None
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = checkpoint.steps_on_disk(workdir)
  if not steps or (step is not None and step not in steps):
    raise FrozenInputError(
        f"no checkpoint{'' if step is None else f' {step}'} in {ckpt_dir} "
        f"(checkpoints: {steps}); train the run first")
  step = steps[-1] if step is None else step
  path = os.path.join(ckpt_dir, str(step), "state")
  try:
    saved = ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # orbax raises many types; name the checkpoint.
    raise FrozenInputError(f"could not read {path}: {type(e).__name__}: "
                           f"{str(e)[:300]}") from e
  params = _params_from_saved(saved, which)
  params = _to_numpy(params)
  record = dict(workdir=workdir, step=int(step),
                method=config.get("method", {}).get("name", ""),
                params=which, config_sha256=config_digest(config))
  if with_model_state:
    # e.g. a VQ-VAE's codebook, which lives beside its parameters.
    params = {"params": params,
              "model_state": _to_numpy(saved.get("model_state") or {})}
  return params, config, record


def _to_numpy(tree: PyTree) -> PyTree:
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def check_same(saved: Optional[Dict[str, Any]],
               current: Optional[Dict[str, Any]], where: str) -> None:
  """Raises when a checkpoint's frozen-input record differs from the one
  the config loads now."""
  if (saved or None) == (current or None):
    return
  raise FrozenInputError(
      f"checkpoint {where} was trained with frozen inputs {saved}, but the "
      f"config now loads {current}; use a new --workdir, or point the config "
      "back at the run it was trained with")


def load_encoder(directory: str) -> Tuple[PyTree, Dict[str, Any],
                                          Dict[str, Any]]:
  """A trained in-domain encoder (``encoder.json`` + ``params/``, as the
  generative evaluator and the study write it): ``(params as numpy arrays,
  its settings, record)``."""
  directory = os.path.abspath(directory)
  card_path = os.path.join(directory, "encoder.json")
  try:
    with open(card_path) as f:
      card = json.load(f)
    settings = card["settings"]
  except (OSError, ValueError, KeyError) as e:
    raise FrozenInputError(
        f"{directory} holds no trained in-domain encoder ({e}); run "
        "--mode=eval of a config on the same data (it trains one into "
        "<workdir>/encoder) or point at a study's encoder/") from None
  path = os.path.join(directory, "params")
  try:
    params = _to_numpy(ocp.StandardCheckpointer().restore(path))
  except Exception as e:  # orbax raises many types; name the files.
    raise FrozenInputError(f"could not read {path}: {type(e).__name__}: "
                           f"{str(e)[:300]}") from e
  record = dict(directory=directory, settings_sha256=config_digest(settings),
                held_out_scores=card.get("held_out_scores"))
  return params, settings, record
