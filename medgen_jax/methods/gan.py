"""GANs for few images: DCGAN-style, ACGAN and projection discriminators.

One method, ``method.name="gan"``; ``data.cond="label"`` makes it
class-conditional with ``method.head``:

- ``"none"``: an unconditional discriminator (DCGAN; the generator still
  takes labels when ``data.cond="label"``, which then only the sampler
  uses — prefer a head);
- ``"acgan"``: an auxiliary classifier on the discriminator's features,
  trained on real labels and asked by the generator to recognise the labels
  it drew (Odena et al. 2017);
- ``"projection"``: the label's embedding projected onto the features
  (Miyato & Koyama 2018).

For small data the discriminator sees every image through differentiable
augmentation (:func:`medgen_jax.nn.gan.diff_augment`, ``method.diff_augment``),
its layers are spectrally normalised (``method.spectral_norm``), and an R1
penalty (``method.r1_gamma``) or WGAN-GP (``method.gp_weight``) regularises
it; losses are non-saturating, hinge, least-squares or Wasserstein. The
discriminator has its own learning rate (TTUR: ``method.disc_lr_mult``) and
``method.disc_steps`` updates per trainer step; the EMA follows the generator
only. ``method.mode_seeking`` (Mao et al. 2019) keeps a conditional
generator from ignoring its latent and drawing one image per class. With ``data.mask_channels`` the generator emits the lesion mask as
extra channels and the discriminator judges image and mask together.

Every log line carries the stability signals: D and G losses, D accuracy
on real and fake images, both gradient norms and the penalty.
"""

from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medgen_jax import checks
from medgen_jax.methods import losses
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.nn import gan as gan_nn
from medgen_jax.nn import unet as unet_lib
from medgen_jax.train import optim
from medgen_jax.train import state as state_lib
from medgen_jax.train.state import TrainState

PyTree = Any


