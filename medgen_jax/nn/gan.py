"""Networks and pieces of the GAN family, in 2D and 3D.

- :class:`Generator`: latent vector (+ class) -> image (+ mask channels),
  DCGAN-shaped (Radford et al. 2016) with nearest-upsampling convolutions
  instead of transposed ones (no checkerboard artefacts) and GroupNorm
  (small medical batches make BatchNorm statistics noisy).
- :class:`Discriminator`: image -> one logit per example, plus auxiliary
  class logits (ACGAN, Odena et al. 2017) or a class projection (Miyato &
  Koyama 2018); convolutions and dense layers optionally spectrally
  normalised (Miyato et al. 2018).
- :func:`spectral_normalize`: one power iteration, pure; the ``u`` vectors
  live in the ``"spectral"`` variable collection (the method keeps them in
  ``state.model_state``).
- :func:`diff_augment`: differentiable augmentation for small data (Zhao
  et al. 2020): the same kind of random transform for real and fake images
  before the discriminator, so it cannot memorise the few real ones, and
  gradients flow through it to the generator.
"""

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.nn import autoencoder
from medgen_jax.nn import layers

Dtype = Any


def spectral_normalize(w: jax.Array, u: jax.Array, n_iter: int = 1,
                       eps: float = 1e-12
                       ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """``w / sigma(w)`` with ``sigma`` estimated by power iteration.

  Args:
    w: a weight of any shape; viewed as a ``[prod(shape[:-1]), out]`` matrix.
    u: ``[out]`` the previous estimate of the top right-singular vector.
    n_iter: power iterations (one per training step suffices: ``u`` is
      carried across steps).
    eps: added to norms.

  Returns:
    ``(w / sigma, new u, sigma)``; ``u`` and ``sigma`` carry no gradient
    (as in Miyato et al. 2018), ``w / sigma`` does through ``w``.
  """
  mat = w.reshape(-1, w.shape[-1]).astype(jnp.float32)
  u = jax.lax.stop_gradient(u.astype(jnp.float32))
  v = None
  for _ in range(n_iter):
    v = mat @ u
    v = v / (jnp.linalg.norm(v) + eps)
    u = mat.T @ v
    u = u / (jnp.linalg.norm(u) + eps)
  u = jax.lax.stop_gradient(u)
  v = jax.lax.stop_gradient(v)
  sigma = v @ (mat @ u)
  return (w / jax.lax.stop_gradient(sigma).astype(w.dtype), u,
          jax.lax.stop_gradient(sigma))


class SNConv(nn.Module):
  """Convolution (``layers.conv_nd``) with an optionally spectrally
  normalised kernel; ``update_stats`` advances the power iteration (pass it
  when the ``"spectral"`` collection is mutable)."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  spectral: bool = True
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
    """``[B, *S, C]`` -> ``[B, *S / strides, features]``."""
    shape = (self.kernel_size,) * self.spatial_dims + (x.shape[-1],
                                                       self.features)
    kernel = self.param("kernel", layers.default_init, shape, jnp.float32)
    kernel = _maybe_normalize(self, kernel, update_stats)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    y = layers.conv_nd(x.astype(self.dtype), kernel.astype(self.dtype),
                       self.strides, self.conv_lowering)
    return y + bias.astype(self.dtype)


class SNDense(nn.Module):
  """Dense layer with an optionally spectrally normalised kernel."""

  features: int
  spectral: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
    """``[B, D]`` -> ``[B, features]``."""
    kernel = self.param("kernel", layers.default_init,
                        (x.shape[-1], self.features), jnp.float32)
    kernel = _maybe_normalize(self, kernel, update_stats)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(
        self.dtype)


def _maybe_normalize(module: nn.Module, kernel: jax.Array,
                     update_stats: bool) -> jax.Array:
  if not module.spectral:
    return kernel
  u = module.variable(
      "spectral", "u",
      lambda: jax.random.normal(module.make_rng("params"),
                                (kernel.shape[-1],), jnp.float32))
  normalized, new_u, _ = spectral_normalize(kernel, u.value)
  if update_stats and not module.is_initializing():
    u.value = new_u
  return normalized


class Generator(nn.Module):
  """``z [B, z_dim]`` (+ labels ``[B]``) -> images ``[B, *S, out_channels]``
  in (-1, 1) (``tanh``).

  ``Dense`` to a ``base_side``-sided map of ``ch * ch_mult[-1]`` channels,
  then per level (coarse to fine) a nearest-upsampling 3x3 conv and a
  residual block, GroupNorm-SiLU, a 3x3 conv to ``out_channels``.

  Attributes:
    out_channels: image channels (contrasts + masks).
    image_shape: spatial shape of the output, e.g. ``(32, 32)``.
    ch: channels at the finest level; level ``i`` has ``ch * ch_mult[i]``.
    ch_mult: one multiplier per level, finest first; the base map is the
      image downsampled ``2**(len(ch_mult) - 1)`` times.
    num_groups: GroupNorm groups.
    num_classes: ``0`` unconditional; otherwise a class embedding
      concatenated to ``z``.
    dtype: compute dtype (output float32).
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  out_channels: int
  image_shape: Tuple[int, ...]
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 4)
  num_groups: int = 8
  num_classes: int = 0
  dtype: Dtype = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, z: jax.Array, y: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    del train
    dims = len(self.image_shape)
    kw = dict(spatial_dims=dims, dtype=self.dtype,
              conv_lowering=self.conv_lowering)
    if self.num_classes:
      if y is None:
        raise ValueError("a class-conditional Generator needs labels")
      z = jnp.concatenate(
          [z, nn.Embed(self.num_classes, z.shape[-1], name="class_embed")(y)],
          axis=-1)
    elif y is not None:
      raise ValueError("labels given to an unconditional Generator")
    factor = 2 ** (len(self.ch_mult) - 1)
    base = tuple(s // factor for s in self.image_shape)
    top = self.ch * self.ch_mult[-1]
    h = nn.Dense(math.prod(base) * top, kernel_init=layers.default_init)(
        z.astype(jnp.float32))
    h = h.reshape((z.shape[0],) + base + (top,)).astype(self.dtype)
    for level in reversed(range(len(self.ch_mult))):
      out = self.ch * self.ch_mult[level]
      if level != len(self.ch_mult) - 1:
        h = layers.group_norm(h.shape[-1], self.num_groups, self.dtype,
                              silu=True)(h)
        h = layers.Conv(out, 3, upsample=True, **kw)(h)
      h = autoencoder.AEResBlock(out, self.num_groups, **kw)(h)
    h = layers.group_norm(h.shape[-1], self.num_groups, self.dtype,
                          silu=True)(h)
    h = layers.Conv(self.out_channels, 3, **kw)(h)
    return jnp.tanh(h.astype(jnp.float32))


class Discriminator(nn.Module):
  """Images ``[B, *S, C]`` -> ``(logits [B], class_logits [B, K] or
  None)``.

  Per level a stride-1 and a stride-2 3x3 conv with LeakyReLU(0.2), then
  global sum pooling of the last map (as in SN-GAN's ResNet
  discriminator), a dense logit. ``head="acgan"`` adds an auxiliary
  classifier; ``head="projection"`` adds ``<embed(y), features>`` to the
  logit (labels required).

  Attributes:
    ch, ch_mult: channels per level (finest first).
    spectral: spectrally normalise every conv and dense layer.
    num_classes: classes of the ACGAN head or the projection.
    head: ``"none"``, ``"acgan"`` or ``"projection"``.
    spatial_dims, dtype, conv_lowering: as elsewhere.
  """

  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 4)
  spectral: bool = True
  num_classes: int = 0
  head: str = "none"
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, y: Optional[jax.Array] = None,
               update_stats: bool = False
               ) -> Tuple[jax.Array, Optional[jax.Array]]:
    kw = dict(spectral=self.spectral, spatial_dims=self.spatial_dims,
              dtype=self.dtype, conv_lowering=self.conv_lowering)
    h = x
    for mult in self.ch_mult:
      h = nn.leaky_relu(SNConv(self.ch * mult, 3, **kw)(h, update_stats),
                        0.2)
      h = nn.leaky_relu(SNConv(self.ch * mult, 3, strides=2, **kw)(
          h, update_stats), 0.2)
    features = jnp.sum(h.astype(jnp.float32),
                       axis=tuple(range(1, 1 + self.spatial_dims)))
    dense = lambda n, name: SNDense(n, self.spectral, name=name)  # pylint: disable=unnecessary-lambda-assignment
    logits = dense(1, "logit")(features, update_stats)[:, 0]
    class_logits = None
    if self.head == "acgan":
      class_logits = dense(self.num_classes, "aux")(features, update_stats)
    elif self.head == "projection":
      if y is None:
        raise ValueError("a projection discriminator needs labels")
      emb = nn.Embed(self.num_classes, features.shape[-1],
                     name="projection")(y)
      logits = logits + jnp.sum(emb * features, axis=-1)
    return logits, class_logits


