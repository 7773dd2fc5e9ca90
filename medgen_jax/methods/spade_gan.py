"""SPADE GAN: an image from a given mask (Park et al. 2019), so any real or
edited lesion mask yields a paired segmentation example.

The generator maps noise to the contrasts through SPADE normalisations
conditioned on the masks of ``data.mask_channels`` (e.g. the lesion mask);
a PatchGAN discriminator judges ``(image, mask)`` pairs with the hinge loss
(and an optional R1 penalty), one optimizer each, EMA of the generator. A
sample is the generated contrasts with the given masks as its mask
channels, so the mask travels with the image through the sampling module,
the evaluators and the study.

``sample`` needs ``cond={"mask": [num, *S, M]}`` (masks in {-1, 1} or {0,
1}); the sampling module supplies real masks of the data set when the
caller gives none (``sample_cond``).
"""

from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from medgen_jax import checks
from medgen_jax.methods import losses
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.nn import autoencoder as ae
from medgen_jax.nn import gan as gan_nn
from medgen_jax.nn import unet as unet_lib
from medgen_jax.train import optim
from medgen_jax.train import state as state_lib
from medgen_jax.train.state import TrainState

PyTree = Any


class SpadeGAN:
  """Mask-to-image GAN following :class:`~medgen_jax.methods.base.Method`,
  with ``sample`` (given masks).

  Attributes:
    config: the full experiment config.
    num_contrasts: ``C``; the last ``M`` model channels are the masks.
    sample_cond: ``("mask",)``: what ``sample`` needs in ``cond``.
  """

  sample_cond = ("mask",)

  def __init__(self, config: ml_collections.ConfigDict,
               image_shape: Tuple[int, ...]):
    self.config = config
    self.image_shape = tuple(image_shape)
    m, me = config.model, config.method
    self.num_contrasts = len(config.data.contrasts)
    spatial = self.image_shape[:-1]
    kw = dict(dtype=jnp.dtype(m.dtype), conv_lowering=m.conv_lowering)
    self.gen = gan_nn.SPADEGenerator(
        out_channels=self.num_contrasts, image_shape=spatial, ch=m.g_ch,
        ch_mult=tuple(m.g_ch_mult), num_groups=m.num_groups, **kw)
    self.disc = ae.PatchDiscriminator(ch=m.d_ch, num_layers=m.d_layers,
                                      num_groups=m.num_groups,
                                      spatial_dims=len(spatial), **kw)
    self.tx = optim.adversarial_optimizers(config.optim,
                                           config.train.num_steps,
                                           me.disc_lr_mult)
    self.d_adv, self.g_adv = losses.adversarial(me.loss)

  def _split(self, batch: Batch) -> Tuple[jax.Array, jax.Array]:
    x = batch["image"].astype(jnp.float32)
    return x[..., :self.num_contrasts], x[..., self.num_contrasts:]

  def _z(self, rng, num):
    return jax.random.normal(rng, (num, self.config.model.z_dim))

  def _generate(self, gen_params, z, mask):
    return self.gen.apply({"params": gen_params}, z, mask)

  def _logits(self, disc_params, image, mask):
    return self.disc.apply({"params": disc_params},
                           jnp.concatenate([image, mask], axis=-1))

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """``params = {"gen", "disc"}``; the EMA follows ``"gen"``."""
    k_gen, k_disc = jax.random.split(rng)
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    image, mask = x[..., :self.num_contrasts], x[..., self.num_contrasts:]
    params = {
        "gen": self.gen.init({"params": k_gen}, self._z(k_gen, 1),
                             mask)["params"],
        "disc": self.disc.init({"params": k_disc},
                               jnp.concatenate([image, mask], -1))["params"]}
    return state_lib.create_state(params, self.tx,
                                  use_ema=self.config.train.ema > 0,
                                  ema_of="gen")

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """A discriminator update, a generator update, EMA and ``step + 1``."""
    me, tc = self.config.method, self.config.train
    real, mask = self._split(batch)
    k_d, k_g = jax.random.split(rng)
    fake = jax.lax.stop_gradient(self._generate(
        state.params["gen"], self._z(k_d, real.shape[0]), mask))

    def d_loss(dp):
      real_logits = self._logits(dp, real, mask)
      fake_logits = self._logits(dp, fake, mask)
      loss = self.d_adv(real_logits, fake_logits)
      r1 = jnp.zeros((), jnp.float32)
      if me.r1_gamma > 0:
        # One score per example: the mean of its patch logits.
        r1 = losses.r1_penalty(
            lambda x: jnp.mean(self._logits(dp, x, mask),
                               axis=tuple(range(1, x.ndim))), real)
      return loss + 0.5 * me.r1_gamma * r1, (real_logits, fake_logits, r1)

    (d, (real_logits, fake_logits, r1)), d_grads = jax.value_and_grad(
        d_loss, has_aux=True)(state.params["disc"])
    state = state_lib.update_subnet(state, "disc", self.tx["disc"], d_grads)

    def g_loss(gp):
      out = self._generate(gp, self._z(k_g, real.shape[0]), mask)
      return self.g_adv(self._logits(state.params["disc"], out, mask))

    g, g_grads = jax.value_and_grad(g_loss)(state.params["gen"])
    state = state_lib.update_subnet(state, "gen", self.tx["gen"], g_grads)
    state = state_lib.advance(state, tc.ema, tc.ema_warmup)
    return state, {
        "loss": g, "g_loss": g, "d_loss": d, "penalty": r1,
        "d_real_acc": jnp.mean((real_logits > 0).astype(jnp.float32)),
        "d_fake_acc": jnp.mean((fake_logits < 0).astype(jnp.float32)),
        "d_grad_norm": optim.global_norm(d_grads),
        "g_grad_norm": optim.global_norm(g_grads)}

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """The discriminator's adversarial loss on held-out (image, mask)
    pairs against images generated for the same masks."""
    real, mask = self._split(batch)
    fake = self._generate(state.params["gen"], self._z(rng, real.shape[0]),
                          mask)
    return self.d_adv(self._logits(state.params["disc"], real, mask),
                      self._logits(state.params["disc"], fake, mask))

  def sample(self, state: TrainState, rng: jax.Array, num: int,
             cond: Optional[Batch] = None) -> Batch:
    """Images for the masks of ``cond["mask"] [num, *S, M]``.

    Returns:
      ``{"image": [num, *S, C + M]}``: generated contrasts and the given
      masks (in {-1, 1}) as mask channels.
    """
    cond = dict(cond or {})
    if "mask" not in cond or set(cond) - {"mask", "label"}:
      raise ValueError("the SPADE GAN samples from cond={'mask': [num, *S, "
                       f"M]}}; got {sorted(cond)}")
    mask = jnp.asarray(cond["mask"], jnp.float32)
    mask = mask if mask.ndim == len(self.image_shape) + 1 else mask[..., None]
    mask = jnp.where(mask > 0, 1.0, -1.0)
    gen = state_lib.eval_params(state)["gen"]
    image = self._generate(gen, self._z(rng, num), mask)
    out = {"image": jnp.concatenate([image, mask], axis=-1)}
    if "label" in cond:
      out["label"] = jnp.asarray(cond["label"], jnp.int32)
    return out


