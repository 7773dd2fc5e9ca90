"""Building blocks shared by every network, in 2D and 3D.

Images are channels-last: ``[B, H, W, C]`` when ``spatial_dims == 2`` and
``[B, D, H, W, C]`` when ``spatial_dims == 3``. Every module takes a compute
``dtype`` (e.g. ``jnp.bfloat16``) while parameters stay ``float32``.

All convolutions of all networks go through :class:`Conv` (and its lowering
:func:`conv_nd`), so a faster lowering can be swapped in one place.
"""

import functools
import math
from typing import Any, Callable, Optional, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.nn import conv as conv_lib

Dtype = Any
Initializer = Callable[..., jax.Array]

# Ho et al. (2020) initialise every layer with this fan-avg uniform init.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
# Last layer of each residual branch starts at zero, so every block is the
# identity at init (as in ADM); deep U-Nets then train stably without tuning.
zero_init = nn.initializers.zeros


def conv_nd(x: jax.Array, kernel: jax.Array, strides: int = 1,
            lowering: str = "xla") -> jax.Array:
  """N-d convolution with symmetric "same" padding (odd kernels).

  This is the single entry point used by every convolution in the library;
  ``lowering`` picks how it is computed (see :mod:`medgen_jax.nn.conv`).

  Args:
    x: ``[B, *spatial, C_in]``.
    kernel: ``[*k, C_in, C_out]`` (flax's ``nn.Conv`` layout).
    strides: the same stride on every spatial axis.
    lowering: ``"auto"``, ``"xla"`` or ``"explicit"`` (see
      :mod:`medgen_jax.nn.conv`).

  Returns:
    ``[B, *ceil(spatial / strides), C_out]``.
  """
  n = kernel.ndim - 2
  # Symmetric padding (as in PyTorch) instead of XLA's "SAME", which pads
  # strided convs asymmetrically; halves even sides exactly either way.
  padding = tuple(((k - 1) // 2, k // 2) for k in kernel.shape[:n])
  return conv_lib.conv(x, kernel, strides, padding, lowering)


class Conv(nn.Module):
  """Convolution with ``nn.Conv``'s parameters (``kernel``, ``bias``).

  Attributes:
    features: output channels.
    kernel_size: side of the (cubic) kernel; odd.
    strides: stride on every spatial axis.
    spatial_dims: 2 or 3.
    use_bias: add a learned bias.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    kernel_init: initializer of the ``[*k, C_in, C_out]`` kernel.
    conv_lowering: how the convolution is computed (``"auto"``, ``"xla"``
      or ``"explicit"``); values and parameters are the same either way.
    upsample: upsample the input 2x (nearest neighbour) first; computed
      without the upsampled copy (``conv.upsample_conv``, 3-wide kernels
      with stride 1 only).
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  spatial_dims: int = 2
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_init
  conv_lowering: str = "xla"
  upsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C_in]`` -> ``[B, *spatial / strides, features]``
    (``[B, *spatial * 2, features]`` with ``upsample``)."""
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"Conv with spatial_dims={self.spatial_dims} expects "
                       f"{self.spatial_dims + 2}-d input, got {x.shape}")
    if self.upsample and (self.kernel_size != 3 or self.strides != 1):
      raise ValueError("Conv(upsample=True) needs kernel_size=3, strides=1; "
                       f"got {self.kernel_size}, {self.strides}")
    shape = (self.kernel_size,) * self.spatial_dims + (x.shape[-1],
                                                       self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    if self.upsample:
      y = conv_lib.upsample_conv(x.astype(self.dtype), kernel,
                                 self.conv_lowering)
    else:
      y = conv_nd(x.astype(self.dtype), kernel.astype(self.dtype),
                  self.strides, self.conv_lowering)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _group_stats(xf: jax.Array, num_groups: int, epsilon: float
                 ) -> Tuple[jax.Array, jax.Array]:
  """Per-(sample, group) mean and ``1 / std`` of ``xf [B, N, C]``, float32.

  Per-channel sums over all positions first (a contiguous reduction that
  vectorises over channels), then tiny per-group sums of ``[B, G, C / G]``;
  reducing ``[B, N, G, C / G]`` over two non-adjacent axes directly, as
  ``nn.GroupNorm`` does, is 3x slower on CPUs. Biased variance
  ``E[x^2] - E[x]^2``, as ``nn.GroupNorm``.
  """
  b, n, c = xf.shape
  count = n * (c // num_groups)
  sums = jnp.sum(xf, axis=1).reshape(b, num_groups, -1)
  squares = jnp.sum(jnp.square(xf), axis=1).reshape(b, num_groups, -1)
  mean = jnp.sum(sums, axis=-1) / count
  var = jnp.maximum(jnp.sum(squares, axis=-1) / count - jnp.square(mean), 0.0)
  return mean, jax.lax.rsqrt(var + epsilon)


def _per_channel(*group_values: jax.Array, channels: int) -> Tuple[jax.Array,
                                                                   ...]:
  """``[B, G]`` -> ``[B, C]`` (each group's value on its channels).

  Written as an exact matrix product with the ``[G, C]`` group-membership
  matrix rather than ``jnp.repeat``: XLA materialises a product's tiny
  result, while it fuses a repeat's channel-to-group index arithmetic into
  every element of the large ``x * a + b`` loops that read it (2.4x slower
  on CPUs; XLA:CPU drops optimisation barriers before fusion).
  """
  groups = group_values[0].shape[1]
  member = jnp.repeat(jnp.eye(groups, dtype=jnp.float32), channels // groups,
                      axis=1)
  return tuple(jnp.dot(v, member, precision=jax.lax.Precision.HIGHEST)
               for v in group_values)


def _silu_grad(y: jax.Array) -> jax.Array:
  sig = jax.nn.sigmoid(y)
  return sig * (1.0 + y * (1.0 - sig))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def group_norm_fn(x: jax.Array, scale: jax.Array, bias: jax.Array,
                  num_groups: int, epsilon: float = 1e-5,
                  dtype: Dtype = jnp.float32, silu: bool = False) -> jax.Array:
  """Group normalisation of ``[B, *spatial, C]`` with per-channel affine,
  optionally followed by SiLU.

  The same values as ``nn.GroupNorm`` (then ``nn.silu``), formulated for
  speed and memory on CPUs: statistics as in :func:`_group_stats`, the
  normalisation as one fused ``x * a + b`` pass with per-(sample, channel)
  ``a`` and ``b``, and a hand-written backward pass that keeps only ``x``
  and the ``[B, G]`` statistics (the normalised and activated values are
  recomputed inside the fused gradient loops instead of being stored) and
  needs two sweeps over the data: one multi-output reduction and one
  ``dy * P + x * Q + R`` pass.

  Args:
    x: ``[B, *spatial, C]``; ``C`` divisible by ``num_groups``.
    scale: ``[C]`` multiplier.
    bias: ``[C]`` offset.
    num_groups: groups of ``C / num_groups`` adjacent channels.
    epsilon: added to the variance.
    dtype: output dtype; statistics are always float32.
    silu: apply ``y * sigmoid(y)`` to the normalised output.

  Returns:
    ``[B, *spatial, C]`` in ``dtype``.
  """
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon, dtype, silu)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, dtype, silu):
  b, c = x.shape[0], x.shape[-1]
  if c % num_groups:
    raise ValueError(f"{c} channels not divisible by {num_groups} groups")
  xf = x.reshape(b, -1, c).astype(jnp.float32)
  mean, inv = _group_stats(xf, num_groups, epsilon)
  a, shift = _affine(*_per_channel(inv, mean, channels=c), scale, bias)
  y = xf * a[:, None, :] + shift[:, None, :]
  if silu:
    # As a division, which XLA counts as expensive and so materialises
    # once, instead of recomputing the normalisation inside each consumer
    # (e.g. the transposed copy a kernel gradient reads, 5x slower).
    y = y / (1.0 + jnp.exp(-y))
  return y.reshape(x.shape).astype(dtype), (x, scale, bias, mean, inv)


def _affine(inv_c, mean_c, scale, bias):
  """``y = x * a + shift`` coefficients ``[B, C]`` of the normalisation,
  from the per-channel ``1 / std`` and mean ``[B, C]``."""
  a = inv_c * scale.astype(jnp.float32)
  return a, bias.astype(jnp.float32) - mean_c * a


def _group_norm_bwd(num_groups, epsilon, dtype, silu, residuals, g):
  del epsilon, dtype
  x, scale, bias, mean, inv = residuals
  b, c = x.shape[0], x.shape[-1]
  xf = x.reshape(b, -1, c).astype(jnp.float32)
  gf = g.reshape(b, -1, c).astype(jnp.float32)
  count = xf.shape[1] * (c // num_groups)
  inv_c, mean_c = _per_channel(inv, mean, channels=c)
  if silu:
    a, shift = _affine(inv_c, mean_c, scale, bias)
    dy = gf * _silu_grad(xf * a[:, None, :] + shift[:, None, :])
  else:
    dy = gf
  # Per (sample, channel): sum dy and sum dy * x over positions.
  s1 = jnp.sum(dy, axis=1)
  s2 = jnp.sum(dy * xf, axis=1)
  scale_f = scale.astype(jnp.float32)
  by_group = lambda v: jnp.sum(v.reshape(b, num_groups, -1), axis=-1)
  group_s1 = by_group(s1 * scale_f)                              # [B, G]
  mean_dxhat = group_s1 / count
  # Group mean of dxhat * xhat, with xhat = (x - mean) * inv.
  mean_dxhat_xhat = (by_group(s2 * scale_f) - mean * group_s1) * inv / count
  # dx = inv * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
  #    = dy * (inv * scale) + x * q + r, per (sample, channel).
  q = -inv * inv * mean_dxhat_xhat
  r = -inv * mean_dxhat - q * mean
  q_c, r_c = _per_channel(q, r, channels=c)
  dx = (dy * (inv_c * scale_f)[:, None, :] + xf * q_c[:, None, :] +
        r_c[:, None, :])
  dscale = jnp.sum((s2 - mean_c * s1) * inv_c, axis=0)
  dbias = jnp.sum(s1, axis=0)
  return (dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype),
          dbias.astype(bias.dtype))


group_norm_fn.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """GroupNorm with ``nn.GroupNorm``'s parameters (``scale``, ``bias``).

  Values match ``nn.GroupNorm(num_groups, epsilon)`` (then ``nn.silu`` with
  ``silu=True``); the computation is :func:`group_norm_fn`.

  Attributes:
    num_groups: groups; must divide the channel count.
    epsilon: added to the variance.
    dtype: output dtype (statistics are float32).
    param_dtype: parameter dtype.
    silu: fuse a SiLU activation after the normalisation.
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  silu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C]`` -> ``[B, *spatial, C]``."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return group_norm_fn(x, scale, bias, self.num_groups, self.epsilon,
                         self.dtype, self.silu)


def group_norm(channels: int, num_groups: int, dtype: Dtype = jnp.float32,
               name: Optional[str] = None, silu: bool = False) -> GroupNorm:
  """GroupNorm with the largest group count ``<= num_groups`` dividing
  ``channels`` (so tiny test models need no special-casing).

  Statistics are reduced in float32 even for a bf16 ``dtype``; ``silu``
  fuses the activation that usually follows.
  """
  groups = min(num_groups, channels)
  while channels % groups:
    groups -= 1
  return GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype,
                   param_dtype=jnp.float32, name=name, silu=silu)


def timestep_embedding(t: jax.Array, dim: int,
                       max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of (float or integer) timesteps.

  Args:
    t: ``[B]`` timesteps.
    dim: embedding size (even).
    max_period: the lowest frequency is ``1 / max_period``.

  Returns:
    ``[B, dim]`` float32, ``[cos(t f_i), sin(t f_i)]`` with geometric ``f_i``
    in ``[1 / max_period, 1]``; tuned for ``t`` in ``[0, 1000]``, so scale
    continuous times in ``[0, 1]`` up first.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """Pre-activation residual block with an additive time/class embedding.

  ``GN -> SiLU -> Conv -> (+ Dense(emb)) -> GN -> SiLU -> Dropout -> Conv``,
  plus a 1x1 conv on the skip path when the channel count changes.

  Attributes:
    out_ch: output channels.
    num_groups: GroupNorm groups.
    dropout: dropout rate before the second conv.
    spatial_dims: 2 or 3.
    dtype: compute dtype.
  """

  out_ch: int
  num_groups: int = 32
  dropout: float = 0.0
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32
  conv_lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array,
               train: bool = False) -> jax.Array:
    """``x [B, *spatial, C]``, ``emb [B, E]`` -> ``[B, *spatial, out_ch]``."""
    conv = functools.partial(Conv, self.out_ch, spatial_dims=self.spatial_dims,
                             dtype=self.dtype, conv_lowering=self.conv_lowering)
    h = group_norm(x.shape[-1], self.num_groups, self.dtype, silu=True)(x)
    h = conv()(h)
    e = nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init)(
        nn.silu(emb))
    h = h + e.reshape(e.shape[:1] + (1,) * self.spatial_dims + e.shape[1:])
    h = group_norm(self.out_ch, self.num_groups, self.dtype, silu=True)(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(kernel_init=zero_init)(h)
    if x.shape[-1] != self.out_ch:
      x = conv(kernel_size=1)(x)
    return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all spatial positions, residual.

  Attributes:
    num_heads: attention heads; must divide the channel count.
    num_groups: GroupNorm groups.
    dtype: compute dtype (softmax is always float32).
  """

  num_heads: int = 4
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C]`` -> ``[B, *spatial, C]``."""
    ch = x.shape[-1]
    if ch % self.num_heads:
      raise ValueError(f"{ch} channels not divisible by {self.num_heads} heads")
    h = group_norm(ch, self.num_groups, self.dtype)(x)
    h = einops.rearrange(h, "b ... c -> b (...) c")
    qkv = nn.Dense(3 * ch, dtype=self.dtype, kernel_init=default_init,
                   name="qkv")(h)
    q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b n h d",
                               three=3, h=self.num_heads)
    # jax picks the fastest lowering (e.g. cuDNN flash attention on GPU).
    h = jax.nn.dot_product_attention(q, k, v)
    h = einops.rearrange(h, "b n h d -> b n (h d)")
    h = nn.Dense(ch, dtype=self.dtype, kernel_init=zero_init, name="proj")(h)
    return x.astype(self.dtype) + h.reshape(x.shape).astype(self.dtype)


class Downsample(nn.Module):
  """Halves every spatial side with a stride-2 3x3 conv."""

  out_ch: int
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32
  conv_lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C]`` -> ``[B, *spatial / 2, out_ch]``."""
    return Conv(self.out_ch, 3, strides=2, spatial_dims=self.spatial_dims,
                dtype=self.dtype, conv_lowering=self.conv_lowering)(x)


class Upsample(nn.Module):
  """Doubles every spatial side: nearest-neighbour resize then 3x3 conv.

  Resize-then-conv avoids the checkerboard artefacts of transposed convs.
  It is computed at the input resolution (``Conv(upsample=True)``): the same
  function and parameters with 2.25x (3D: 3.4x) fewer multiply-adds.
  """

  out_ch: int
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32
  conv_lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C]`` -> ``[B, *spatial * 2, out_ch]``."""
    return Conv(self.out_ch, 3, spatial_dims=self.spatial_dims,
                dtype=self.dtype, conv_lowering=self.conv_lowering,
                upsample=True)(x)


def rematerialized(cls: type, static_argnums=()) -> type:
  """``cls`` (a Module) whose activations are recomputed in the backward
  pass, under ``cls``'s name so its parameters keep their paths (a run
  can turn remat on or off and resume)."""
  wrapped = nn.remat(cls, static_argnums=static_argnums)
  return type(cls.__name__, (wrapped,), {"__module__": cls.__module__})

