"""Building blocks shared by every network, in 2D and 3D.

Images are channels-last: ``[B, H, W, C]`` when ``spatial_dims == 2`` and
``[B, D, H, W, C]`` when ``spatial_dims == 3``. Every module takes a compute
``dtype`` (e.g. ``jnp.bfloat16``) while parameters stay ``float32``.

All convolutions of all networks go through :class:`Conv` (and its lowering
:func:`conv_nd`), so a faster lowering can be swapped in one place.
"""

import functools
import math
from typing import Any, Callable, Optional

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
    lowering: ``"auto"``, ``"xla"`` or ``"gemm"`` (see
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
      or ``"gemm"``); values and parameters are the same either way.
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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C_in]`` -> ``[B, *spatial / strides, features]``."""
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"Conv with spatial_dims={self.spatial_dims} expects "
                       f"{self.spatial_dims + 2}-d input, got {x.shape}")
    shape = (self.kernel_size,) * self.spatial_dims + (x.shape[-1],
                                                       self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    y = conv_nd(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
                self.conv_lowering)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def group_norm_fn(x: jax.Array, scale: jax.Array, bias: jax.Array,
                  num_groups: int, epsilon: float = 1e-5,
                  dtype: Dtype = jnp.float32) -> jax.Array:
  """Group normalisation of ``[B, *spatial, C]`` with per-channel affine.

  The same values as ``nn.GroupNorm`` (biased variance ``E[x^2] - E[x]^2``),
  formulated for speed on CPUs: per-channel sums over all positions first
  (a contiguous reduction of ``[B, N, C]`` that vectorises over channels),
  then tiny per-group sums of ``[B, G, C / G]``, and a single fused
  ``x * a + b`` pass with per-(sample, channel) ``a`` and ``b``. Reducing
  ``[B, N, G, C / G]`` over two non-adjacent axes directly, as
  ``nn.GroupNorm`` does, is 3x slower there (forward and backward).

  Args:
    x: ``[B, *spatial, C]``; ``C`` divisible by ``num_groups``.
    scale: ``[C]`` multiplier.
    bias: ``[C]`` offset.
    num_groups: groups of ``C / num_groups`` adjacent channels.
    epsilon: added to the variance.
    dtype: output dtype; statistics are always float32.

  Returns:
    ``[B, *spatial, C]`` in ``dtype``.
  """
  b, c = x.shape[0], x.shape[-1]
  if c % num_groups:
    raise ValueError(f"{c} channels not divisible by {num_groups} groups")
  per_group = c // num_groups
  xf = x.reshape(b, -1, c).astype(jnp.float32)
  count = xf.shape[1] * per_group
  sums = jnp.sum(xf, axis=1).reshape(b, num_groups, per_group)
  squares = jnp.sum(jnp.square(xf), axis=1).reshape(b, num_groups, per_group)
  mean = jnp.sum(sums, axis=-1) / count                       # [B, G]
  var = jnp.maximum(jnp.sum(squares, axis=-1) / count - jnp.square(mean), 0.0)
  inv = jax.lax.rsqrt(var + epsilon)
  mul = jnp.repeat(inv, per_group, axis=1) * scale.astype(jnp.float32)
  add = bias.astype(jnp.float32) - jnp.repeat(mean, per_group, axis=1) * mul
  y = xf * mul[:, None, :] + add[:, None, :]
  return y.reshape(x.shape).astype(dtype)


class GroupNorm(nn.Module):
  """GroupNorm with ``nn.GroupNorm``'s parameters (``scale``, ``bias``).

  Values match ``nn.GroupNorm(num_groups, epsilon)``; the computation is
  :func:`group_norm_fn`.

  Attributes:
    num_groups: groups; must divide the channel count.
    epsilon: added to the variance.
    dtype: output dtype (statistics are float32).
    param_dtype: parameter dtype.
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C]`` -> ``[B, *spatial, C]``."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return group_norm_fn(x, scale, bias, self.num_groups, self.epsilon,
                         self.dtype)


def group_norm(channels: int, num_groups: int, dtype: Dtype = jnp.float32,
               name: Optional[str] = None) -> GroupNorm:
  """GroupNorm with the largest group count ``<= num_groups`` dividing
  ``channels`` (so tiny test models need no special-casing).

  Statistics are reduced in float32 even for a bf16 ``dtype``.
  """
  groups = min(num_groups, channels)
  while channels % groups:
    groups -= 1
  return GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


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
    h = nn.silu(group_norm(x.shape[-1], self.num_groups, self.dtype)(x))
    h = conv()(h)
    e = nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init)(
        nn.silu(emb))
    h = h + e.reshape(e.shape[:1] + (1,) * self.spatial_dims + e.shape[1:])
    h = nn.silu(group_norm(self.out_ch, self.num_groups, self.dtype)(h))
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
  """

  out_ch: int
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32
  conv_lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C]`` -> ``[B, *spatial * 2, out_ch]``."""
    for axis in range(1, 1 + self.spatial_dims):
      x = jnp.repeat(x, 2, axis=axis)
    return Conv(self.out_ch, 3, spatial_dims=self.spatial_dims,
                dtype=self.dtype, conv_lowering=self.conv_lowering)(x)
