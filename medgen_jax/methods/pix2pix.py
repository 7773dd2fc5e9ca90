"""pix2pix: paired image-to-image translation (Isola et al. 2017), e.g.
T1w -> T2w or T1w -> FLAIR, or any contrast pair of a user's data set.

A U-Net generator maps the source contrasts to the target contrasts; a
PatchGAN discriminator judges ``(source, target)`` pairs patch by patch.
The generator's loss is ``l1_weight * |G(source) - target|_1`` plus the
adversarial term; the discriminator has its own optimizer (and learning
rate, ``method.disc_lr_mult``) in the same trainer step, and the EMA
follows the generator.

Which contrasts are source and target is the config's ``translation``
section (``source``, ``target``: names of ``data.contrasts``), which the
``translation`` evaluator reads too; batches carry all contrasts, the
method picks its channels.
"""

from typing import Any, List, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from medgen_jax import checks
from medgen_jax.methods import losses
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.nn import autoencoder as ae
from medgen_jax.nn import segmenter
from medgen_jax.nn import unet as unet_lib
from medgen_jax.train import optim
from medgen_jax.train import state as state_lib
from medgen_jax.train.state import TrainState

PyTree = Any


def channels(config: ml_collections.ConfigDict) -> Tuple[List[int], List[int]]:
  """Indices of ``translation.source`` and ``translation.target`` in
  ``data.contrasts``."""
  contrasts = list(config.data.contrasts)
  t = config.translation
  return ([contrasts.index(c) for c in t.source],
          [contrasts.index(c) for c in t.target])


