"""DDPM/ADM-style U-Net noise-prediction network, in 2D or 3D."""

import functools
from typing import Any, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax import checks
from medgen_jax.nn import conv as conv_lib
from medgen_jax.nn import layers


class UNet(nn.Module):
  """U-Net of Ho et al. (2020) with the ADM (Dhariwal & Nichol) conventions.

  Per level: ``num_res_blocks`` ResBlocks (each followed by attention when the
  level's side is in ``attn_resolutions``), then a stride-2 downsample; a
  ResBlock-Attention-ResBlock middle; the decoder mirrors the encoder with
  ``num_res_blocks + 1`` ResBlocks per level fed by skip connections.

  Attributes:
    ch: base channel count; level ``i`` has ``ch * ch_mult[i]`` channels.
    ch_mult: channel multipliers, one per resolution level.
    num_res_blocks: ResBlocks per encoder level.
    attn_resolutions: spatial sides (the in-plane side ``H``) of the levels
      that get self-attention, e.g. ``(16,)``.
    num_heads: attention heads.
    dropout: dropout rate inside ResBlocks (active when ``train``).
    num_groups: GroupNorm groups.
    out_channels: output channels (``0``: same as the input).
    spatial_dims: 2 or 3.
    num_classes: ``0`` for an unconditional net; otherwise a class embedding
      with ``num_classes + 1`` rows, the last (index ``num_classes``) being the
      "null" label used for classifier-free guidance.
    dtype: compute dtype; parameters are float32 and the output is float32.
    conv_lowering: ``"auto"``, ``"xla"`` or ``"explicit"`` (see
      :mod:`medgen_jax.nn.conv`).
  """

  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 4
  dropout: float = 0.0
  num_groups: int = 32
  out_channels: int = 0
  spatial_dims: int = 2
  num_classes: int = 0
  dtype: Any = jnp.float32
  conv_lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               y: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Predicts the network target (eps, v, ...) for noisy images.

    Args:
      x: ``[B, H, W, C]`` (2D) or ``[B, D, H, W, C]`` (3D); every spatial
        side divisible by ``2 ** (len(ch_mult) - 1)``.
      t: ``[B]`` timesteps, integer or float.
      y: ``[B]`` int class labels in ``[0, num_classes]`` (``num_classes`` is
        the null label), or ``None`` (means null for a conditional net).
      train: enables dropout (needs a ``"dropout"`` rng).

    Returns:
      ``[B, *spatial, out_channels]`` float32.
    """
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"UNet(spatial_dims={self.spatial_dims}) expects "
                       f"{self.spatial_dims + 2}-d input, got {x.shape}")
    factor = 2 ** (len(self.ch_mult) - 1)
    if any(s % factor for s in x.shape[1:-1]):
      raise ValueError(f"spatial sides {x.shape[1:-1]} must be divisible by "
                       f"{factor} for ch_mult={tuple(self.ch_mult)}")
    out_channels = self.out_channels or x.shape[-1]
    kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype,
              conv_lowering=self.conv_lowering)
    res_block = functools.partial(layers.ResBlock, num_groups=self.num_groups,
                                  dropout=self.dropout, **kw)
    attn_block = functools.partial(layers.AttentionBlock, self.num_heads,
                                   self.num_groups, self.dtype)

    emb = self._embed(t, y, x.shape[0])

    h = layers.Conv(self.ch, 3, **kw)(x)
    hs = [h]
    side = x.shape[-3]  # In-plane side H, in 2D and 3D.
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(self.ch * mult)(h, emb, train)
        if side in self.attn_resolutions:
          h = attn_block()(h)
        hs.append(h)
      if level != len(self.ch_mult) - 1:
        h = layers.Downsample(h.shape[-1], **kw)(h)
        side //= 2
        hs.append(h)

    h = res_block(h.shape[-1])(h, emb, train)
    h = attn_block()(h)
    h = res_block(h.shape[-1])(h, emb, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
        h = res_block(self.ch * mult)(h, emb, train)
        if side in self.attn_resolutions:
          h = attn_block()(h)
      if level != 0:
        h = layers.Upsample(h.shape[-1], **kw)(h)
        side *= 2

    h = layers.group_norm(h.shape[-1], self.num_groups, self.dtype,
                          silu=True)(h)
    h = layers.Conv(out_channels, 3, kernel_init=layers.zero_init, **kw)(h)
    return h.astype(jnp.float32)

  def _embed(self, t: jax.Array, y: Optional[jax.Array],
             batch: int) -> jax.Array:
    """Time (plus class) embedding ``[B, 4 * ch]``, float32."""
    dim = 4 * self.ch
    emb = layers.timestep_embedding(jnp.broadcast_to(t, (batch,)), self.ch)
    emb = nn.Dense(dim, kernel_init=layers.default_init)(emb)
    emb = nn.Dense(dim, kernel_init=layers.default_init)(nn.silu(emb))
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((batch,), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, dim, name="class_embed")(y)
    elif y is not None:
      raise ValueError("labels given to an unconditional UNet (num_classes=0)")
    return emb


# The ``model`` section a :class:`UNet` is built from.
MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions",
              "num_heads", "dropout", "num_groups", "dtype", "conv_lowering")


def pyramid_errors(model, res, prefix: str = "model") -> List[str]:
  """Problems of a conv pyramid's ``ch``/``ch_mult``/``num_groups``/
  ``dtype``/``conv_lowering`` at image side ``res`` (U-Nets and the
  autoencoders alike)."""
  errors: List[str] = []
  ch, ch_mult, groups = model["ch"], model["ch_mult"], model["num_groups"]
  levels = len(ch_mult)
  if not levels:
    errors.append(f"{prefix}.ch_mult is empty")
  elif isinstance(res, int) and res % (2 ** (levels - 1)):
    errors.append(f"data.res={res} must be divisible by 2**(len({prefix}."
                  f"ch_mult)-1)={2 ** (levels - 1)}")
  for mult in ch_mult:
    if (ch * mult) % groups:
      errors.append(f"{prefix}.num_groups={groups} must divide every "
                    f"level's channels (ch*ch_mult = {ch * mult})")
      break
  checks.one_of(errors, f"{prefix}.dtype", model["dtype"],
                ("float32", "bfloat16"))
  checks.one_of(errors, f"{prefix}.conv_lowering", model["conv_lowering"],
                conv_lib.LOWERINGS)
  return errors


def config_errors(model, res) -> List[str]:
  """Problems of a U-Net ``model`` section at image side ``res``."""
  errors: List[str] = []
  if not checks.section_keys(errors, "model", model, MODEL_KEYS, "the U-Net"):
    return errors
  errors += pyramid_errors(model, res)
  if model.ch_mult and (model.ch * model.ch_mult[-1]) % model.num_heads:
    errors.append(f"model.num_heads={model.num_heads} must divide the "
                  f"middle attention's channels ({model.ch * model.ch_mult[-1]})")
  return errors


def translator_model_errors(model, res) -> List[str]:
  """Problems of a ``model`` section with a generator pyramid (``g_ch``,
  ``g_ch_mult``) and a PatchGAN (``d_layers``) at image side ``res``."""
  errors = pyramid_errors(
      dict(ch=model.g_ch, ch_mult=model.g_ch_mult, num_groups=model.num_groups,
           dtype=model.dtype, conv_lowering=model.conv_lowering),
      res, prefix="model.g")
  checks.positive(errors, "model.d_layers", model.d_layers)
  return errors
