"""VAE-GAN with an auxiliary-classifier discriminator (CAE-ACGAN-like:
Larsen et al. 2016; Odena et al. 2017), for generation and translation.

A (class-conditional) VAE whose decoder is also trained adversarially
against a discriminator that tells real from decoded images and classifies
them (lesion present / absent), which sharpens the VAE's blurry decodes and
keeps the class visible in them.

- Without a ``translation`` section it is a generator: the encoder sees the
  image, the decoder rebuilds it; ``sample`` decodes ``z ~ N(0, I)`` for a
  class, ``reconstruct`` rebuilds an image.
- With ``translation`` (``source``/``target`` contrasts) it is a
  translator: the encoder sees the source contrasts, the decoder emits the
  target ones, the reconstruction term compares them with the real targets
  and the discriminator judges ``(source, target)`` pairs; ``translate``
  maps a source image.

Loss of the autoencoder: ``rec_weight * L1`` + ``kl_weight * KL`` +
``adv_weight * adversarial`` + ``class_weight * class cross-entropy`` of
the decodes; the discriminator learns real/fake and the real labels with its
own optimizer in the same trainer step; the EMA follows the autoencoder.
"""

from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medgen_jax import checks
from medgen_jax.methods import losses
from medgen_jax.methods import pix2pix
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.methods.vae import bottom_shape, pyramid_kwargs
from medgen_jax.nn import autoencoder as ae
from medgen_jax.nn import gan as gan_nn
from medgen_jax.nn import unet as unet_lib
from medgen_jax.train import optim
from medgen_jax.train import state as state_lib
from medgen_jax.train.state import TrainState

PyTree = Any