class Pix2Pix:
  """pix2pix following :class:`~medgen_jax.methods.base.Method`, with
  ``translate``.

  Attributes:
    config: the full experiment config.
    source, target: channel indices of the source and target contrasts.
    gen, disc: U-Net generator and PatchGAN discriminator.
    tx: ``{"gen", "disc"}`` optimizers.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               image_shape: Tuple[int, ...]):
    self.config = config
    self.image_shape = tuple(image_shape)
    m, me = config.model, config.method
    self.source, self.target = channels(config)
    dims = len(self.image_shape) - 1
    kw = dict(spatial_dims=dims, dtype=jnp.dtype(m.dtype),
              conv_lowering=m.conv_lowering)
    self.gen = segmenter.SegUNet(out_channels=len(self.target), ch=m.g_ch,
                                 ch_mult=tuple(m.g_ch_mult),
                                 num_groups=m.num_groups, **kw)
    self.disc = ae.PatchDiscriminator(ch=m.d_ch, num_layers=m.d_layers,
                                      num_groups=m.num_groups, **kw)
    self.tx = optim.adversarial_optimizers(config.optim,
                                           config.train.num_steps,
                                           me.disc_lr_mult)
    self.d_adv, self.g_adv = losses.adversarial(me.loss)

  def _split(self, batch: Batch) -> Tuple[jax.Array, jax.Array]:
    x = batch["image"].astype(jnp.float32)
    return x[..., self.source], x[..., self.target]

  def _translate(self, gen_params, src: jax.Array) -> jax.Array:
    return jnp.tanh(self.gen.apply({"params": gen_params}, src))

  def _logits(self, disc_params, src, tgt) -> jax.Array:
    return self.disc.apply({"params": disc_params},
                           jnp.concatenate([src, tgt], axis=-1))

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """``params = {"gen", "disc"}``; the EMA follows ``"gen"``."""
    k_gen, k_disc = jax.random.split(rng)
    src = jnp.zeros((1,) + self.image_shape[:-1] + (len(self.source),))
    pair = jnp.zeros((1,) + self.image_shape[:-1] +
                     (len(self.source) + len(self.target),))
    params = {"gen": self.gen.init({"params": k_gen}, src)["params"],
              "disc": self.disc.init({"params": k_disc}, pair)["params"]}
    return state_lib.create_state(params, self.tx,
                                  use_ema=self.config.train.ema > 0,
                                  ema_of="gen")

  def g_terms(self, gen_params, disc_params, src, tgt
              ) -> Tuple[jax.Array, Tuple[Metrics, jax.Array]]:
    me = self.config.method
    fake = self._translate(gen_params, src)
    l1 = jnp.mean(jnp.abs(fake - tgt))
    adv = self.g_adv(self._logits(disc_params, src, fake))
    loss = me.l1_weight * l1 + adv
    return loss, ({"g_loss": loss, "l1": l1, "g_adv": adv}, fake)

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """A generator update, a discriminator update on the translations it
    was scored on, then EMA and ``step + 1``; pure and jit-able."""
    del rng
    tc = self.config.train
    src, tgt = self._split(batch)
    p = state.params
    grads, (metrics, fake) = jax.grad(self.g_terms, has_aux=True)(
        p["gen"], p["disc"], src, tgt)
    metrics["g_grad_norm"] = optim.global_norm(grads)
    state = state_lib.update_subnet(state, "gen", self.tx["gen"], grads)
    fake = jax.lax.stop_gradient(fake)

    def d_loss(dp):
      real_logits = self._logits(dp, src, tgt)
      fake_logits = self._logits(dp, src, fake)
      return self.d_adv(real_logits, fake_logits), (real_logits, fake_logits)

    (d, (real_logits, fake_logits)), d_grads = jax.value_and_grad(
        d_loss, has_aux=True)(state.params["disc"])
    state = state_lib.update_subnet(state, "disc", self.tx["disc"], d_grads)
    state = state_lib.advance(state, tc.ema, tc.ema_warmup)
    metrics.update(
        loss=metrics["l1"], d_loss=d, d_grad_norm=optim.global_norm(d_grads),
        d_real_acc=jnp.mean((real_logits > 0).astype(jnp.float32)),
        d_fake_acc=jnp.mean((fake_logits < 0).astype(jnp.float32)))
    return state, metrics

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """Mean absolute error of the translation (the paired objective)."""
    del rng
    src, tgt = self._split(batch)
    return jnp.mean(jnp.abs(self._translate(state.params["gen"], src) - tgt))

  def translate(self, state: TrainState, batch: Batch,
                rng: jax.Array) -> Batch:
    """``{"image": [B, *S, len(target)]}`` from ``batch["source"] [B, *S,
    len(source)]`` with the EMA generator."""
    del rng
    gen = state_lib.eval_params(state)["gen"]
    return {"image": self._translate(gen, batch["source"].astype(jnp.float32))}


# --------------------------------------------------------------- config --

MODEL_KEYS = ("g_ch", "g_ch_mult", "d_ch", "d_layers", "num_groups", "dtype",
              "conv_lowering")
METHOD_KEYS = ("name", "l1_weight", "loss", "disc_lr_mult")


def translation_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``translation`` section (source and target
  contrasts)."""
  t = config.get("translation")
  if t is None:
    return ["a translation method needs a translation section "
            "(source=..., target=...)"]
  errors: List[str] = []
  for k in ("source", "target"):
    if not t.get(k):
      errors.append(f"translation.{k} is empty")
    for c in t.get(k, ()):
      if c not in config.data.contrasts:
        errors.append(f"translation.{k}: {c!r} is not in data.contrasts "
                      f"{tuple(config.data.contrasts)}")
  both = set(t.get("source", ())) & set(t.get("target", ()))
  if both:
    errors.append(f"translation: {sorted(both)} are both source and target")
  return errors


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``model``, ``method`` and ``translation`` sections."""
  errors = translation_errors(config)
  m, me = config.model, config.method
  if checks.section_keys(errors, "model", m, MODEL_KEYS, "pix2pix"):
    errors += unet_lib.translator_model_errors(m, config.data.res)
  if checks.section_keys(errors, "method", me, METHOD_KEYS, "pix2pix"):
    checks.positive(errors, "method.l1_weight", me.l1_weight, allow_zero=True)
    checks.one_of(errors, "method.loss", me.loss,
                  ("nonsaturating", "hinge", "least_squares"))
    checks.positive(errors, "method.disc_lr_mult", me.disc_lr_mult)
  return errors


def make(config: ml_collections.ConfigDict, example_batch: Batch) -> Pix2Pix:
  """Builds the method; the image shape comes from ``example_batch``."""
  return Pix2Pix(config, tuple(example_batch["image"].shape[1:]))
