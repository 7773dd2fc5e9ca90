"""Latent diffusion (Rombach et al. 2022) on a frozen stage-1 autoencoder.

The diffusion model (:class:`~medgen_jax.methods.ddpm.DDPM`: eps/v or
rectified flow, every sampler, label guidance) runs on the latents of a
trained KL autoencoder (``autoencoder_kl``) or VQ-VAE (``vqvae``), scaled to
unit variance, and samples are decoded back to images (with the lesion
masks when stage 1 was trained with them).

- ``method.autoencoder``: the stage-1 run's workdir, or ``"auto"``: the
  config's ``stage1`` section is trained into ``<workdir>/stage1`` first
  (resumed if it was cut short, reused once finished). Stage 1's
  parameters are frozen inputs (``state.frozen``), never updated nor
  written into this run's checkpoints; the run records which stage 1 it
  used, and a resume with another one is refused.
- ``method.scale_factor``: the latents' multiplier; ``0`` takes
  ``1 / std`` of the latents of the first training batch, kept in the
  checkpoint (``model_state["latent_scale"]``).
- A VQ-VAE's latents are its codebook vectors; a sampled latent is
  quantised to the nearest code before decoding (the quantiser belongs to
  the decoder, as in the paper).
"""

import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medgen_jax import checks
from medgen_jax.methods import base as methods
from medgen_jax.methods import ddpm
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.nn import autoencoder as ae
from medgen_jax.train import frozen as frozen_lib
from medgen_jax.train.state import TrainState

PyTree = Any

STAGE1_METHODS = ("autoencoder_kl", "vqvae")
# The stage-1 data settings an LDM must share: it decodes into them.
SHARED_DATA_KEYS = ("res", "spatial_dims", "contrasts", "mask_channels",
                    "normalization")


def stage1_config(stage1: Dict[str, Any]) -> ml_collections.ConfigDict:
  """A stage-1 run's config as the LDM builds its method: the perceptual
  network (a training-loss input) is not loaded."""
  c = ml_collections.ConfigDict(stage1)
  if "perceptual_weight" in c.method:
    c.method.perceptual_weight = 0.0
  return c


def _data_mismatch(data: ml_collections.ConfigDict,
                   stage1: Dict[str, Any]) -> List[str]:
  """The :data:`SHARED_DATA_KEYS` where the two data sections differ."""
  return [f"data.{k}: {a!r} here, {b!r} in stage 1"
          for k, a, b in checks.differences(data, stage1.get("data", {}),
                                            SHARED_DATA_KEYS)]


