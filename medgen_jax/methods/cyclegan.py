"""CycleGAN: unpaired translation between contrasts (Zhu et al. 2017).

Two generators (``ab``: source -> target, ``ba``: target -> source) and two
PatchGAN discriminators (``a`` judges source-domain images, ``b``
target-domain ones). Batches are unpaired: ``data.unpaired`` makes the
batcher add ``image_b`` from *other subjects* than ``image``, and the method
takes the source contrasts of ``image`` and the target contrasts of
``image_b``, so it never sees a subject in both domains at once.

Generator loss: least-squares adversarial terms of both directions +
``cycle_weight * (|ba(ab(a)) - a| + |ab(ba(b)) - b|)`` + ``identity_weight
* cycle_weight * (|ab(b) - b| + |ba(a) - a|)`` (the identity term needs as
many source as target contrasts). The discriminators learn from a history
of generated images (an image pool of ``method.pool_size``, Shrivastava et
al. 2017), kept in ``state.model_state``. One optimizer for both generators,
one for both discriminators; the EMA follows the generators.
"""

from typing import Any, List, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from medgen_jax import checks
from medgen_jax.methods import losses
from medgen_jax.methods import pix2pix
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.nn import autoencoder as ae
from medgen_jax.nn import segmenter
from medgen_jax.nn import unet as unet_lib
from medgen_jax.train import optim
from medgen_jax.train import state as state_lib
from medgen_jax.train.state import TrainState

PyTree = Any


