"""Networks of the VAE family (VAE, VQ-VAE, VQGAN), in 2D or 3D.

:class:`Encoder` and :class:`Decoder` are the convolutional pyramids of
taming-transformers / latent diffusion (Esser et al. 2021, Rombach et al.
2022): residual blocks without a time embedding, stride-2 downsampling,
a ResBlock-Attention-ResBlock middle. :class:`PatchDiscriminator` is
pix2pix's PatchGAN (Isola et al. 2017) with GroupNorm. The vector
quantiser is a set of pure functions (:func:`quantize`, :func:`ema_update`,
:func:`restart_dead_codes`): the codebook and its EMA statistics live in the
method's state, not in Flax parameters, since they are not trained by the
optimizer.

Images are channels-last ``[B, *S, C]``, ``S = (H, W)`` or ``(D, H, W)``.
Networks compute in ``dtype`` with float32 parameters and return float32.
"""

import functools
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.nn import layers


def _check_input(x: jax.Array, spatial_dims: int, factor: int,
                 name: str) -> None:
  """Raises on a wrong rank or spatial sides not divisible by ``factor``."""
  if x.ndim != spatial_dims + 2:
    raise ValueError(f"{name}(spatial_dims={spatial_dims}) expects "
                     f"{spatial_dims + 2}-d input, got {x.shape}")
  if any(s % factor for s in x.shape[1:-1]):
    raise ValueError(f"{name}: spatial sides {x.shape[1:-1]} must be "
                     f"divisible by {factor}")


class AEResBlock(nn.Module):
  """Pre-activation residual block without an embedding.

  ``GN -> SiLU -> Conv -> GN -> SiLU -> Conv``, plus a 1x1 conv on the skip
  path when the channel count changes. The last conv starts at zero (as in
  :class:`layers.ResBlock`), so the block is the identity at init.

  Attributes:
    out_ch: output channels.
    num_groups: GroupNorm groups.
    spatial_dims: 2 or 3.
    dtype: compute dtype.
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  out_ch: int
  num_groups: int = 32
  spatial_dims: int = 2
  dtype: Any = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *S, C]`` -> ``[B, *S, out_ch]``."""
    conv = functools.partial(layers.Conv, self.out_ch,
                             spatial_dims=self.spatial_dims, dtype=self.dtype,
                             conv_lowering=self.conv_lowering)
    h = layers.group_norm(x.shape[-1], self.num_groups, self.dtype,
                          silu=True)(x)
    h = conv()(h)
    h = layers.group_norm(self.out_ch, self.num_groups, self.dtype,
                          silu=True)(h)
    h = conv(kernel_init=layers.zero_init)(h)
    if x.shape[-1] != self.out_ch:
      x = conv(kernel_size=1)(x)
    return x.astype(self.dtype) + h