# ---------------------------------------------------------- DiffAugment --

DIFF_AUGMENT_POLICIES = ("brightness", "contrast", "translation", "cutout")


def diff_augment(x: jax.Array, rng: jax.Array,
                 policy: Sequence[str] = ("brightness", "contrast",
                                          "translation", "cutout"),
                 translation_frac: float = 0.125,
                 cutout_frac: float = 0.5) -> jax.Array:
  """Differentiable augmentation (Zhao et al. 2020) of images in [-1, 1].

  Every transform is drawn per example from ``rng`` and is differentiable
  in ``x``: the same key gives the same transform, so real and fake images
  can share one draw, and the generator's gradients flow through it.

  Args:
    x: ``[B, *S, C]``.
    rng: key.
    policy: any of :data:`DIFF_AUGMENT_POLICIES`, applied in this order:
      ``brightness`` (add U(-0.5, 0.5)), ``contrast`` (scale about the
      per-image mean by U(0.5, 1.5)), ``translation`` (integer shift up to
      ``translation_frac`` of each side, zero-padded to the background -1),
      ``cutout`` (a square of ``cutout_frac`` of each side set to -1).
    translation_frac, cutout_frac: sizes.

  Returns:
    ``[B, *S, C]``.
  """
  b = x.shape[0]
  spatial = x.shape[1:-1]
  bshape = (b,) + (1,) * (x.ndim - 1)
  keys = jax.random.split(rng, 4)
  if "brightness" in policy:
    x = x + jax.random.uniform(keys[0], bshape, minval=-0.5, maxval=0.5)
  if "contrast" in policy:
    mean = jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
    x = (x - mean) * jax.random.uniform(keys[1], bshape, minval=0.5,
                                        maxval=1.5) + mean
  if "translation" in policy:
    shift = jnp.stack([jax.random.randint(
        jax.random.fold_in(keys[2], a), (b,),
        -int(s * translation_frac), int(s * translation_frac) + 1)
                       for a, s in enumerate(spatial)], axis=-1)
    x = jax.vmap(_translate)(x, shift)
  if "cutout" in policy:
    size = [max(1, int(s * cutout_frac)) for s in spatial]
    centre = jnp.stack([jax.random.randint(jax.random.fold_in(keys[3], a),
                                           (b,), 0, s)
                        for a, s in enumerate(spatial)], axis=-1)
    grids = jnp.meshgrid(*[jnp.arange(s) for s in spatial], indexing="ij")
    inside = jnp.ones((b,) + tuple(spatial), bool)
    for a, g in enumerate(grids):
      c = centre[:, a].reshape((b,) + (1,) * len(spatial))
      inside &= jnp.abs(g[None] - c) <= size[a] // 2
    x = jnp.where(inside[..., None], -1.0, x)
  return x