class VAEGAN:
  """The VAE-GAN's shared step, following
  :class:`~medgen_jax.methods.base.Method`; :class:`VAEGANGenerator` adds
  ``sample`` and ``reconstruct``, :class:`VAEGANTranslator` ``translate``.

  Attributes:
    config: the full experiment config.
    translating: whether the config names source and target contrasts.
    inputs, outputs: channel indices the encoder reads and the decoder
      writes (all channels when generating).
    num_classes: classes of the decoder and the auxiliary classifier.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               image_shape: Tuple[int, ...]):
    self.config = config
    self.image_shape = tuple(image_shape)
    m = config.model
    self.translating = bool(config.get("translation"))
    if self.translating:
      self.inputs, self.outputs = pix2pix.channels(config)
    else:
      self.inputs = self.outputs = list(range(self.image_shape[-1]))
    self.num_classes = int(config.data.num_classes)
    spatial = self.image_shape[:-1]
    base = bottom_shape(spatial, m)
    # A translator's decoder sees no class: at translation time there is
    # none to give; its discriminator still classifies.
    kw = pyramid_kwargs(m, len(spatial),
                        0 if self.translating else self.num_classes)
    self.latent_shape = (m.z_dim,)
    self.encoder = ae.Encoder(out_channels=m.bottleneck,
                              vector_dim=2 * m.z_dim,
                              **dict(kw, num_classes=0))
    self.decoder = ae.Decoder(out_channels=len(self.outputs),
                              vector_dim=m.z_dim, base_shape=base,
                              latent_channels=m.bottleneck, **kw)
    self.disc = gan_nn.Discriminator(
        ch=m.d_ch, ch_mult=tuple(m.d_ch_mult), spectral=True,
        num_classes=self.num_classes, head="acgan",
        spatial_dims=len(spatial), dtype=jnp.dtype(m.dtype),
        conv_lowering=m.conv_lowering)
    steps = config.train.num_steps
    self.tx = {"ae": optim.make_optimizer(config.optim, steps),
               "disc": optim.make_optimizer(config.optim, steps)}
    self.d_adv, self.g_adv = losses.adversarial(config.method.loss)

  # ------------------------------------------------------------- pieces --

  def _io(self, batch: Batch) -> Tuple[jax.Array, jax.Array, jax.Array]:
    x = batch["image"].astype(jnp.float32)
    return x[..., self.inputs], x[..., self.outputs], batch["label"].astype(
        jnp.int32)

  def _posterior(self, params, x):
    h = self.encoder.apply({"params": params["encoder"]}, x)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def _decode(self, params, z, y):
    y = None if self.translating else y
    return jnp.tanh(self.decoder.apply({"params": params["decoder"]}, z, y))

  def _judge(self, disc_params, spectral, src, out, update=False):
    """``(logits, class_logits, spectral)`` of decoded or real outputs
    (paired with their sources when translating)."""
    x = jnp.concatenate([src, out], -1) if self.translating else out
    variables = {"params": disc_params, "spectral": spectral}
    if update:
      (logits, cls), new = self.disc.apply(variables, x, None, True,
                                           mutable=["spectral"])
      return logits, cls, new["spectral"]
    logits, cls = self.disc.apply(variables, x, None, False)
    return logits, cls, spectral

  def _ce(self, logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), y))

  # ---------------------------------------------------------- the step --

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """``params = {"ae": {encoder, decoder}, "disc"}``; spectral vectors
    in ``model_state``; the EMA follows ``"ae"``."""
    keys = jax.random.split(rng, 3)
    spatial = self.image_shape[:-1]
    x = jnp.zeros((1,) + spatial + (len(self.inputs),))
    y = None if self.translating else jnp.zeros((1,), jnp.int32)
    z = jnp.zeros((1, self.config.model.z_dim))
    out = jnp.zeros((1,) + spatial + (len(self.outputs),))
    d_in = jnp.concatenate([x, out], -1) if self.translating else out
    disc_vars = self.disc.init({"params": keys[2]}, d_in)
    params = {"ae": {"encoder": self.encoder.init({"params": keys[0]},
                                                  x)["params"],
                     "decoder": self.decoder.init({"params": keys[1]}, z,
                                                  y)["params"]},
              "disc": disc_vars["params"]}
    return state_lib.create_state(
        params, self.tx, use_ema=self.config.train.ema > 0,
        model_state={"spectral": disc_vars.get("spectral", {})},
        ema_of="ae")

  def ae_terms(self, ae_params, disc_params, spectral, batch, rng,
               adversarial: bool = True):
    me = self.config.method
    src, tgt, y = self._io(batch)
    k_z, k_prior = jax.random.split(rng)
    mean, logvar = self._posterior(ae_params, src)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_z, mean.shape)
    rec = self._decode(ae_params, z, y)
    l1 = jnp.mean(jnp.abs(rec - tgt))
    kl = jnp.mean(jnp.sum(losses.kl_diag_gaussian(mean, logvar), axis=-1))
    loss = me.rec_weight * l1 + me.kl_weight * kl
    metrics = {"l1": l1, "kl": kl}
    fakes = rec
    if adversarial:
      # Decodes of posterior and of prior draws both face the judge.
      prior = self._decode(ae_params, jax.random.normal(k_prior, z.shape), y)
      fakes = jnp.concatenate([rec, prior])
      srcs = jnp.concatenate([src, src])
      logits, cls, _ = self._judge(disc_params, spectral, srcs, fakes)
      adv = self.g_adv(logits)
      ce = self._ce(cls, jnp.concatenate([y, y]))
      loss += me.adv_weight * adv + me.class_weight * ce
      metrics.update(g_adv=adv, g_class=ce)
    metrics["ae_loss"] = loss
    return loss, (metrics, jax.lax.stop_gradient(fakes))

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """An autoencoder update, a discriminator update on its decodes, EMA
    and ``step + 1``; pure and jit-able."""
    tc = self.config.train
    k_ae, _ = jax.random.split(rng)
    spectral = state.model_state["spectral"]
    p = state.params
    grads, (metrics, fakes) = jax.grad(self.ae_terms, has_aux=True)(
        p["ae"], p["disc"], spectral, batch, k_ae)
    metrics["ae_grad_norm"] = optim.global_norm(grads)
    state = state_lib.update_subnet(state, "ae", self.tx["ae"], grads)
    src, tgt, y = self._io(batch)

    def d_loss(dp):
      real_logits, real_cls, sp = self._judge(dp, spectral, src, tgt, True)
      fake_logits, _, sp = self._judge(dp, sp, jnp.concatenate([src, src]),
                                       fakes, True)
      loss = (self.d_adv(real_logits, fake_logits) +
              self.config.method.class_weight * self._ce(real_cls, y))
      return loss, (sp, real_logits, fake_logits)

    (d, (spectral, real_logits, fake_logits)), d_grads = jax.value_and_grad(
        d_loss, has_aux=True)(state.params["disc"])
    state = state_lib.update_subnet(state, "disc", self.tx["disc"], d_grads)
    state = state_lib.advance(state, tc.ema, tc.ema_warmup,
                              model_state={"spectral": spectral})
    metrics.update(
        loss=metrics["ae_loss"], d_loss=d,
        d_grad_norm=optim.global_norm(d_grads),
        d_real_acc=jnp.mean((real_logits > 0).astype(jnp.float32)),
        d_fake_acc=jnp.mean((fake_logits < 0).astype(jnp.float32)))
    return state, metrics

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """The reconstruction (or translation) L1 + KL terms."""
    p = state.params
    return self.ae_terms(p["ae"], p["disc"], state.model_state["spectral"],
                         batch, rng, adversarial=False)[0]



class VAEGANGenerator(VAEGAN):
  """The generator: ``sample`` for a class and ``reconstruct``."""

  def sample(self, state: TrainState, rng: jax.Array, num: int,
             cond: Optional[Batch] = None) -> Batch:
    """``z ~ N(0, I)`` decoded for ``cond["label"]`` (balanced ``i %
    num_classes`` without)."""
    cond = dict(cond or {})
    if set(cond) - {"label"}:
      raise ValueError(f"the VAE-GAN samples from labels only; got "
                       f"{sorted(cond)}")
    y = (jnp.asarray(cond["label"], jnp.int32) if "label" in cond else
         jnp.arange(num, dtype=jnp.int32) % self.num_classes)
    z = jax.random.normal(rng, (num,) + self.latent_shape)
    return {"image": self._decode(state_lib.eval_params(state)["ae"], z, y),
            "label": y}

  def reconstruct(self, state: TrainState, batch: Batch,
                  rng: jax.Array) -> Batch:
    """The decode of the posterior mean, with the batch's labels."""
    del rng
    src, _, y = self._io(batch)
    params = state_lib.eval_params(state)["ae"]
    return {"image": self._decode(params, self._posterior(params, src)[0], y)}