class MidBlock(nn.Module):
  """ResBlock, optional self-attention, ResBlock at the lowest resolution.

  Attributes:
    num_groups: GroupNorm groups.
    attention: include the attention block.
    num_heads: attention heads (must divide the channels).
    spatial_dims: 2 or 3.
    dtype: compute dtype.
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  num_groups: int = 32
  attention: bool = True
  num_heads: int = 1
  spatial_dims: int = 2
  dtype: Any = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    """``[B, *s, C]`` -> ``[B, *s, C]``."""
    block = functools.partial(AEResBlock, h.shape[-1], self.num_groups,
                              self.spatial_dims, self.dtype,
                              self.conv_lowering)
    h = block()(h)
    if self.attention:
      h = layers.AttentionBlock(self.num_heads, self.num_groups, self.dtype)(h)
    return block()(h)


class ClassEmbedding(nn.Module):
  """Adds a learned per-class vector to every position of a feature map.

  Equivalent to a class-dependent bias of the preceding conv: the cheapest
  conditioning, and the residual blocks after it propagate it (their skip
  paths carry it) through the whole network. FiLM in every
  block would cost a Dense per block for the small label sets of medical
  data and is not needed to make an autoencoder label-aware.

  Row ``num_classes`` is the "null" label used when ``y`` is ``None``, as in
  :class:`medgen_jax.nn.unet.UNet`, so one conditional network also serves
  unlabelled batches.

  Attributes:
    num_classes: real classes (the table has ``num_classes + 1`` rows).
  """

  num_classes: int

  @nn.compact
  def __call__(self, h: jax.Array, y: Optional[jax.Array]) -> jax.Array:
    """``h [B, *S, C]``, ``y [B]`` int in ``[0, num_classes]`` or ``None``
    -> ``[B, *S, C]``."""
    if y is None:
      y = jnp.full((h.shape[0],), self.num_classes, jnp.int32)
    e = nn.Embed(self.num_classes + 1, h.shape[-1], name="embed")(y)
    e = e.reshape(e.shape[:1] + (1,) * (h.ndim - 2) + e.shape[1:])
    return h + e.astype(h.dtype)


def _condition(h: jax.Array, y: Optional[jax.Array], num_classes: int,
               who: str) -> jax.Array:
  """Class conditioning of ``h`` when the net has classes (must be called
  from a compact method: the embedding becomes the caller's submodule)."""
  if num_classes > 0:
    return ClassEmbedding(num_classes, name="class_embed")(h, y)
  if y is not None:
    raise ValueError(f"labels given to an unconditional {who} "
                     "(num_classes=0)")
  return h


class Encoder(nn.Module):
  """Image -> latent map (or vector).

  ``Conv(ch)``, then per level ``num_res_blocks`` residual blocks
  (:class:`AEResBlock`) with ``ch * ch_mult[level]`` channels and a stride-2
  :class:`layers.Downsample` between levels, a :class:`MidBlock`, ``GN -> SiLU -> Conv(out_channels)``.

  Attributes:
    ch: base channel count.
    ch_mult: channel multipliers, one per resolution level.
    num_res_blocks: residual blocks per level.
    num_groups: GroupNorm groups.
    out_channels: latent channels (``2 * z`` for a diagonal Gaussian
      posterior's mean and log-variance). With ``vector_dim`` this is the
      channel bottleneck of the map that is flattened.
    vector_dim: ``0`` for a latent map; otherwise the output is the vector
      ``Dense(vector_dim)(flatten(map))`` (``2 * z`` for a Gaussian).
    spatial_dims: 2 or 3.
    num_classes: ``0`` unconditional; otherwise a :class:`ClassEmbedding`
      added after the input conv.
    mid_attention: self-attention in the middle block.
    num_heads: its heads.
    dtype: compute dtype; the output is float32.
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  ch: int = 64
  ch_mult: Tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int = 2
  num_groups: int = 32
  out_channels: int = 8
  vector_dim: int = 0
  spatial_dims: int = 2
  num_classes: int = 0
  mid_attention: bool = True
  num_heads: int = 1
  dtype: Any = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, y: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Encodes images.

    Args:
      x: ``[B, *S, C]``; every side divisible by ``2 ** (len(ch_mult) - 1)``.
      y: ``[B]`` int labels in ``[0, num_classes]`` or ``None`` (null label).
      train: unused (no dropout or batch statistics); kept so every network
        of a method has the same call signature.

    Returns:
      ``[B, *S / 2 ** (len(ch_mult) - 1), out_channels]`` or, with
      ``vector_dim``, ``[B, vector_dim]``; float32.
    """
    del train
    _check_input(x, self.spatial_dims, 2 ** (len(self.ch_mult) - 1),
                 "Encoder")
    kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype,
              conv_lowering=self.conv_lowering)
    h = layers.Conv(self.ch, 3, **kw)(x)
    h = _condition(h, y, self.num_classes, "Encoder")
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = AEResBlock(self.ch * mult, self.num_groups, **kw)(h)
      if level != len(self.ch_mult) - 1:
        h = layers.Downsample(h.shape[-1], **kw)(h)
    h = MidBlock(self.num_groups, self.mid_attention, self.num_heads, **kw)(h)
    h = layers.group_norm(h.shape[-1], self.num_groups, self.dtype,
                          silu=True)(h)
    h = layers.Conv(self.out_channels, 3, **kw)(h)
    if self.vector_dim:
      h = nn.Dense(self.vector_dim, dtype=self.dtype,
                   kernel_init=layers.default_init)(
                       h.reshape(h.shape[0], -1))
    return h.astype(jnp.float32)