def pool_query(pool: jax.Array, count: jax.Array, fakes: jax.Array,
               rng: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The image-pool step of CycleGAN, with fixed shapes.

  While the pool fills, every fake goes in and is returned as it is; once
  full, each fake is returned with probability 1/2, otherwise a random pool
  image is returned and the fake takes its place.

  Args:
    pool: ``[P, *S, C]`` stored fakes (the first ``count`` are valid).
    count: int32 scalar, images stored so far (at most ``P``).
    fakes: ``[B, *S, C]`` this step's fakes.
    rng: key.

  Returns:
    ``(images for the discriminator [B, *S, C], pool, count)``.
  """
  size, b = pool.shape[0], fakes.shape[0]
  k_swap, k_pick = jax.random.split(rng)

  def one(carry, inputs):
    pool, count = carry
    fake, swap_key, pick_key = inputs
    filling = count < size
    swap = jax.random.bernoulli(swap_key) & ~filling
    slot = jnp.where(filling, count,
                     jax.random.randint(pick_key, (), 0, size))
    old = pool[slot]
    out = jnp.where(swap, old, fake)
    # Filling: store the fake; full: the fake replaces what it returned.
    pool = jnp.where(filling | swap, pool.at[slot].set(fake), pool)
    return (pool, jnp.minimum(count + 1, size)), out

  (pool, count), out = jax.lax.scan(
      one, (pool, count), (jax.lax.stop_gradient(fakes),
                           jax.random.split(k_swap, b),
                           jax.random.split(k_pick, b)))
  return out, pool, count


class CycleGAN:
  """CycleGAN following :class:`~medgen_jax.methods.base.Method`, with
  ``translate`` (source -> target).

  Attributes:
    config: the full experiment config.
    source, target: channel indices (``translation`` section).
    gen_ab, gen_ba, disc_a, disc_b: the networks.
    tx: ``{"gen", "disc"}`` optimizers (each over both networks).
  """

  def __init__(self, config: ml_collections.ConfigDict,
               image_shape: Tuple[int, ...]):
    self.config = config
    self.image_shape = tuple(image_shape)
    m = config.model
    self.source, self.target = pix2pix.channels(config)
    kw = dict(spatial_dims=len(self.image_shape) - 1,
              dtype=jnp.dtype(m.dtype), conv_lowering=m.conv_lowering)
    unet = dict(ch=m.g_ch, ch_mult=tuple(m.g_ch_mult),
                num_groups=m.num_groups, **kw)
    self.gen_ab = segmenter.SegUNet(out_channels=len(self.target), **unet)
    self.gen_ba = segmenter.SegUNet(out_channels=len(self.source), **unet)
    self.disc = ae.PatchDiscriminator(ch=m.d_ch, num_layers=m.d_layers,
                                      num_groups=m.num_groups, **kw)
    steps = config.train.num_steps
    self.tx = {"gen": optim.make_optimizer(config.optim, steps),
               "disc": optim.make_optimizer(config.optim, steps)}

  def _domains(self, batch: Batch) -> Tuple[jax.Array, jax.Array]:
    """Source images of ``image`` and target images of ``image_b``."""
    a = batch["image"].astype(jnp.float32)[..., self.source]
    b = batch["image_b"].astype(jnp.float32)[..., self.target]
    return a, b

  def _g(self, net, params, x):
    return jnp.tanh(net.apply({"params": params}, x))

  def _d(self, params, x):
    return self.disc.apply({"params": params}, x)

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """``params = {"gen": {ab, ba}, "disc": {a, b}}``; image pools in
    ``model_state``; the EMA follows ``"gen"``."""
    keys = jax.random.split(rng, 4)
    spatial = self.image_shape[:-1]
    a = jnp.zeros((1,) + spatial + (len(self.source),))
    b = jnp.zeros((1,) + spatial + (len(self.target),))
    params = {
        "gen": {"ab": self.gen_ab.init({"params": keys[0]}, a)["params"],
                "ba": self.gen_ba.init({"params": keys[1]}, b)["params"]},
        "disc": {"a": self.disc.init({"params": keys[2]}, a)["params"],
                 "b": self.disc.init({"params": keys[3]}, b)["params"]}}
    size = self.config.method.pool_size
    pools = {"a": jnp.zeros((size,) + a.shape[1:]),
             "b": jnp.zeros((size,) + b.shape[1:]),
             "count_a": jnp.zeros((), jnp.int32),
             "count_b": jnp.zeros((), jnp.int32)}
    return state_lib.create_state(params, self.tx,
                                  use_ema=self.config.train.ema > 0,
                                  model_state=pools, ema_of="gen")

  def g_terms(self, gen, disc, a, b):
    """Generator loss, its terms and the fakes ``(fake_a, fake_b)``."""
    me = self.config.method
    fake_b = self._g(self.gen_ab, gen["ab"], a)
    fake_a = self._g(self.gen_ba, gen["ba"], b)
    adv = (losses.least_squares_g(self._d(disc["b"], fake_b)) +
           losses.least_squares_g(self._d(disc["a"], fake_a)))
    cycle = (jnp.mean(jnp.abs(self._g(self.gen_ba, gen["ba"], fake_b) - a)) +
             jnp.mean(jnp.abs(self._g(self.gen_ab, gen["ab"], fake_a) - b)))
    loss = adv + me.cycle_weight * cycle
    metrics = {"g_adv": adv, "cycle": cycle}
    if me.identity_weight and len(self.source) == len(self.target):
      identity = (jnp.mean(jnp.abs(self._g(self.gen_ab, gen["ab"], b) - b)) +
                  jnp.mean(jnp.abs(self._g(self.gen_ba, gen["ba"], a) - a)))
      loss += me.identity_weight * me.cycle_weight * identity
      metrics["identity"] = identity
    metrics["g_loss"] = loss
    return loss, (metrics, (fake_a, fake_b))

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """Both generators, then both discriminators on pooled fakes, then EMA
    and ``step + 1``; pure and jit-able."""
    tc = self.config.train
    a, b = self._domains(batch)
    p = state.params
    grads, (metrics, (fake_a, fake_b)) = jax.grad(self.g_terms, has_aux=True)(
        p["gen"], p["disc"], a, b)
    metrics["g_grad_norm"] = optim.global_norm(grads)
    state = state_lib.update_subnet(state, "gen", self.tx["gen"], grads)
    pools = state.model_state
    k_a, k_b = jax.random.split(rng)
    old_a, pool_a, count_a = pool_query(pools["a"], pools["count_a"], fake_a,
                                        k_a)
    old_b, pool_b, count_b = pool_query(pools["b"], pools["count_b"], fake_b,
                                        k_b)

    def d_loss(dp):
      la = losses.least_squares_d(self._d(dp["a"], a), self._d(dp["a"], old_a))
      lb = losses.least_squares_d(self._d(dp["b"], b), self._d(dp["b"], old_b))
      return la + lb, (la, lb)

    (d, (la, lb)), d_grads = jax.value_and_grad(d_loss, has_aux=True)(
        state.params["disc"])
    state = state_lib.update_subnet(state, "disc", self.tx["disc"], d_grads)
    state = state_lib.advance(
        state, tc.ema, tc.ema_warmup,
        model_state={"a": pool_a, "b": pool_b, "count_a": count_a,
                     "count_b": count_b})
    metrics.update(loss=metrics["g_loss"], d_loss=d, d_a=la, d_b=lb,
                   d_grad_norm=optim.global_norm(d_grads))
    return state, metrics

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """Mean absolute error of source -> target on *paired* held-out images
    (training never sees pairs; this is what the translation is for)."""
    del rng
    x = batch["image"].astype(jnp.float32)
    pred = self._g(self.gen_ab, state.params["gen"]["ab"], x[..., self.source])
    return jnp.mean(jnp.abs(pred - x[..., self.target]))

  def translate(self, state: TrainState, batch: Batch,
                rng: jax.Array) -> Batch:
    """``{"image": [B, *S, len(target)]}`` from ``batch["source"]`` with the
    EMA source -> target generator."""
    del rng
    gen = state_lib.eval_params(state)["gen"]["ab"]
    return {"image": self._g(self.gen_ab, gen,
                             batch["source"].astype(jnp.float32))}


# --------------------------------------------------------------- config --

MODEL_KEYS = pix2pix.MODEL_KEYS
METHOD_KEYS = ("name", "cycle_weight", "identity_weight", "pool_size")


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``model``, ``method`` and ``translation`` sections,
  and ``data.unpaired``."""
  errors = pix2pix.translation_errors(config)
  m, me = config.model, config.method
  if not config.data.get("unpaired", False):
    errors.append("cyclegan needs data.unpaired=True (the two domains from "
                  "different subjects)")
  if checks.section_keys(errors, "model", m, MODEL_KEYS, "cyclegan"):
    errors += unet_lib.translator_model_errors(m, config.data.res)
  if checks.section_keys(errors, "method", me, METHOD_KEYS, "cyclegan"):
    checks.positive(errors, "method.cycle_weight", me.cycle_weight)
    checks.positive(errors, "method.identity_weight", me.identity_weight,
                    allow_zero=True)
    checks.positive(errors, "method.pool_size", me.pool_size)
  return errors


def make(config: ml_collections.ConfigDict, example_batch: Batch) -> CycleGAN:
  """Builds the method; the image shape comes from ``example_batch``."""
  return CycleGAN(config, tuple(example_batch["image"].shape[1:]))