class VAEGANTranslator(VAEGAN):
  """The translator: ``translate`` source contrasts to target ones."""

  def translate(self, state: TrainState, batch: Batch,
                rng: jax.Array) -> Batch:
    """Targets decoded from ``batch["source"]``'s posterior mean."""
    del rng
    params = state_lib.eval_params(state)["ae"]
    src = batch["source"].astype(jnp.float32)
    return {"image": self._decode(params, self._posterior(params, src)[0],
                                  None)}


# --------------------------------------------------------------- config --

MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "num_groups",
              "mid_attention", "z_dim", "bottleneck", "d_ch", "d_ch_mult",
              "dtype", "conv_lowering")
METHOD_KEYS = ("name", "rec_weight", "kl_weight", "adv_weight",
               "class_weight", "loss")


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``model``, ``method`` (and ``translation``)
  sections."""
  errors: List[str] = []
  if config.get("translation"):
    errors += pix2pix.translation_errors(config)
  if not (isinstance(config.data.num_classes, int) and
          config.data.num_classes >= 2):
    errors.append("vaegan's auxiliary classifier needs data.num_classes "
                  ">= 2 (labels)")
  m, me = config.model, config.method
  if checks.section_keys(errors, "model", m, MODEL_KEYS, "vaegan"):
    errors += unet_lib.pyramid_errors(m, config.data.res)
    for k in ("z_dim", "bottleneck", "d_ch"):
      checks.positive(errors, f"model.{k}", m[k])
  if checks.section_keys(errors, "method", me, METHOD_KEYS, "vaegan"):
    for k in ("rec_weight", "kl_weight", "adv_weight", "class_weight"):
      checks.positive(errors, f"method.{k}", me[k], allow_zero=True)
    checks.one_of(errors, "method.loss", me.loss,
                  ("nonsaturating", "hinge", "least_squares"))
  return errors


def make(config: ml_collections.ConfigDict, example_batch: Batch) -> VAEGAN:
  """The translator with a ``translation`` section, else the generator;
  the image shape comes from ``example_batch``."""
  cls = VAEGANTranslator if config.get("translation") else VAEGANGenerator
  return cls(config, tuple(example_batch["image"].shape[1:]))
