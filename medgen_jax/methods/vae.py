"""Variational autoencoders: beta-VAE and class-conditional VAE (CVAE).

One method, ``method.name="vae"``; ``data.cond="label"`` makes it a CVAE
(Sohn et al. 2015): encoder and decoder see the class, so sampling draws
``z ~ N(0, I)`` and decodes it *for a chosen class*. With
``data.mask_channels`` the decoder emits the image and its lesion mask
together (as ICVAE / PAVAE do): contrasts under a Gaussian or Laplace
likelihood, masks under a Bernoulli one, so every sample comes with its
segmentation. ``inpaint`` inserts a lesion with a given mask into a given
(healthy) image by optimising the latent.

Objective per example, in nats (the negative ELBO)::

  NLL(x | decoder(z, y)) + kl_weight(step) * KL(q(z | x, y) || N(0, I))

with a linear KL warm-up and optional free bits per latent dimension; the
logged ``loss`` divides both by the number of image elements, so it reads
per pixel. The image likelihood's scale is one learned log-scale per
contrast (``method.scale="learned"``: the calibrated decoder of Rybkin et
al. 2021, which sets the reconstruction/KL balance from the data instead of
a hand-tuned beta) or fixed (``method.fixed_scale``).
"""

from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medgen_jax import checks
from medgen_jax.methods import losses
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.nn import autoencoder as ae
from medgen_jax.nn import unet as unet_lib
from medgen_jax.train import optim
from medgen_jax.train.state import (TrainState, apply_gradients, create_state,
                                    eval_params)

PyTree = Any