class Decoder(nn.Module):
  """Latent map (or vector) -> image; the mirror of :class:`Encoder`.

  ``Conv(ch * ch_mult[-1])``, a :class:`MidBlock`, then per level (lowest
  first) ``num_res_blocks + 1`` residual blocks (:class:`AEResBlock`) and a
  :class:`layers.Upsample` between levels, ``GN -> SiLU ->
  Conv(out_channels)``. One block more per level than the encoder, as in
  taming-transformers / latent diffusion: decoding is the harder half.

  Attributes:
    ch: base channel count.
    ch_mult: channel multipliers, one per level (same order as the
      encoder's, finest first).
    num_res_blocks: the encoder's residual blocks per level.
    num_groups: GroupNorm groups.
    out_channels: image channels.
    vector_dim: ``0`` for a latent map input; otherwise the input is
      ``[B, vector_dim]``, mapped by a Dense to ``[B, *base_shape,
      latent_channels]`` first.
    base_shape: spatial shape of the lowest level (vector inputs only),
      e.g. ``(4, 4)`` for a 16x16 image and three levels.
    latent_channels: channels of that map (vector inputs only; ``0``:
      ``ch * ch_mult[-1]``). Set it to the encoder's ``out_channels`` for a
      mirror image of the encoder's bottleneck.
    spatial_dims: 2 or 3.
    num_classes: ``0`` unconditional; otherwise a :class:`ClassEmbedding`
      added after the input conv.
    mid_attention: self-attention in the middle block.
    num_heads: its heads.
    dtype: compute dtype; the output is float32.
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  ch: int = 64
  ch_mult: Tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int = 2
  num_groups: int = 32
  out_channels: int = 1
  vector_dim: int = 0
  base_shape: Tuple[int, ...] = ()
  latent_channels: int = 0
  spatial_dims: int = 2
  num_classes: int = 0
  mid_attention: bool = True
  num_heads: int = 1
  dtype: Any = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, z: jax.Array, y: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Decodes latents.

    Args:
      z: ``[B, *s, zc]`` or, with ``vector_dim``, ``[B, vector_dim]``.
      y: ``[B]`` int labels in ``[0, num_classes]`` or ``None`` (null label).
      train: unused; see :class:`Encoder`.

    Returns:
      ``[B, *s * 2 ** (len(ch_mult) - 1), out_channels]`` float32, unbounded
      (the method applies its own output link, e.g. ``tanh`` or a
      likelihood's location).
    """
    del train
    kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype,
              conv_lowering=self.conv_lowering)
    top = self.ch * self.ch_mult[-1]
    if self.vector_dim:
      if z.shape[1:] != (self.vector_dim,):
        raise ValueError(f"Decoder(vector_dim={self.vector_dim}) expects "
                         f"[B, {self.vector_dim}] input, got {z.shape}")
      if len(self.base_shape) != self.spatial_dims:
        raise ValueError(f"Decoder: base_shape={self.base_shape} must have "
                         f"spatial_dims={self.spatial_dims} sides")
      c = self.latent_channels or top
      z = nn.Dense(math.prod(self.base_shape) * c, dtype=self.dtype,
                   kernel_init=layers.default_init)(z)
      z = z.reshape((z.shape[0],) + tuple(self.base_shape) + (c,))
    _check_input(z, self.spatial_dims, 1, "Decoder")
    h = layers.Conv(top, 3, **kw)(z)
    h = _condition(h, y, self.num_classes, "Decoder")
    h = MidBlock(self.num_groups, self.mid_attention, self.num_heads, **kw)(h)
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = AEResBlock(self.ch * mult, self.num_groups, **kw)(h)
      if level != 0:
        h = layers.Upsample(h.shape[-1], **kw)(h)
    h = layers.group_norm(h.shape[-1], self.num_groups, self.dtype,
                          silu=True)(h)
    h = layers.Conv(self.out_channels, 3, **kw)(h)
    return h.astype(jnp.float32)


