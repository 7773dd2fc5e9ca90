"""VQ-VAE with an EMA codebook (van den Oord et al. 2017; Razavi et al.
2019), dead-code restarts, and codebook usage and perplexity logged.

The encoder maps an image to a grid of ``embedding_dim`` vectors, each is
replaced by its nearest code (straight-through gradient), and the decoder
maps the codes back. The codebook is not trained by gradients: it is the
exponential moving average of the encoder outputs assigned to each code
(``state.model_state``), and codes whose average use falls below
``method.restart_threshold`` are restarted at random encoder outputs of the
batch (at step 0 every code is, so the codebook starts on the data). The
loss is the reconstruction (L1 or MSE on the contrasts, Bernoulli on mask
channels) plus the commitment term.

A VQ-VAE has no prior of its own to sample from: it provides
``reconstruct``, ``encode`` (code indices) and ``decode``; a prior over the
codes (latent diffusion) makes it a generator.
"""

from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from medgen_jax import checks
from medgen_jax.methods import losses
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.methods.vae import bottom_shape, pyramid_kwargs
from medgen_jax.nn import autoencoder as ae
from medgen_jax.nn import unet as unet_lib
from medgen_jax.train import optim
from medgen_jax.train.state import (TrainState, apply_gradients, create_state,
                                    eval_params)

PyTree = Any


class VQVAE:
  """VQ-VAE following :class:`~medgen_jax.methods.base.Method`, with
  ``reconstruct``, ``encode`` and ``decode``.

  Attributes:
    config: the full experiment config.
    image_shape: ``(*S, C + M)`` of one model input.
    num_contrasts: ``C``.
    num_classes: ``0``, or the classes the encoder and decoder see.
    latent_shape: ``(*s, embedding_dim)`` of the quantised grid.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               image_shape: Tuple[int, ...]):
    self.config = config
    self.image_shape = tuple(image_shape)
    d, m = config.data, config.model
    self.num_contrasts = len(d.contrasts)
    self.num_classes = int(d.num_classes) if d.cond == "label" else 0
    self.latent_shape = bottom_shape(self.image_shape[:-1], m) + (
        m.embedding_dim,)
    kw = pyramid_kwargs(m, len(self.image_shape) - 1, self.num_classes)
    self.encoder = ae.Encoder(out_channels=m.embedding_dim, **kw)
    self.decoder = ae.Decoder(out_channels=self.image_shape[-1], **kw)
    self.tx = optim.make_optimizer(config.optim, config.train.num_steps)

  def _labels(self, batch: Batch) -> Optional[jax.Array]:
    return batch["label"].astype(jnp.int32) if self.num_classes else None

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state; the codebook's EMA sizes start at 0, so the first
    step restarts every code at an encoder output of the batch."""
    k_enc, k_dec, k_cb = jax.random.split(rng, 3)
    m = self.config.model
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    z = jnp.zeros((1,) + self.latent_shape, jnp.float32)
    params = {"encoder": self.encoder.init({"params": k_enc}, x, y)["params"],
              "decoder": self.decoder.init({"params": k_dec}, z, y)["params"]}
    codebook = 0.01 * jax.random.normal(
        k_cb, (m.num_codes, m.embedding_dim), jnp.float32)
    codes = {"codebook": codebook,
             "cluster_size": jnp.zeros((m.num_codes,), jnp.float32),
             "embed_sum": jnp.zeros_like(codebook)}
    return create_state(params, self.tx, use_ema=self.config.train.ema > 0,
                        model_state=codes)

  def _forward(self, params, codebook, batch: Batch):
    x = batch["image"].astype(jnp.float32)
    y = self._labels(batch)
    z_e = self.encoder.apply({"params": params["encoder"]}, x, y)
    z_q, indices, _ = ae.quantize(z_e, codebook)
    raw = self.decoder.apply({"params": params["decoder"]}, z_q, y)
    return x, z_e, z_q, indices, raw

  def loss_terms(self, params, codebook, batch: Batch
                 ) -> Tuple[jax.Array, Tuple[Metrics, Any]]:
    """Reconstruction + commitment, its terms, and what the codebook update
    needs (encoder outputs, code indices)."""
    me = self.config.method
    x, z_e, z_q, indices, raw = self._forward(params, codebook, batch)
    rec = losses.reconstruction(x, raw, self.num_contrasts, me.reconstruction)
    commit = losses.commitment_loss(z_e, z_q, me.commitment)
    loss = (jnp.mean(rec["image_rec"]) +
            me.mask_weight * jnp.mean(rec.get("mask_bce", 0.0)) + commit)
    metrics = {"loss": loss, "commitment": commit,
               **{k: jnp.mean(v) for k, v in rec.items()}}
    return loss, (metrics, (z_e, indices))

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """One optimizer update of the networks, one EMA update of the
    codebook and the restart of dead codes; pure and jit-able."""
    me, m = self.config.method, self.config.model
    codes = state.model_state
    grads, (metrics, (z_e, indices)) = jax.grad(
        self.loss_terms, has_aux=True)(state.params, codes["codebook"], batch)
    z_flat = jax.lax.stop_gradient(z_e).reshape(-1, m.embedding_dim)
    flat_idx = indices.reshape(-1)
    size, esum, codebook = ae.ema_update(codes["cluster_size"],
                                         codes["embed_sum"], z_flat, flat_idx,
                                         me.decay, me.eps)
    codebook, size, esum, restarted = ae.restart_dead_codes(
        codebook, size, esum, z_flat, rng, me.restart_threshold)
    metrics.update(
        grad_norm=optim.global_norm(grads),
        perplexity=ae.perplexity(flat_idx, m.num_codes),
        codebook_usage=ae.usage(flat_idx, m.num_codes),
        restarted_codes=restarted.astype(jnp.float32))
    state = apply_gradients(
        state, self.tx, grads, ema=self.config.train.ema,
        ema_warmup=self.config.train.ema_warmup,
        model_state={"codebook": codebook, "cluster_size": size,
                     "embed_sum": esum})
    return state, metrics

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """Reconstruction + commitment with the current codebook."""
    del rng
    return self.loss_terms(state.params, state.model_state["codebook"],
                           batch)[0]

  # -------------------------------------------------------- capabilities --

  def encode(self, state: TrainState, batch: Batch,
             rng: jax.Array) -> jax.Array:
    """Code indices ``[B, *s]`` int32 of ``batch["image"]``."""
    del rng
    return self._forward(eval_params(state), state.model_state["codebook"],
                         batch)[3]

  def decode(self, state: TrainState, latents: jax.Array,
             cond: Optional[Batch] = None) -> Batch:
    """``{"image"}`` from code indices ``[B, *s]`` (labels from ``cond``
    for a class-conditional model)."""
    y = None
    if self.num_classes:
      if not cond or "label" not in cond:
        raise ValueError("a class-conditional VQ-VAE decodes with "
                         "cond={'label': ...}")
      y = jnp.asarray(cond["label"], jnp.int32)
    z_q = jnp.take(state.model_state["codebook"], latents, axis=0)
    raw = self.decoder.apply({"params": eval_params(state)["decoder"]}, z_q,
                             y)
    return {"image": ae.to_model_space(raw, self.num_contrasts)}

  def reconstruct(self, state: TrainState, batch: Batch,
                  rng: jax.Array) -> Batch:
    """The batch through encoder, codebook and decoder."""
    del rng
    raw = self._forward(eval_params(state), state.model_state["codebook"],
                        batch)[4]
    return {"image": ae.to_model_space(raw, self.num_contrasts)}