class LDM(ddpm.DDPM):
  """A :class:`~medgen_jax.methods.ddpm.DDPM` on stage-1 latents, with
  ``sample`` and ``frozen_inputs``.

  Attributes:
    data_shape: ``(*S, C + M)`` of one image (contrasts, then masks).
    image_shape: ``(*s, c)`` of one latent (what the diffusion sees).
    stage1: the stage-1 method (built from its run's config).
    stage1_kind: ``autoencoder_kl`` or ``vqvae``.
    init_scale: the latent scale a fresh state starts with.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               example_batch: Batch):
    me = config.method
    self.data_shape = tuple(example_batch["image"].shape[1:])
    tree, stage1, record = frozen_lib.load_run(
        me.autoencoder, which="ema", with_model_state=True)
    kind = stage1.get("method", {}).get("name")
    if kind not in STAGE1_METHODS:
      raise frozen_lib.FrozenInputError(
          f"method.autoencoder={me.autoencoder} is a {kind!r} run; latent "
          f"diffusion needs one of {STAGE1_METHODS}")
    mismatch = _data_mismatch(config.data, stage1)
    if mismatch:
      raise frozen_lib.FrozenInputError(
          f"stage 1 in {me.autoencoder} was trained on other data: "
          f"{'; '.join(mismatch)}; train a stage 1 on this data "
          "(method.autoencoder='auto')")
    s1 = stage1_config(stage1)
    if s1.data.get("cond") == "label":
      raise frozen_lib.FrozenInputError(
          f"stage 1 in {me.autoencoder} is class-conditional; latent "
          "diffusion carries the condition itself: use an unconditional "
          "stage 1")
    self.stage1_kind = kind
    self.stage1 = methods.build(s1, {"image": np.zeros(
        (1,) + self.data_shape, np.float32)})
    latent = tuple(self.stage1.latent_shape)
    # Full-size masks are folded into the latents' grid, losslessly.
    self.fold = self.data_shape[0] // latent[0]
    self.num_masks = len(config.data.get("mask_channels") or ())
    hint = (self.num_masks * self.fold ** (len(latent) - 1)
            if me.get("condition", "none") == "mask" else 0)
    super().__init__(config, latent[:-1] + (latent[-1] + hint,))
    if hint:
      self.sample_cond = ("mask",)
    base = self._frozen  # a ControlNet's base model, if any
    self._frozen = frozen_lib.FrozenInputs(
        {"stage1": tree, **(base.tree if base else {})},
        {"stage1": record, **(base.record if base else {})})
    if base:
      # The adapter sees the latents its base model was trained on.
      self.init_scale = float(self.base_model_state["latent_scale"])
    else:
      self.init_scale = float(me.scale_factor) or self._data_scale(
          tree, example_batch["image"])

  # ------------------------------------------------------- stage 1 I/O --

  def _stage1_state(self, frozen: PyTree) -> TrainState:
    f = frozen["stage1"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=f["params"],
                      opt_state=None, ema_params=None,
                      model_state=f["model_state"])

  def to_latents(self, frozen: PyTree, images: jax.Array) -> jax.Array:
    """``[B, *S, C + M]`` model-space images -> unscaled latents
    ``[B, *s, c]`` (a VQ-VAE's: its code vectors)."""
    s1 = self._stage1_state(frozen)
    z = self.stage1.encode(s1, {"image": images.astype(jnp.float32)}, None)
    if self.stage1_kind == "vqvae":
      z = jnp.take(s1.model_state["codebook"], z, axis=0)
    return jax.lax.stop_gradient(z.astype(jnp.float32))

  def from_latents(self, frozen: PyTree, z: jax.Array) -> jax.Array:
    """Unscaled latents -> model-space images (masks as ``2p - 1``)."""
    s1 = self._stage1_state(frozen)
    if self.stage1_kind == "vqvae":
      z = ae.quantize(z, s1.model_state["codebook"])[1]
    return self.stage1.decode(s1, z)["image"]

  def _data_scale(self, tree: PyTree, images) -> float:
    """``1 / std`` of the latents of ``images`` (1 when they are
    constant, e.g. a shapes-only placeholder batch)."""
    frozen = jax.tree.map(jnp.asarray, {"stage1": tree})
    z = jax.jit(self.to_latents)(frozen, jnp.asarray(images))
    std = float(jnp.std(z))
    return 1.0 / std if std > 1e-6 else 1.0

  def split_channels(self, config: ml_collections.ConfigDict,
                     num: int) -> Tuple[List[int], List[int]]:
    """The stage-1 latent channels are generated; with
    ``condition="mask"`` the folded masks after them are given."""
    channels = list(range(num))
    c = self.stage1.latent_shape[-1]
    return channels[:c], channels[c:]

  def hint(self, given: jax.Array) -> jax.Array:
    """Masks ``[B, *S, M]`` folded to the latents' grid: ``[B, *s, M *
    f^d]`` for ``f = S / s`` (space-to-depth, nothing lost)."""
    f = self.fold
    if given.ndim == 4:
      return einops.rearrange(given, "b (h p) (w q) m -> b h w (p q m)",
                              p=f, q=f)
    return einops.rearrange(
        given, "b (d o) (h p) (w q) m -> b d h w (o p q m)", o=f, p=f, q=f)

  def with_given(self, images: jax.Array, given: jax.Array) -> jax.Array:
    """The decoded contrasts with the given masks in place of the
    decoded ones."""
    return jnp.concatenate(
        [images[..., :images.shape[-1] - self.num_masks], given], axis=-1)

  def _latent_batch(self, state: TrainState, batch: Batch) -> Batch:
    images = batch["image"]
    z = self.to_latents(state.frozen, images)
    z = z * state.model_state["latent_scale"]
    if self.given_channels:
      z = jnp.concatenate(
          [z, self.hint(images[..., -self.num_masks:].astype(z.dtype))],
          axis=-1)
    return dict(batch, image=z)

  # ------------------------------------------------------------ method --

  def frozen_inputs(self) -> frozen_lib.FrozenInputs:
    return self._frozen

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """The diffusion network's state (``batch`` provides shapes), with the
    latent scale in ``model_state``."""
    latents = {"image": jnp.zeros((1,) + self.image_shape, jnp.float32)}
    state = super().init(rng, latents)
    return state.replace(model_state={
        "latent_scale": jnp.asarray(self.init_scale, jnp.float32)})

  def grad_step(self, state: TrainState, batch: Batch,
                rng: jax.Array) -> Tuple[PyTree, Metrics]:
    """The diffusion loss's gradients on the batch's scaled latents."""
    grads, metrics = super().grad_step(state,
                                       self._latent_batch(state, batch), rng)
    return grads, {**metrics,
                   "latent_scale": state.model_state["latent_scale"]}

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """The validation loss on the batch's scaled latents."""
    return super().loss(state, self._latent_batch(state, batch), rng)

  def finish(self, state: TrainState, x: jax.Array) -> jax.Array:
    """Sampled scaled latents -> decoded images."""
    return self.from_latents(state.frozen,
                             x / state.model_state["latent_scale"])


# --------------------------------------------------------------- config --

METHOD_KEYS = ddpm.METHOD_KEYS + ("autoencoder", "scale_factor")


def _stage1_dict(config: ml_collections.ConfigDict) -> Optional[Dict]:
  """The stage-1 config this LDM will use, if it can be read now."""
  where = config.method.autoencoder
  if where == "auto":
    where = _base_autoencoder(config)  # a ControlNet takes its base's
  if where == "auto" or where is None:
    stage1 = config.get("stage1")
    return stage1.to_dict() if stage1 is not None else None
  try:
    with open(os.path.join(str(where), "config.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _base_autoencoder(config: ml_collections.ConfigDict) -> Optional[str]:
  """The stage-1 workdir of a ControlNet's base LDM run, if readable."""
  if not config.method.get("controlnet"):
    return None
  try:
    with open(os.path.join(str(config.method.controlnet),
                           "config.json")) as f:
      return json.load(f)["method"]["autoencoder"]
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _latent_res(stage1: Dict[str, Any]) -> Any:
  m, d = stage1.get("model", {}), stage1.get("data", {})
  levels = len(m.get("ch_mult", ()) or ())
  res = d.get("res")
  return res // 2 ** (levels - 1) if isinstance(res, int) and levels else res


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``method``, ``model``, ``sample`` and ``stage1``
  sections; the U-Net is checked at the latents' side."""
  # Imported here: config_check imports every method's checks through
  # methods.base, and this check validates a whole stage-1 config.
  from medgen_jax import config_check  # pylint: disable=import-outside-toplevel
  me = config.method
  errors: List[str] = []
  auto = me.get("autoencoder") == "auto"
  if not me.get("autoencoder"):
    errors.append("method.autoencoder is empty: the workdir of a trained "
                  f"{' or '.join(STAGE1_METHODS)} run, or 'auto' (train the "
                  "config's stage1 section first)")
    return errors
  stage1 = _stage1_dict(config)
  if stage1 is None:
    errors.append(
        "method.autoencoder='auto' needs a stage1 section (a full "
        "autoencoder_kl or vqvae config)" if auto else
        f"method.autoencoder={me.autoencoder}: no readable config.json "
        "there; train stage 1 first or use 'auto'")
    return errors
  if auto:
    s1 = ml_collections.ConfigDict(stage1)
    errors += [f"stage1: {e}" for e in config_check.method_errors(s1)]
  kind = stage1.get("method", {}).get("name")
  if kind not in STAGE1_METHODS:
    errors.append(f"stage 1 is a {kind!r} config; latent diffusion needs one "
                  f"of {STAGE1_METHODS}")
  errors += _data_mismatch(config.data, stage1)
  if me.get("condition", "none") == "source":
    errors.append("method.condition='source': latent diffusion generates "
                  "from labels or masks; translate with configs/palette.py")
  base = _base_autoencoder(config)
  if me.get("controlnet") and base and not auto and (
      os.path.abspath(str(me.autoencoder)) != os.path.abspath(base)):
    errors.append(f"method.autoencoder={me.autoencoder}: the ControlNet's "
                  f"base model was trained on the latents of {base}; use "
                  "that stage 1 (or 'auto', which takes it)")
  errors += ddpm.diffusion_errors(config, _latent_res(stage1), METHOD_KEYS,
                                  "ldm")
  checks.positive(errors, "method.scale_factor", me.get("scale_factor", 0),
                  allow_zero=True)
  return errors


def resolve_auto(config: ml_collections.ConfigDict, workdir: str,
                 train_encoder: Callable[..., str],
                 train_run: Callable[[ml_collections.ConfigDict, str], str]
                 ) -> ml_collections.ConfigDict:
  """``config`` with ``method.autoencoder="auto"`` replaced by
  ``<workdir>/stage1``, trained there first by ``train_run`` (which
  resumes a cut run and returns at once for a finished one)."""
  del train_encoder
  if config.method.autoencoder != "auto":
    return config
  base = _base_autoencoder(config)
  if base:
    # A ControlNet works on its base model's latents.
    config = ml_collections.ConfigDict(config.to_dict())
    config.method.autoencoder = base
    return config
  directory = os.path.join(os.path.abspath(workdir), "stage1")
  train_run(ml_collections.ConfigDict(config.stage1.to_dict()), directory)
  config = ml_collections.ConfigDict(config.to_dict())
  config.method.autoencoder = directory
  return config


def make(config: ml_collections.ConfigDict, example_batch: Batch) -> LDM:
  """Builds the method; stage 1 is read from ``method.autoencoder``."""
  return LDM(config, example_batch)