class PatchDiscriminator(nn.Module):
  """PatchGAN discriminator (pix2pix's ``NLayerDiscriminator``), 2D or 3D.

  ``num_layers`` stride-2 convs with ``ch * 2**i`` (at most ``8 * ch``)
  channels, one stride-1 conv, then a stride-1 conv to one logit per patch;
  LeakyReLU(0.2) after each hidden conv and GroupNorm after all but the
  first (GroupNorm instead of BatchNorm: small medical batches, and the
  discriminator then behaves the same in training and evaluation). With
  4-wide kernels and ``num_layers=3`` each logit sees a 70-pixel patch.

  Attributes:
    ch: channels of the first conv.
    num_layers: stride-2 convs; the logit map is ``S / 2**num_layers``.
    num_groups: GroupNorm groups.
    kernel_size: conv width (pix2pix: 4; even widths pad one more at the
      high side).
    spatial_dims: 2 or 3.
    dtype: compute dtype; logits are float32.
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  ch: int = 64
  num_layers: int = 3
  num_groups: int = 32
  kernel_size: int = 4
  spatial_dims: int = 2
  dtype: Any = jnp.float32
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *S, C]`` -> ``[B, *S / 2**num_layers, 1]`` logits."""
    _check_input(x, self.spatial_dims, 2 ** self.num_layers,
                 "PatchDiscriminator")
    conv = functools.partial(layers.Conv, kernel_size=self.kernel_size,
                             spatial_dims=self.spatial_dims, dtype=self.dtype,
                             conv_lowering=self.conv_lowering)
    h = x
    for i in range(self.num_layers + 1):
      # The extra stride-1 conv widens the receptive field without
      # shrinking the logit map further (as in pix2pix).
      out = self.ch * min(2 ** i, 8)
      h = conv(out, strides=2 if i < self.num_layers else 1)(h)
      if i:
        h = layers.group_norm(out, self.num_groups, self.dtype)(h)
      h = nn.leaky_relu(h, 0.2)
    return conv(1)(h).astype(jnp.float32)


def quantize(z: jax.Array, codebook: jax.Array
             ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Nearest-code vector quantisation with a straight-through gradient.

  Args:
    z: ``[..., D]`` encoder outputs.
    codebook: ``[K, D]``.

  Returns:
    ``z_q [..., D]`` (float32): the nearest codes in value; its gradient
    with respect to ``z`` is the identity (straight-through, van den Oord
    et al. 2017) and none reaches ``codebook`` (EMA codebooks are not
    trained by gradients; a learned codebook needs its own loss on
    ``codebook[indices]``). ``indices [...]`` int32, and the squared
    distances ``dist [..., K]`` (float32).
  """
  d = z.shape[-1]
  zf = z.reshape(-1, d).astype(jnp.float32)
  cb = codebook.astype(jnp.float32)
  # |z - c|^2 = |z|^2 - 2 z.c + |c|^2: one [N, K] matmul instead of an
  # [N, K, D] difference tensor. HIGHEST keeps TF32/bf16 matmul passes from
  # swapping near-tied codes on accelerators (K x D is small).
  cross = jnp.dot(zf, cb.T, precision=jax.lax.Precision.HIGHEST)
  dist = (jnp.sum(jnp.square(zf), -1, keepdims=True) - 2.0 * cross +
          jnp.sum(jnp.square(cb), -1)[None])
  indices = jnp.argmin(dist, axis=-1).astype(jnp.int32)
  q = jax.lax.stop_gradient(jnp.take(cb, indices, axis=0))
  zf_st = zf - jax.lax.stop_gradient(zf)  # Value 0, gradient identity.
  # q + 0 is exactly q, unlike z + sg(q - z), which rounds; same gradient.
  z_q = q + zf_st
  lead = z.shape[:-1]
  return (z_q.reshape(z.shape), indices.reshape(lead),
          dist.reshape(lead + (cb.shape[0],)))


def ema_update(cluster_size: jax.Array, embed_sum: jax.Array,
               z_flat: jax.Array, indices: jax.Array, decay: float,
               eps: float = 1e-5) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """One EMA codebook update (van den Oord et al. 2017, appendix A.1).

  Args:
    cluster_size: ``[K]`` EMA of each code's assignment count.
    embed_sum: ``[K, D]`` EMA of the sum of the vectors assigned to it.
    z_flat: ``[N, D]`` encoder outputs of this batch.
    indices: ``[N]`` their codes (from :func:`quantize`).
    decay: EMA decay, e.g. 0.99.
    eps: Laplace smoothing of the counts, so an unused code's size stays
      positive and the division is finite.

  Returns:
    ``(cluster_size [K], embed_sum [K, D], codebook [K, D])``, float32;
    ``codebook = embed_sum / smoothed size``, with the sizes smoothed as in
    Sonnet's ``VectorQuantizerEMA`` (``(c + eps) / (n + K eps) * n``, which
    keeps their total ``n``).
  """
  k = cluster_size.shape[0]
  zf = z_flat.astype(jnp.float32)
  # Segment sums rather than an [N, K] one-hot matmul: O(N D) memory.
  counts = jax.ops.segment_sum(jnp.ones_like(indices, jnp.float32), indices,
                               num_segments=k)
  sums = jax.ops.segment_sum(zf, indices, num_segments=k)
  cluster_size = decay * cluster_size + (1.0 - decay) * counts
  embed_sum = decay * embed_sum + (1.0 - decay) * sums
  n = jnp.sum(cluster_size)
  smoothed = (cluster_size + eps) / (n + k * eps) * n
  return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def restart_dead_codes(codebook: jax.Array, cluster_size: jax.Array,
                       embed_sum: jax.Array, z_flat: jax.Array,
                       rng: jax.Array, threshold: float
                       ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Resets codes whose EMA size fell below ``threshold`` to batch vectors.

  Dead codes are never chosen, so EMA never moves them back towards the
  data; restarting them at random encoder outputs (Dhariwal et al. 2020,
  Jukebox; Zeghidour et al. 2021) keeps the codebook in use. Fixed shapes
  (``jnp.where`` over all codes), so it runs inside a jitted step.

  Args:
    codebook: ``[K, D]``.
    cluster_size: ``[K]`` EMA sizes (from :func:`ema_update`).
    embed_sum: ``[K, D]`` EMA sums.
    z_flat: ``[N, D]`` encoder outputs of this batch.
    rng: PRNG key of the draw.
    threshold: codes with ``cluster_size < threshold`` are dead (``0``
      restarts none).

  Returns:
    ``(codebook, cluster_size, embed_sum, num_restarted)``. A restarted
    code gets size ``threshold`` and sum ``threshold * code``, so the next
    :func:`ema_update` starts from it rather than from the stale sum, and
    it is not dead again at once. ``num_restarted`` is an int32 scalar.
  """
  k, n = codebook.shape[0], z_flat.shape[0]
  # Distinct rows where the batch has enough (two dead codes restarted at
  # the same vector would tie, and argmin would starve the second).
  pick = jax.random.choice(rng, n, (k,), replace=n < k)
  fresh = z_flat[pick].astype(codebook.dtype)
  dead = cluster_size < threshold
  codebook = jnp.where(dead[:, None], fresh, codebook)
  cluster_size = jnp.where(dead, jnp.asarray(threshold, cluster_size.dtype),
                           cluster_size)
  embed_sum = jnp.where(dead[:, None], threshold * fresh, embed_sum)
  return codebook, cluster_size, embed_sum, jnp.sum(dead, dtype=jnp.int32)