# --------------------------------------------------------------- config --

MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "num_groups",
              "mid_attention", "embedding_dim", "num_codes", "dtype",
              "conv_lowering")
METHOD_KEYS = ("name", "commitment", "decay", "eps", "restart_threshold",
               "reconstruction", "mask_weight")


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``model`` and ``method`` sections."""
  errors: List[str] = []
  m, me = config.model, config.method
  if checks.section_keys(errors, "model", m, MODEL_KEYS, "the VQ-VAE"):
    errors += unet_lib.pyramid_errors(m, config.data.res)
    checks.positive(errors, "model.embedding_dim", m.embedding_dim)
    checks.positive(errors, "model.num_codes", m.num_codes)
  if checks.section_keys(errors, "method", me, METHOD_KEYS, "vqvae"):
    checks.positive(errors, "method.commitment", me.commitment,
                    allow_zero=True)
    checks.in_range(errors, "method.decay", me.decay, 0.0, 1.0)
    checks.positive(errors, "method.eps", me.eps)
    checks.positive(errors, "method.restart_threshold",
                    me.restart_threshold, allow_zero=True)
    checks.one_of(errors, "method.reconstruction", me.reconstruction,
                  ("l1", "mse"))
    checks.positive(errors, "method.mask_weight", me.mask_weight,
                    allow_zero=True)
  return errors


def make(config: ml_collections.ConfigDict, example_batch: Batch) -> VQVAE:
  """Builds the method; the image shape comes from ``example_batch``."""
  return VQVAE(config, tuple(example_batch["image"].shape[1:]))