# --------------------------------------------------------------- config --

MODEL_KEYS = ("z_dim", "g_ch", "g_ch_mult", "d_ch", "d_layers", "num_groups",
              "dtype", "conv_lowering")
METHOD_KEYS = ("name", "loss", "r1_gamma", "disc_lr_mult")
SAMPLE_KEYS = ("num", "batch_size")


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``model``, ``method`` and ``sample`` sections, and a
  missing ``data.mask_channels``."""
  errors: List[str] = []
  m, me = config.model, config.method
  if not config.data.get("mask_channels"):
    errors.append("spade_gan needs data.mask_channels (the masks it draws "
                  "images for), e.g. ('lesion_mask',)")
  if config.data.cond:
    errors.append("spade_gan is conditioned on masks; set data.cond=''")
  if checks.section_keys(errors, "model", m, MODEL_KEYS, "spade_gan"):
    errors += unet_lib.translator_model_errors(m, config.data.res)
    checks.positive(errors, "model.z_dim", m.z_dim)
  if checks.section_keys(errors, "method", me, METHOD_KEYS, "spade_gan"):
    checks.one_of(errors, "method.loss", me.loss,
                  ("hinge", "nonsaturating", "least_squares"))
    checks.positive(errors, "method.r1_gamma", me.r1_gamma, allow_zero=True)
    checks.positive(errors, "method.disc_lr_mult", me.disc_lr_mult)
  checks.section_keys(errors, "sample", config.sample, SAMPLE_KEYS,
                      "spade_gan")
  return errors


def make(config: ml_collections.ConfigDict,
         example_batch: Batch) -> SpadeGAN:
  """Builds the method; the image shape comes from ``example_batch``."""
  return SpadeGAN(config, tuple(example_batch["image"].shape[1:]))
