"""ResNet classifier (2D/3D) whose penultimate layer doubles as an encoder.

GroupNorm replaces BatchNorm: medical batches are small, the downstream
study trains several seeds in one vmapped program (batch statistics would
need a mutable collection per seed), and the same network then behaves
identically in training and evaluation.
"""

import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.nn import layers


class BasicBlock(nn.Module):
  """ResNet basic block (He et al. 2016, v2 pre-activation ordering).

  Attributes:
    out_ch: output channels.
    strides: stride of the first conv (2 halves every spatial side).
    num_groups: GroupNorm groups.
    spatial_dims: 2 or 3.
    dtype: compute dtype.
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  out_ch: int
  strides: int = 1
  num_groups: int = 8
  spatial_dims: int = 2
  dtype: Any = jnp.float32
  conv_lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *spatial, C]`` -> ``[B, *spatial / strides, out_ch]``."""
    conv = functools.partial(layers.Conv, self.out_ch,
                             spatial_dims=self.spatial_dims, dtype=self.dtype,
                             conv_lowering=self.conv_lowering)
    h = layers.group_norm(x.shape[-1], self.num_groups, self.dtype,
                          silu=True)(x)
    skip = x
    if self.strides != 1 or x.shape[-1] != self.out_ch:
      # Projection from the normalised input, as in pre-activation ResNets.
      skip = conv(kernel_size=1, strides=self.strides, use_bias=False)(h)
    h = conv(strides=self.strides)(h)
    h = layers.group_norm(self.out_ch, self.num_groups, self.dtype,
                          silu=True)(h)
    h = conv(kernel_init=layers.zero_init)(h)
    return skip.astype(self.dtype) + h


class ResNet(nn.Module):
  """Pre-activation ResNet for small medical images.

  A 3x3 stem (no 7x7/max-pool: 28-128 px inputs cannot afford the 4x early
  downsampling of ImageNet ResNets), ``len(stage_sizes)`` stages of basic
  blocks, the first block of every stage after the first halving the
  resolution, then GroupNorm-SiLU, global average pooling and a linear head.

  Attributes:
    num_classes: logits produced.
    width: channels of the first stage; stage ``i`` has ``width * 2**i``.
    stage_sizes: basic blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    num_groups: GroupNorm groups.
    dropout: dropout on the pooled features (active when ``train``).
    spatial_dims: 2 or 3.
    dtype: compute dtype; logits and features are float32.
    conv_lowering: see :mod:`medgen_jax.nn.conv`.
  """

  num_classes: int
  width: int = 32
  stage_sizes: Sequence[int] = (1, 1, 1)
  num_groups: int = 8
  dropout: float = 0.0
  spatial_dims: int = 2
  dtype: Any = jnp.float32
  conv_lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False, return_stages: bool = False
               ) -> jax.Array | Tuple[jax.Array, ...]:
    """Classifies ``x``.

    Args:
      x: ``[B, *spatial, C]`` images.
      train: enables dropout (needs a ``"dropout"`` rng).
      return_features: also return the pooled penultimate features.
      return_stages: also return every stage's output (a perceptual loss's
        feature maps), as a tuple last.

    Returns:
      logits ``[B, num_classes]``, then features ``[B, width * 2**(S-1)]``
      when ``return_features``, then ``(stage_0, ...)`` (``[B, *spatial /
      2**i, width * 2**i]``) when ``return_stages``.
    """
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"ResNet(spatial_dims={self.spatial_dims}) expects "
                       f"{self.spatial_dims + 2}-d input, got {x.shape}")
    kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype,
              conv_lowering=self.conv_lowering)
    h = layers.Conv(self.width, 3, **kw)(x)
    stages = []
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        h = BasicBlock(self.width * 2**stage, strides, self.num_groups,
                       **kw)(h)
      stages.append(h)
    h = layers.group_norm(h.shape[-1], self.num_groups, self.dtype,
                          silu=True)(h)
    features = jnp.mean(h.astype(jnp.float32),
                        axis=tuple(range(1, 1 + self.spatial_dims)))
    h = nn.Dropout(self.dropout, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, name="head")(h)
    out = (logits,) + ((features,) if return_features else ()) + (
        (tuple(stages),) if return_stages else ())
    return out if len(out) > 1 else logits
