"""KL-regularised autoencoder with a patch discriminator (the stage 1 of
latent diffusion: Esser et al. 2021, Rombach et al. 2022).

The encoder maps an image to a diagonal Gaussian over a latent map
(``model.z_channels`` channels at ``1 / 2**(levels-1)`` of the image
side); the decoder maps a draw back. The autoencoder's loss is

  L1 (or MSE) reconstruction of the contrasts
  + Bernoulli cross-entropy of the mask channels (``method.mask_weight``)
  + ``method.perceptual_weight`` * a feature distance in a frozen network
  + ``method.kl_weight`` * KL(q(z | x) || N(0, I))   (a small weight: the
    latent stays close to a unit Gaussian without blurring)
  + ``method.adv_weight`` * the generator's adversarial loss against a
    PatchGAN discriminator, from step ``method.disc_start`` on,

and the discriminator learns with its own optimizer in the same trainer
step: ``state.params = {"ae": ..., "disc": ...}``, one optimizer each, the
EMA follows ``"ae"`` only.

The perceptual network is read from another run (``state.frozen``): a
classifier trained on the same real images (the in-domain encoder the
generative evaluator trains), so no ImageNet weights are downloaded. Its
feature distance is the mean squared difference of unit-normalised
activations after every stage (LPIPS without learned channel weights).

Latent diffusion needs the latents' scale: the ``reconstruction`` evaluator
reports their standard deviation and ``latent_scale_factor`` = 1 / std,
computed from the data.
"""

import os
from typing import Any, Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from medgen_jax import checks
from medgen_jax.methods import losses
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.methods.vae import bottom_shape, pyramid_kwargs
from medgen_jax.nn import autoencoder as ae
from medgen_jax.nn import classifier as classifier_lib
from medgen_jax.nn import unet as unet_lib
from medgen_jax.train import frozen as frozen_lib
from medgen_jax.train import optim
from medgen_jax.train import state as state_lib
from medgen_jax.train.state import TrainState

PyTree = Any

