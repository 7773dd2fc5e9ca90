"""Plain U-Net (Ronneberger et al. 2015) for segmentation and translation.

Unlike the diffusion :class:`~medgen_jax.nn.unet.UNet` it has no time or
class embedding: it maps an image to per-voxel logits (segmentation) or to
another contrast (image-to-image translation).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.nn import layers


class ConvBlock(nn.Module):
  """Two ``Conv -> GroupNorm -> SiLU`` layers.

  Attributes:
    out_ch: output channels.
    num_groups: GroupNorm groups.
    spatial_dims: 2 or 3.
    dtype: compute dtype.
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  out_ch: int
  num_groups: int = 8
  spatial_dims: int = 2
  dtype: Any = jnp.float32
  conv_lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C]`` -> ``[B, *spatial, out_ch]``."""
    for _ in range(2):
      x = layers.Conv(self.out_ch, 3, spatial_dims=self.spatial_dims,
                      dtype=self.dtype, conv_lowering=self.conv_lowering)(x)
      x = layers.group_norm(self.out_ch, self.num_groups, self.dtype,
                            silu=True)(x)
    return x


class SegUNet(nn.Module):
  """Encoder-decoder with skip connections, 2D or 3D.

  Attributes:
    out_channels: logits per voxel (classes) or output contrasts.
    ch: channels of the first level; level ``i`` has ``ch * ch_mult[i]``.
    ch_mult: channel multipliers, one per level.
    num_groups: GroupNorm groups.
    spatial_dims: 2 or 3.
    dtype: compute dtype; the output is float32.
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  out_channels: int
  ch: int = 16
  ch_mult: Sequence[int] = (1, 2, 4)
  num_groups: int = 8
  spatial_dims: int = 2
  dtype: Any = jnp.float32
  conv_lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``[B, *spatial, C_in]`` -> ``[B, *spatial, out_channels]``.

    Every spatial side must be divisible by ``2 ** (len(ch_mult) - 1)``.
    ``train`` is accepted for a uniform interface (no dropout here).
    """
    del train
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"SegUNet(spatial_dims={self.spatial_dims}) expects "
                       f"{self.spatial_dims + 2}-d input, got {x.shape}")
    if any(s % factor for s in x.shape[1:-1]):
      raise ValueError(f"spatial sides {x.shape[1:-1]} must be divisible by "
                       f"{factor} for ch_mult={tuple(self.ch_mult)}")
    kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype,
              conv_lowering=self.conv_lowering)
    block = functools.partial(ConvBlock, num_groups=self.num_groups, **kw)
    skips = []
    h = x
    for level, mult in enumerate(self.ch_mult):
      h = block(self.ch * mult)(h)
      if level != len(self.ch_mult) - 1:
        skips.append(h)
        h = layers.Downsample(h.shape[-1], **kw)(h)
    for mult in reversed(self.ch_mult[:-1]):
      h = layers.Upsample(self.ch * mult, **kw)(h)
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = block(self.ch * mult)(h)
    h = layers.Conv(self.out_channels, 1, **kw)(h)
    return h.astype(jnp.float32)