def _translate(img: jax.Array, shift: jax.Array) -> jax.Array:
  """``img [*S, C]`` shifted by integer ``shift [len(S)]``, filled with -1
  (gathers, so gradients reach the moved pixels)."""
  spatial = img.shape[:-1]
  idx = jnp.meshgrid(*[jnp.arange(s) for s in spatial], indexing="ij")
  src = [i - shift[a] for a, i in enumerate(idx)]
  valid = jnp.ones(spatial, bool)
  for a, s in enumerate(src):
    valid &= (s >= 0) & (s < spatial[a])
  clipped = tuple(jnp.clip(s, 0, spatial[a] - 1) for a, s in enumerate(src))
  return jnp.where(valid[..., None], img[clipped], -1.0)



class SPADE(nn.Module):
  """Spatially-adaptive normalisation (Park et al. 2019): GroupNorm whose
  scale and shift are predicted per pixel from a mask, so the mask's layout
  survives every normalisation of the generator.

  Attributes:
    hidden: channels of the mask's shared conv.
    num_groups, spatial_dims, dtype, conv_lowering: as elsewhere.
  """

  hidden: int = 32
  num_groups: int = 8
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x [B, *S, C]``, ``mask [B, *S', M]`` (resized to ``S`` by nearest
    neighbour) -> ``[B, *S, C]``."""
    kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype,
              conv_lowering=self.conv_lowering)
    m = jax.image.resize(mask, x.shape[:-1] + mask.shape[-1:], "nearest")
    h = nn.relu(layers.Conv(self.hidden, 3, **kw)(m))
    gamma = layers.Conv(x.shape[-1], 3, kernel_init=layers.zero_init, **kw)(h)
    beta = layers.Conv(x.shape[-1], 3, kernel_init=layers.zero_init, **kw)(h)
    normed = layers.group_norm(x.shape[-1], self.num_groups, self.dtype)(x)
    return normed * (1.0 + gamma) + beta


class SPADEGenerator(nn.Module):
  """``z [B, z_dim]`` and masks ``[B, *S, M]`` -> images ``[B, *S,
  out_channels]`` in (-1, 1): :class:`Generator`'s layout with a
  :class:`SPADE` normalisation before every convolution.

  Attributes: as :class:`Generator`, without classes.
  """

  out_channels: int
  image_shape: Tuple[int, ...]
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 4)
  num_groups: int = 8
  dtype: Dtype = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, z: jax.Array, mask: jax.Array,
               train: bool = False) -> jax.Array:
    del train
    dims = len(self.image_shape)
    kw = dict(spatial_dims=dims, dtype=self.dtype,
              conv_lowering=self.conv_lowering)
    spade = lambda: SPADE(num_groups=self.num_groups, **kw)  # pylint: disable=unnecessary-lambda-assignment
    factor = 2 ** (len(self.ch_mult) - 1)
    base = tuple(s // factor for s in self.image_shape)
    top = self.ch * self.ch_mult[-1]
    h = nn.Dense(math.prod(base) * top, kernel_init=layers.default_init)(
        z.astype(jnp.float32))
    h = h.reshape((z.shape[0],) + base + (top,)).astype(self.dtype)
    mask = mask.astype(self.dtype)
    for level in reversed(range(len(self.ch_mult))):
      out = self.ch * self.ch_mult[level]
      if level != len(self.ch_mult) - 1:
        h = layers.Conv(out, 3, upsample=True, **kw)(
            nn.silu(spade()(h, mask)))
      r = layers.Conv(out, 3, **kw)(nn.silu(spade()(h, mask)))
      r = layers.Conv(out, 3, kernel_init=layers.zero_init, **kw)(
          nn.silu(spade()(r, mask)))
      h = h + r
    h = layers.Conv(self.out_channels, 3, **kw)(nn.silu(spade()(h, mask)))
    return jnp.tanh(h.astype(jnp.float32))