class GAN:
  """A GAN following :class:`~medgen_jax.methods.base.Method`, with
  ``sample``.

  Attributes:
    config: the full experiment config.
    image_shape: ``(*S, C + M)`` of one example (contrasts, then masks).
    num_classes: ``0`` unconditional, else the classes of the labels.
    gen, disc: the networks.
    tx: ``{"gen", "disc"}`` optimizers.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               image_shape: Tuple[int, ...]):
    self.config = config
    self.image_shape = tuple(image_shape)
    d, m, me = config.data, config.model, config.method
    self.num_classes = int(d.num_classes) if d.cond == "label" else 0
    spatial = self.image_shape[:-1]
    kw = dict(dtype=jnp.dtype(m.dtype), conv_lowering=m.conv_lowering)
    self.gen = gan_nn.Generator(
        out_channels=self.image_shape[-1], image_shape=spatial, ch=m.g_ch,
        ch_mult=tuple(m.g_ch_mult), num_groups=m.num_groups,
        num_classes=self.num_classes, **kw)
    self.disc = gan_nn.Discriminator(
        ch=m.d_ch, ch_mult=tuple(m.d_ch_mult), spectral=me.spectral_norm,
        num_classes=self.num_classes,
        head=me.head if self.num_classes else "none",
        spatial_dims=len(spatial), **kw)
    self.tx = optim.adversarial_optimizers(config.optim,
                                           config.train.num_steps,
                                           me.disc_lr_mult)
    self.d_adv, self.g_adv = losses.adversarial(me.loss)

  # ------------------------------------------------------------- pieces --

  def _z(self, rng: jax.Array, num: int) -> jax.Array:
    return jax.random.normal(rng, (num, self.config.model.z_dim), jnp.float32)

  def _fake_labels(self, rng: jax.Array, num: int) -> Optional[jax.Array]:
    if not self.num_classes:
      return None
    return jax.random.randint(rng, (num,), 0, self.num_classes)

  def _generate(self, gen_params, z, y) -> jax.Array:
    return self.gen.apply({"params": gen_params}, z, y)

  def _augment(self, x: jax.Array, rng: jax.Array) -> jax.Array:
    policy = tuple(self.config.method.diff_augment)
    return gan_nn.diff_augment(x, rng, policy) if policy else x

  def _disc(self, disc_params, spectral, x, y, update: bool = False):
    """``(logits, class_logits, spectral)``; the power iteration advances
    only with ``update``."""
    variables = {"params": disc_params, "spectral": spectral}
    if update:
      (logits, cls), new = self.disc.apply(variables, x, y, True,
                                           mutable=["spectral"])
      return logits, cls, new["spectral"]
    logits, cls = self.disc.apply(variables, x, y, False)
    return logits, cls, spectral

  def _class_loss(self, class_logits, y) -> jax.Array:
    if class_logits is None:
      return jnp.zeros((), jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        class_logits.astype(jnp.float32), y))

  # ---------------------------------------------------------- the steps --

  def d_terms(self, disc_params, spectral, real, y_real, fake, y_fake,
              rng: jax.Array, update: bool = True
              ) -> Tuple[jax.Array, Tuple[Dict[str, jax.Array], PyTree]]:
    """The discriminator's loss on augmented real and fake examples, its
    stability signals and the advanced spectral state."""
    me = self.config.method
    k_real, k_fake, k_gp = jax.random.split(rng, 3)
    real_aug = self._augment(real, k_real)
    fake_aug = self._augment(fake, k_fake)
    y_disc_real = y_real if me.head == "projection" else None
    y_disc_fake = y_fake if me.head == "projection" else None
    real_logits, real_cls, spectral = self._disc(disc_params, spectral,
                                                 real_aug, y_disc_real, update)
    fake_logits, fake_cls, spectral = self._disc(disc_params, spectral,
                                                 fake_aug, y_disc_fake, update)
    adv = self.d_adv(real_logits, fake_logits)
    cls = (self._class_loss(real_cls, y_real) +
           self._class_loss(fake_cls, y_fake)) if self.num_classes else 0.0

    def critic(x, yy):
      return self._disc(disc_params, spectral, x, yy)[0]

    penalty = jnp.zeros((), jnp.float32)
    if me.r1_gamma > 0:
      r1 = losses.r1_penalty(lambda x: critic(x, y_disc_real), real_aug)
      penalty += 0.5 * me.r1_gamma * r1
    if me.gp_weight > 0:
      gp = losses.gradient_penalty(lambda x: critic(x, y_disc_real),
                                   real_aug, fake_aug, k_gp)
      penalty += me.gp_weight * gp
    loss = adv + me.class_weight * cls + penalty
    signals = {"d_loss": loss, "d_adv": adv, "penalty": penalty,
               "d_real_acc": jnp.mean((real_logits > 0).astype(jnp.float32)),
               "d_fake_acc": jnp.mean((fake_logits < 0).astype(jnp.float32))}
    if self.num_classes and me.head == "acgan":
      signals["d_class_loss"] = cls
    return loss, (signals, spectral)

  def g_terms(self, gen_params, disc_params, spectral, z, y_fake,
              rng: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The generator's loss through the (augmented) discriminator."""
    me = self.config.method
    fake = self._generate(gen_params, z, y_fake)
    y_disc = y_fake if me.head == "projection" else None
    logits, cls, _ = self._disc(disc_params, spectral,
                                self._augment(fake, rng), y_disc)
    adv = self.g_adv(logits)
    loss = adv + me.class_weight * self._class_loss(cls, y_fake)
    signals = {"g_adv": adv}
    if me.mode_seeking > 0:
      # train_step pairs the labels: example i and i + h share one.
      h = z.shape[0] // 2
      ms = losses.mode_seeking(fake[:h], fake[h:2 * h], z[:h], z[h:2 * h])
      loss += me.mode_seeking * ms
      signals["mode_seeking"] = ms
    return loss, {"g_loss": loss, **signals}

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """``params = {"gen", "disc"}``; the spectral vectors in
    ``model_state``; the EMA follows ``"gen"``."""
    k_gen, k_disc = jax.random.split(rng)
    z = jnp.zeros((1, self.config.model.z_dim), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    gen_params = self.gen.init({"params": k_gen}, z, y)["params"]
    disc_vars = self.disc.init({"params": k_disc}, x, y)
    params = {"gen": gen_params, "disc": disc_vars["params"]}
    return state_lib.create_state(
        params, self.tx, use_ema=self.config.train.ema > 0,
        model_state={"spectral": disc_vars.get("spectral", {})},
        ema_of="gen")

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """``method.disc_steps`` discriminator updates, one generator update,
    then EMA and ``step + 1``; pure and jit-able."""
    me, tc = self.config.method, self.config.train
    real = batch["image"].astype(jnp.float32)
    b = real.shape[0]
    y_real = (batch["label"].astype(jnp.int32) if self.num_classes else None)
    spectral = state.model_state["spectral"]
    signals: Dict[str, jax.Array] = {}
    for k in range(me.disc_steps):
      k_z, k_y, k_d = jax.random.split(jax.random.fold_in(rng, k), 3)
      y_fake = self._fake_labels(k_y, b)
      fake = jax.lax.stop_gradient(self._generate(
          state.params["gen"], self._z(k_z, b), y_fake))
      grads, (signals, spectral) = jax.grad(self.d_terms, has_aux=True)(
          state.params["disc"], spectral, real, y_real, fake, y_fake, k_d)
      signals["d_grad_norm"] = optim.global_norm(grads)
      state = state_lib.update_subnet(state, "disc", self.tx["disc"], grads)
    k_z, k_y, k_aug = jax.random.split(
        jax.random.fold_in(rng, me.disc_steps), 3)
    y_fake = self._fake_labels(k_y, b)
    if me.mode_seeking > 0 and y_fake is not None:
      h = b // 2
      y_fake = y_fake.at[h:2 * h].set(y_fake[:h])
    grads, g_signals = jax.grad(self.g_terms, has_aux=True)(
        state.params["gen"], state.params["disc"], spectral,
        self._z(k_z, b), y_fake, k_aug)
    g_signals["g_grad_norm"] = optim.global_norm(grads)
    state = state_lib.update_subnet(state, "gen", self.tx["gen"], grads)
    state = state_lib.advance(state, tc.ema, tc.ema_warmup,
                              model_state={"spectral": spectral})
    return state, {"loss": g_signals["g_loss"], **signals, **g_signals}

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """The discriminator's adversarial loss on ``batch`` (real, no
    augmentation) against fresh samples: on held-out images, a value far
    below the training one means the discriminator memorised its reals."""
    real = batch["image"].astype(jnp.float32)
    b = real.shape[0]
    k_z, k_y = jax.random.split(rng)
    y_fake = self._fake_labels(k_y, b)
    fake = self._generate(state.params["gen"], self._z(k_z, b), y_fake)
    proj = self.config.method.head == "projection" and self.num_classes
    y_real = batch["label"].astype(jnp.int32) if proj else None
    spectral = state.model_state["spectral"]
    real_logits = self._disc(state.params["disc"], spectral, real, y_real)[0]
    fake_logits = self._disc(state.params["disc"], spectral, fake,
                             y_fake if proj else None)[0]
    return self.d_adv(real_logits, fake_logits)

  # -------------------------------------------------------- capabilities --

  def sample(self, state: TrainState, rng: jax.Array, num: int,
             cond: Optional[Batch] = None) -> Batch:
    """``num`` samples from the EMA generator.

    Returns:
      ``{"image": [num, *S, C + M] in (-1, 1)}`` plus ``"label"`` when
      conditional (``cond["label"]`` or balanced ``i % num_classes``).
    """
    cond = dict(cond or {})
    extra = sorted(set(cond) - {"label"})
    if extra:
      raise ValueError(f"the GAN samples from labels only; got {extra}")
    y = None
    if self.num_classes:
      y = (jnp.asarray(cond["label"], jnp.int32) if "label" in cond else
           jnp.arange(num, dtype=jnp.int32) % self.num_classes)
    elif "label" in cond:
      raise ValueError("labels given to an unconditional GAN")
    gen_params = state_lib.eval_params(state)["gen"]
    out = {"image": self._generate(gen_params, self._z(rng, num), y)}
    if y is not None:
      out["label"] = y
    return out


# --------------------------------------------------------------- config --

MODEL_KEYS = ("z_dim", "g_ch", "g_ch_mult", "d_ch", "d_ch_mult",
              "num_groups", "dtype", "conv_lowering")
METHOD_KEYS = ("name", "loss", "head", "spectral_norm", "diff_augment",
               "r1_gamma", "gp_weight", "class_weight", "mode_seeking",
               "disc_steps", "disc_lr_mult")
SAMPLE_KEYS = ("num", "batch_size")


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``model``, ``method`` and ``sample`` sections."""
  errors: List[str] = []
  m, me, s = config.model, config.method, config.sample
  if checks.section_keys(errors, "model", m, MODEL_KEYS, "the GAN"):
    for prefix, ch, mult in (("g", m.g_ch, m.g_ch_mult),
                             ("d", m.d_ch, m.d_ch_mult)):
      errors += unet_lib.pyramid_errors(
          dict(ch=ch, ch_mult=mult, num_groups=m.num_groups, dtype=m.dtype,
               conv_lowering=m.conv_lowering), config.data.res,
          prefix=f"model.{prefix}")
    checks.positive(errors, "model.z_dim", m.z_dim)
  if checks.section_keys(errors, "method", me, METHOD_KEYS, "gan"):
    checks.one_of(errors, "method.loss", me.loss, losses.ADVERSARIAL_LOSSES)
    checks.one_of(errors, "method.head", me.head,
                  ("none", "acgan", "projection"))
    for p in me.diff_augment:
      checks.one_of(errors, "method.diff_augment entry", p,
                    gan_nn.DIFF_AUGMENT_POLICIES)
    for k in ("r1_gamma", "gp_weight", "class_weight", "mode_seeking"):
      checks.positive(errors, f"method.{k}", me[k], allow_zero=True)
    checks.positive(errors, "method.disc_steps", me.disc_steps)
    checks.positive(errors, "method.disc_lr_mult", me.disc_lr_mult)
    if me.head != "none" and config.data.cond != "label":
      errors.append(f"method.head={me.head!r} needs data.cond='label'")
    if me.loss == "wasserstein" and not me.gp_weight:
      errors.append("method.loss='wasserstein' needs method.gp_weight > 0 "
                    "(an unconstrained critic diverges)")
  checks.section_keys(errors, "sample", s, SAMPLE_KEYS, "gan")
  return errors


def make(config: ml_collections.ConfigDict, example_batch: Batch) -> GAN:
  """Builds the method; the image shape comes from ``example_batch``."""
  return GAN(config, tuple(example_batch["image"].shape[1:]))