def bottom_shape(spatial: Tuple[int, ...],
                 model: ml_collections.ConfigDict) -> Tuple[int, ...]:
  """Spatial shape of a conv pyramid's lowest level: ``spatial`` halved
  ``len(model.ch_mult) - 1`` times."""
  factor = 2 ** (len(model.ch_mult) - 1)
  return tuple(s // factor for s in spatial)


def pyramid_kwargs(model: ml_collections.ConfigDict, spatial_dims: int,
                   num_classes: int) -> Dict[str, Any]:
  """Keyword arguments shared by the autoencoders' encoder and decoder."""
  return dict(ch=model.ch, ch_mult=tuple(model.ch_mult),
              num_res_blocks=model.num_res_blocks,
              num_groups=model.num_groups, spatial_dims=spatial_dims,
              num_classes=num_classes, mid_attention=model.mid_attention,
              dtype=jnp.dtype(model.dtype),
              conv_lowering=model.conv_lowering)


class VAE:
  """beta-VAE / CVAE following :class:`~medgen_jax.methods.base.Method`,
  with ``sample``, ``reconstruct``, ``encode``, ``decode`` and ``inpaint``.

  Attributes:
    config: the full experiment config.
    image_shape: ``(*S, C + M)`` of one model input (contrasts then masks).
    num_contrasts: ``C``; the last ``M`` channels are masks in {-1, 1}.
    num_classes: ``0`` unconditional, else the classes of a CVAE.
    latent_shape: ``(z_dim,)`` (vector latent) or ``(*s, z_dim)`` (map).
  """

  def __init__(self, config: ml_collections.ConfigDict,
               image_shape: Tuple[int, ...]):
    self.config = config
    self.image_shape = tuple(image_shape)
    d, m = config.data, config.model
    self.num_contrasts = len(d.contrasts)
    self.num_classes = int(d.num_classes) if d.cond == "label" else 0
    spatial = self.image_shape[:-1]
    base = bottom_shape(spatial, m)
    kw = pyramid_kwargs(m, len(spatial), self.num_classes)
    vector = m.latent == "vector"
    self.latent_shape = (m.z_dim,) if vector else base + (m.z_dim,)
    self.encoder = ae.Encoder(
        out_channels=m.bottleneck if vector else 2 * m.z_dim,
        vector_dim=2 * m.z_dim if vector else 0, **kw)
    self.decoder = ae.Decoder(
        out_channels=self.image_shape[-1], vector_dim=m.z_dim if vector else 0,
        base_shape=base if vector else (),
        latent_channels=m.bottleneck if vector else 0, **kw)
    self.tx = optim.make_optimizer(config.optim, config.train.num_steps)

  # ------------------------------------------------------------- pieces --

  def _labels(self, batch: Batch) -> Optional[jax.Array]:
    return batch["label"].astype(jnp.int32) if self.num_classes else None

  def _posterior(self, params, x, y) -> Tuple[jax.Array, jax.Array]:
    """Mean and log-variance of ``q(z | x, y)``, each ``[B, *latent]``."""
    h = self.encoder.apply({"params": params["encoder"]}, x, y)
    mean, logvar = jnp.split(h, 2, axis=-1)
    # A bounded log-variance keeps exp() finite in the first steps.
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def _decode_raw(self, params, z, y) -> jax.Array:
    """Decoder output ``[B, *S, C + M]``: image locations, mask logits."""
    return self.decoder.apply({"params": params["decoder"]}, z, y)

  def _to_image(self, raw: jax.Array) -> jax.Array:
    return ae.to_model_space(raw, self.num_contrasts)

  def _log_scale(self, params) -> jax.Array:
    me = self.config.method
    if me.scale == "learned":
      # A floor on the scale: a perfectly reconstructed flat background
      # would otherwise drive it (and the loss) to minus infinity.
      return jnp.maximum(params["log_scale"], jnp.log(me.min_scale))
    return jnp.full((self.num_contrasts,), jnp.log(me.fixed_scale),
                    jnp.float32)

  def nll(self, params, x: jax.Array, raw: jax.Array) -> Dict[str, jax.Array]:
    """Per-example negative log-likelihoods ``[B]`` of the contrasts
    (``image_nll``) and the masks (``mask_nll``, Bernoulli)."""
    c = self.num_contrasts
    axes = tuple(range(1, x.ndim))
    like = (losses.gaussian_nll if self.config.method.likelihood == "gaussian"
            else losses.laplace_nll)
    image_nll = jnp.sum(like(x[..., :c], raw[..., :c], self._log_scale(params)),
                        axis=axes)
    out = {"image_nll": image_nll}
    if x.shape[-1] > c:
      target = (x[..., c:] > 0).astype(jnp.float32)
      out["mask_nll"] = jnp.sum(
          optax.sigmoid_binary_cross_entropy(raw[..., c:], target), axis=axes)
    return out

  # ---------------------------------------------------------- objective --

  def loss_terms(self, params, step: jax.Array, batch: Batch,
                 rng: jax.Array) -> Tuple[jax.Array, Metrics]:
    """The per-pixel negative ELBO and its terms (batch means)."""
    me = self.config.method
    x = batch["image"].astype(jnp.float32)
    y = self._labels(batch)
    mean, logvar = self._posterior(params, x, y)
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    z = mean + jnp.exp(0.5 * logvar) * eps
    raw = self._decode_raw(params, z, y)
    nlls = self.nll(params, x, raw)
    nll = sum(jnp.mean(v) for v in nlls.values())
    kl = losses.kl_diag_gaussian(mean, logvar)
    kl_nats = jnp.mean(jnp.sum(kl, axis=tuple(range(1, kl.ndim))))
    weight = losses.kl_weight(step, me.beta, me.kl_warmup_steps)
    kl_term = losses.free_bits(kl, me.free_bits) if me.free_bits else kl_nats
    pixels = x[0].size
    loss = (nll + weight * kl_term) / pixels
    metrics = {"loss": loss, "nll": nll / pixels, "kl": kl_nats,
               "kl_weight": weight,
               "elbo_per_pixel": -(nll + kl_nats) / pixels,
               **{k: jnp.mean(v) / pixels for k, v in nlls.items()}}
    if me.scale == "learned":
      metrics["scale"] = jnp.mean(jnp.exp(self._log_scale(params)))
    return loss, metrics

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state; ``batch`` only provides shapes."""
    k_enc, k_dec = jax.random.split(rng)
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    z = jnp.zeros((1,) + self.latent_shape, jnp.float32)
    params = {"encoder": self.encoder.init({"params": k_enc}, x, y)["params"],
              "decoder": self.decoder.init({"params": k_dec}, z, y)["params"]}
    if self.config.method.scale == "learned":
      params["log_scale"] = jnp.full((self.num_contrasts,),
                                     jnp.log(self.config.method.fixed_scale),
                                     jnp.float32)
    return create_state(params, self.tx, use_ema=self.config.train.ema > 0)

  def grad_step(self, state: TrainState, batch: Batch,
                rng: jax.Array) -> Tuple[PyTree, Metrics]:
    """Gradients of the negative ELBO and the loss terms; pure."""
    grad_fn = jax.grad(self.loss_terms, has_aux=True)
    grads, metrics = grad_fn(state.params, state.step, batch, rng)
    return grads, metrics

  def apply_step(self, state: TrainState,
                 grads: PyTree) -> Tuple[TrainState, Metrics]:
    """Optimizer update and EMA; pure."""
    grad_norm = optim.global_norm(grads)
    state = apply_gradients(state, self.tx, grads, ema=self.config.train.ema,
                            ema_warmup=self.config.train.ema_warmup)
    return state, {"grad_norm": grad_norm}

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    grads, metrics = self.grad_step(state, batch, rng)
    state, more = self.apply_step(state, grads)
    return state, {**metrics, **more}

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """The per-pixel negative ELBO at full KL weight (the validation
    objective is the bound itself, not the warm-up's relaxation)."""
    done = jnp.asarray(max(self.config.method.kl_warmup_steps, 0), jnp.int32)
    return self.loss_terms(state.params, done, batch, rng)[0]

  # -------------------------------------------------------- capabilities --

  def _cond_labels(self, cond, num: int) -> Optional[jax.Array]:
    cond = dict(cond or {})
    extra = sorted(set(cond) - {"label"})
    if extra:
      raise ValueError(f"the VAE samples from labels only; got {extra}")
    if not self.num_classes:
      if "label" in cond:
        raise ValueError("labels given to an unconditional VAE")
      return None
    if "label" in cond:
      return jnp.asarray(cond["label"], jnp.int32)
    return jnp.arange(num, dtype=jnp.int32) % self.num_classes

  def sample(self, state: TrainState, rng: jax.Array, num: int,
             cond: Optional[Batch] = None) -> Batch:
    """``z ~ N(0, I) * sample.temperature`` decoded (the likelihood's
    location, not a noisy draw from it).

    Returns:
      ``{"image": [num, *S, C + M] in [-1, 1]}`` plus ``"label"`` for a
      CVAE (``cond["label"]`` or balanced ``i % num_classes``).
    """
    params = eval_params(state)
    y = self._cond_labels(cond, num)
    z = self.config.sample.temperature * jax.random.normal(
        rng, (num,) + self.latent_shape, jnp.float32)
    out = {"image": self._to_image(self._decode_raw(params, z, y))}
    if y is not None:
      out["label"] = y
    return out

  def encode(self, state: TrainState, batch: Batch,
             rng: jax.Array) -> jax.Array:
    """Posterior means ``[B, *latent]`` of ``batch["image"]``."""
    del rng
    x = batch["image"].astype(jnp.float32)
    return self._posterior(eval_params(state), x, self._labels(batch))[0]

  def decode(self, state: TrainState, latents: jax.Array,
             cond: Optional[Batch] = None) -> Batch:
    """``{"image"}`` decoded from ``latents`` (labels from ``cond``)."""
    y = self._cond_labels(cond, latents.shape[0])
    raw = self._decode_raw(eval_params(state), latents, y)
    return {"image": self._to_image(raw)}

  def reconstruct(self, state: TrainState, batch: Batch,
                  rng: jax.Array) -> Batch:
    """The batch decoded from its posterior means (its own labels)."""
    z = self.encode(state, batch, rng)
    raw = self._decode_raw(eval_params(state), z, self._labels(batch))
    return {"image": self._to_image(raw)}

  def inpaint(self, state: TrainState, batch: Batch,
              rng: jax.Array) -> Batch:
    """Inserts the lesion of ``batch["mask"]`` into ``batch["image"]``.

    The latent starts at the image's posterior mean (under ``label``, e.g.
    the lesion class) and is optimised (``method.inpaint_steps`` Adam steps)
    so that the decoded mask matches the given one and the decoded image
    matches the given image outside it; the result keeps the given pixels
    outside the mask and takes the decoded ones inside.

    Args:
      batch: ``image [B, *S, C]`` (contrasts), ``mask [B, *S]`` or ``[B, *S,
        1]`` (> 0 inside), ``label [B]`` for a CVAE.

    Returns:
      ``{"image": [B, *S, C + M]}``: the edited contrasts and the given mask
      as its mask channel (in {-1, 1}).
    """
    del rng
    c = self.num_contrasts
    if self.image_shape[-1] == c:
      raise ValueError("inpaint needs a VAE trained with data.mask_channels")
    params = eval_params(state)
    image = batch["image"][..., :c].astype(jnp.float32)
    mask = (batch["mask"] > 0).astype(jnp.float32)
    mask = mask if mask.ndim == image.ndim else mask[..., None]
    target = jnp.concatenate([image, 2.0 * mask - 1.0], axis=-1)
    y = self._labels(batch)
    z0 = self._posterior(params, target, y)[0]
    outside = 1.0 - mask

    def objective(z):
      raw = self._decode_raw(params, z, y)
      fit = jnp.sum(outside * jnp.square(raw[..., :c] - image))
      mask_fit = jnp.sum(optax.sigmoid_binary_cross_entropy(raw[..., c:],
                                                            mask))
      return fit + mask_fit + 0.5 * jnp.sum(jnp.square(z))

    tx = optax.adam(self.config.method.inpaint_lr)

    def step(carry, _):
      z, opt = carry
      g = jax.grad(objective)(z)
      updates, opt = tx.update(g, opt, z)
      return (optax.apply_updates(z, updates), opt), None

    (z, _), _ = jax.lax.scan(step, (z0, tx.init(z0)), None,
                             length=self.config.method.inpaint_steps)
    decoded = self._to_image(self._decode_raw(params, z, y))[..., :c]
    edited = outside * image + mask * decoded
    return {"image": jnp.concatenate([edited, 2.0 * mask - 1.0], axis=-1)}


# --------------------------------------------------------------- config --

MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "num_groups",
              "mid_attention", "latent", "z_dim", "bottleneck", "dtype",
              "conv_lowering")
METHOD_KEYS = ("name", "beta", "kl_warmup_steps", "free_bits", "likelihood",
               "scale", "fixed_scale", "min_scale", "inpaint_steps",
               "inpaint_lr")
SAMPLE_KEYS = ("temperature", "num", "batch_size")


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``model``, ``method`` and ``sample`` sections."""
  errors: List[str] = []
  m, me, s = config.model, config.method, config.sample
  if checks.section_keys(errors, "model", m, MODEL_KEYS, "the VAE"):
    errors += unet_lib.pyramid_errors(m, config.data.res)
    checks.one_of(errors, "model.latent", m.latent, ("vector", "map"))
    checks.positive(errors, "model.z_dim", m.z_dim)
    checks.positive(errors, "model.bottleneck", m.bottleneck)
  if checks.section_keys(errors, "method", me, METHOD_KEYS, "vae"):
    checks.positive(errors, "method.beta", me.beta, allow_zero=True)
    checks.positive(errors, "method.kl_warmup_steps", me.kl_warmup_steps,
                    allow_zero=True)
    checks.positive(errors, "method.free_bits", me.free_bits,
                    allow_zero=True)
    checks.one_of(errors, "method.likelihood", me.likelihood,
                  ("gaussian", "laplace"))
    checks.one_of(errors, "method.scale", me.scale, ("learned", "fixed"))
    checks.positive(errors, "method.fixed_scale", me.fixed_scale)
    checks.positive(errors, "method.min_scale", me.min_scale)
    checks.positive(errors, "method.inpaint_steps", me.inpaint_steps)
    checks.positive(errors, "method.inpaint_lr", me.inpaint_lr)
  if checks.section_keys(errors, "sample", s, SAMPLE_KEYS, "vae"):
    checks.positive(errors, "sample.temperature", s.temperature)
  return errors


def make(config: ml_collections.ConfigDict, example_batch: Batch) -> VAE:
  """Builds the method; the image shape comes from ``example_batch``."""
  return VAE(config, tuple(example_batch["image"].shape[1:]))