class AutoencoderKL:
  """KL autoencoder + patch discriminator following
  :class:`~medgen_jax.methods.base.Method`, with ``reconstruct``,
  ``encode``, ``decode`` and (with a perceptual network) ``frozen_inputs``.

  Attributes:
    config: the full experiment config.
    image_shape: ``(*S, C + M)`` of one model input.
    num_contrasts: ``C``.
    latent_shape: ``(*s, z_channels)``.
    perceptual: the frozen feature network (a classifier's stages), or
      ``None`` when ``method.perceptual_weight`` is 0.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               image_shape: Tuple[int, ...]):
    self.config = config
    self.image_shape = tuple(image_shape)
    d, m, me = config.data, config.model, config.method
    self.num_contrasts = len(d.contrasts)
    spatial_dims = len(self.image_shape) - 1
    self.latent_shape = bottom_shape(self.image_shape[:-1], m) + (
        m.z_channels,)
    kw = pyramid_kwargs(m, spatial_dims, 0)
    self.encoder = ae.Encoder(out_channels=2 * m.z_channels, **kw)
    self.decoder = ae.Decoder(out_channels=self.image_shape[-1], **kw)
    self.disc = ae.PatchDiscriminator(
        ch=m.disc_ch, num_layers=m.disc_layers, num_groups=m.num_groups,
        spatial_dims=spatial_dims, dtype=jnp.dtype(m.dtype),
        conv_lowering=m.conv_lowering)
    self.tx = {"ae": optim.make_optimizer(config.optim,
                                          config.train.num_steps),
               "disc": optim.make_optimizer(config.optim,
                                            config.train.num_steps)}
    self.d_loss, self.g_loss = losses.adversarial(me.adv_loss)
    self.perceptual = None
    self._frozen = None
    if me.perceptual_weight > 0:
      self._frozen, self.perceptual = _load_perceptual(
          me.perceptual_net, tuple(d.contrasts), spatial_dims)

  def frozen_inputs(self) -> Optional[frozen_lib.FrozenInputs]:
    """The perceptual network's parameters, read from its run."""
    return self._frozen

  # ------------------------------------------------------------- pieces --

  def _posterior(self, ae_params, x) -> Tuple[jax.Array, jax.Array]:
    h = self.encoder.apply({"params": ae_params["encoder"]}, x)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def _decode_raw(self, ae_params, z) -> jax.Array:
    return self.decoder.apply({"params": ae_params["decoder"]}, z)

  def _logits(self, disc_params, x) -> jax.Array:
    return self.disc.apply({"params": disc_params}, x)

  def _perceptual(self, frozen, x, raw) -> jax.Array:
    """Mean over stages of the squared distance of unit-normalised
    features of the contrasts (masks are not images)."""
    model, inputs = self.perceptual
    c = self.num_contrasts
    pred = ae.to_model_space(raw, c)[..., :c]
    fa = model.apply({"params": frozen["perceptual"]}, x[..., inputs],
                     return_stages=True)[-1]
    fb = model.apply({"params": frozen["perceptual"]}, pred[..., inputs],
                     return_stages=True)[-1]

    def unit(f):
      return f * jax.lax.rsqrt(jnp.sum(jnp.square(f), -1, keepdims=True) +
                               1e-10)

    return sum(jnp.mean(jnp.square(unit(a) - unit(b)))
               for a, b in zip(fa, fb)) / len(fa)

  def ae_terms(self, ae_params, disc_params, frozen, step, batch: Batch,
               rng: jax.Array, adversarial: bool = True
               ) -> Tuple[jax.Array, Tuple[Metrics, jax.Array]]:
    """The autoencoder's loss, its terms and the reconstruction ``raw``."""
    me = self.config.method
    x = batch["image"].astype(jnp.float32)
    mean, logvar = self._posterior(ae_params, x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    raw = self._decode_raw(ae_params, z)
    rec = losses.reconstruction(x, raw, self.num_contrasts, me.reconstruction)
    kl = losses.kl_diag_gaussian(mean, logvar)
    kl = jnp.mean(jnp.sum(kl, axis=tuple(range(1, kl.ndim))))
    loss = (jnp.mean(rec["image_rec"]) +
            me.mask_weight * jnp.mean(rec.get("mask_bce", 0.0)) +
            me.kl_weight * kl)
    metrics = {"kl": kl, **{k: jnp.mean(v) for k, v in rec.items()}}
    if self.perceptual is not None:
      p = self._perceptual(frozen, x, raw)
      loss += me.perceptual_weight * p
      metrics["perceptual"] = p
    if adversarial:
      on = (step >= me.disc_start).astype(jnp.float32)
      fake = ae.to_model_space(raw, self.num_contrasts)
      g = self.g_loss(self._logits(disc_params, fake))
      loss += on * me.adv_weight * g
      metrics["g_adv"] = g
    metrics["ae_loss"] = loss
    return loss, (metrics, raw)

  # ---------------------------------------------------------- the step --

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state: ``params = {"ae": {encoder, decoder}, "disc"}``."""
    k_enc, k_dec, k_disc = jax.random.split(rng, 3)
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    z = jnp.zeros((1,) + self.latent_shape, jnp.float32)
    params = {
        "ae": {"encoder": self.encoder.init({"params": k_enc}, x)["params"],
               "decoder": self.decoder.init({"params": k_dec}, z)["params"]},
        "disc": self.disc.init({"params": k_disc}, x)["params"]}
    return state_lib.create_state(params, self.tx,
                                  use_ema=self.config.train.ema > 0,
                                  ema_of="ae")

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """An autoencoder update, then a discriminator update on the new
    reconstructions' predecessors (the ones the autoencoder was scored
    on), then EMA and ``step + 1``: one trainer step, two optimizers."""
    me = self.config.method
    tc = self.config.train
    p = state.params
    grads, (metrics, raw) = jax.grad(self.ae_terms, has_aux=True)(
        p["ae"], p["disc"], state.frozen, state.step, batch, rng)
    metrics["ae_grad_norm"] = optim.global_norm(grads)
    state = state_lib.update_subnet(state, "ae", self.tx["ae"], grads)

    on = (state.step >= me.disc_start).astype(jnp.float32)
    real = batch["image"].astype(jnp.float32)
    fake = jax.lax.stop_gradient(ae.to_model_space(raw, self.num_contrasts))

    def disc_loss(dp):
      return self.d_loss(self._logits(dp, real), self._logits(dp, fake))

    d, d_grads = jax.value_and_grad(disc_loss)(state.params["disc"])
    # Before disc_start the discriminator does not learn either: it would
    # otherwise win on blurry early reconstructions and start too strong.
    d_grads = jax.tree.map(lambda g: on * g, d_grads)
    state = state_lib.update_subnet(state, "disc", self.tx["disc"], d_grads)
    state = state_lib.advance(state, tc.ema, tc.ema_warmup)
    metrics.update(d_adv=d, loss=metrics["ae_loss"])
    return state, metrics

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """Reconstruction + perceptual + KL terms (the adversarial term is
    left out: it scores the discriminator as much as the autoencoder)."""
    p = state.params
    return self.ae_terms(p["ae"], p.get("disc"), state.frozen, state.step,
                         batch, rng, adversarial=False)[0]

  # -------------------------------------------------------- capabilities --

  def encode(self, state: TrainState, batch: Batch,
             rng: jax.Array) -> jax.Array:
    """Posterior means ``[B, *s, z_channels]`` (unscaled)."""
    del rng
    ae_params = state_lib.eval_params(state)["ae"]
    return self._posterior(ae_params, batch["image"].astype(jnp.float32))[0]

  def decode(self, state: TrainState, latents: jax.Array,
             cond: Optional[Batch] = None) -> Batch:
    """``{"image"}`` from (unscaled) latents ``[B, *s, z_channels]``."""
    if cond:
      raise ValueError("the KL autoencoder is unconditional; got cond "
                       f"{sorted(cond)}")
    raw = self._decode_raw(state_lib.eval_params(state)["ae"], latents)
    return {"image": ae.to_model_space(raw, self.num_contrasts)}

  def reconstruct(self, state: TrainState, batch: Batch,
                  rng: jax.Array) -> Batch:
    """The batch decoded from its posterior means."""
    return self.decode(state, self.encode(state, batch, rng))


def _load_perceptual(directory: str, contrasts: Tuple[str, ...],
                     spatial_dims: int):
  """The frozen in-domain classifier of ``directory`` (as the generative
  evaluator writes it: ``encoder.json`` + ``params/``) as
  ``(FrozenInputs, (ResNet, its input channels among contrasts))``."""
  params, settings, record = frozen_lib.load_encoder(directory)
  missing = [c for c in settings["inputs"] if c not in contrasts]
  if missing:
    raise frozen_lib.FrozenInputError(
        f"the perceptual network in {directory} reads contrasts {missing} "
        f"that data.contrasts {contrasts} lacks")
  model = classifier_lib.ResNet(
      num_classes=int(params["head"]["kernel"].shape[-1]),
      width=settings["width"], stage_sizes=tuple(settings["stage_sizes"]),
      num_groups=settings["num_groups"], spatial_dims=spatial_dims,
      conv_lowering="auto")
  inputs = [contrasts.index(c) for c in settings["inputs"]]
  return (frozen_lib.FrozenInputs({"perceptual": params},
                                  {"perceptual": record}), (model, inputs))


# --------------------------------------------------------------- config --

MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "num_groups",
              "mid_attention", "z_channels", "disc_ch", "disc_layers",
              "dtype", "conv_lowering")
METHOD_KEYS = ("name", "kl_weight", "reconstruction", "mask_weight",
               "perceptual_weight", "perceptual_net", "adv_weight",
               "adv_loss", "disc_start")


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``model`` and ``method`` sections."""
  errors: List[str] = []
  m, me = config.model, config.method
  if checks.section_keys(errors, "model", m, MODEL_KEYS,
                         "the KL autoencoder"):
    errors += unet_lib.pyramid_errors(m, config.data.res)
    for k in ("z_channels", "disc_ch", "disc_layers"):
      checks.positive(errors, f"model.{k}", m[k])
    if (isinstance(config.data.res, int) and isinstance(m.disc_layers, int)
        and config.data.res < 2 ** m.disc_layers):
      errors.append(f"model.disc_layers={m.disc_layers} halves data.res="
                    f"{config.data.res} below one patch")
  if checks.section_keys(errors, "method", me, METHOD_KEYS,
                         "autoencoder_kl"):
    for k in ("kl_weight", "mask_weight", "perceptual_weight", "adv_weight",
              "disc_start"):
      checks.positive(errors, f"method.{k}", me[k], allow_zero=True)
    checks.one_of(errors, "method.reconstruction", me.reconstruction,
                  ("l1", "mse"))
    checks.one_of(errors, "method.adv_loss", me.adv_loss,
                  ("hinge", "nonsaturating", "least_squares"))
    if me.perceptual_weight and not me.perceptual_net:
      errors.append("method.perceptual_weight > 0 needs method."
                    "perceptual_net: the directory of a trained in-domain "
                    "encoder (e.g. <workdir>/encoder of a --mode=eval run, "
                    "or a study's encoder/)")
  return errors


def resolve_auto(config: ml_collections.ConfigDict, workdir: str,
                 train_encoder: Callable[..., str],
                 train_run: Callable[..., str]) -> ml_collections.ConfigDict:
  """``config`` with ``method.perceptual_net="auto"`` replaced by
  ``<workdir>/perceptual_net``, trained there first (or reused) by
  ``train_encoder(section, directory)`` with the ``perceptual`` section."""
  del train_run
  me = config.method
  if not (me.perceptual_weight > 0 and me.perceptual_net == "auto"):
    return config
  directory = os.path.join(os.path.abspath(workdir), "perceptual_net")
  train_encoder(config.perceptual, directory)
  config = ml_collections.ConfigDict(config.to_dict())
  config.method.perceptual_net = directory
  return config


def make(config: ml_collections.ConfigDict,
         example_batch: Batch) -> AutoencoderKL:
  """Builds the method; the image shape comes from ``example_batch``."""
  return AutoencoderKL(config, tuple(example_batch["image"].shape[1:]))