def _code_counts(indices: jax.Array, num_codes: int) -> jax.Array:
  """``[num_codes]`` float32 histogram of ``indices`` (any shape)."""
  return jnp.bincount(indices.reshape(-1), length=num_codes).astype(
      jnp.float32)


def perplexity(indices: jax.Array, num_codes: int) -> jax.Array:
  """``exp(entropy)`` of the batch's code usage: the effective number of
  codes (1 when one code is used, ``num_codes`` when all equally).

  Args:
    indices: int codes, any shape.
    num_codes: codebook size ``K``.

  Returns:
    float32 scalar.
  """
  p = _code_counts(indices, num_codes)
  p = p / jnp.sum(p)
  # 0 log 0 = 0 (the where keeps log's NaN gradient out as well).
  logp = jnp.log(jnp.where(p > 0, p, 1.0))
  return jnp.exp(-jnp.sum(p * logp))


def usage(indices: jax.Array, num_codes: int) -> jax.Array:
  """Fraction of the ``num_codes`` codes used at least once in ``indices``;
  float32 scalar."""
  return jnp.mean(_code_counts(indices, num_codes) > 0, dtype=jnp.float32)


def to_model_space(raw: jax.Array, num_contrasts: int) -> jax.Array:
  """A decoder's output ``[B, *S, C + M]`` (contrast values, mask logits)
  as model inputs look: contrasts clipped to [-1, 1], masks as
  ``2 sigmoid(logit) - 1`` (> 0 where the mask is more likely than not)."""
  image = jnp.clip(raw[..., :num_contrasts], -1.0, 1.0)
  masks = jnp.tanh(0.5 * raw[..., num_contrasts:])
  return jnp.concatenate([image, masks], axis=-1)
