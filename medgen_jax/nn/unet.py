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
    remat: recompute each ResBlock's activations in the backward pass
      instead of keeping them (gradient checkpointing): less memory for
      about a third more compute; where memory binds, e.g. 3D volumes.
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
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               y: Optional[jax.Array] = None,
               train: bool = False,
               control: Optional[Sequence[jax.Array]] = None) -> jax.Array:
    """Predicts the network target (eps, v, ...) for noisy images.

    Args:
      x: ``[B, H, W, C]`` (2D) or ``[B, D, H, W, C]`` (3D); every spatial
        side divisible by ``2 ** (len(ch_mult) - 1)``.
      t: ``[B]`` timesteps, integer or float.
      y: ``[B]`` int class labels in ``[0, num_classes]`` (``num_classes`` is
        the null label), or ``None`` (means null for a conditional net).
      train: enables dropout (needs a ``"dropout"`` rng).
      control: a :class:`ControlNet`'s residuals, one per skip connection
        and one for the middle block, added to them (``None``: none).

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
    kw, res_block, attn_block = _blocks(self)
    emb = self._embed(t, y, x.shape[0])
    h, hs = _encoder(self, x, emb, train)
    if control is not None:
      h = h + control[-1].astype(h.dtype)
      hs = [a + c.astype(a.dtype) for a, c in zip(hs, control[:-1])]
    side = x.shape[-3] // factor

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
    return _embed(self, t, y, batch)


def _blocks(module: nn.Module):
  """``(conv kwargs, ResBlock, AttentionBlock)`` builders of a U-Net-shaped
  ``module`` (one with :class:`UNet`'s attributes)."""
  kw = dict(spatial_dims=module.spatial_dims, dtype=module.dtype,
            conv_lowering=module.conv_lowering)
  # ``train`` (argument 3, counting the module) decides dropout: static.
  block = (layers.rematerialized(layers.ResBlock, static_argnums=(3,))
           if getattr(module, "remat", False) else layers.ResBlock)
  res_block = functools.partial(block, num_groups=module.num_groups,
                                dropout=module.dropout, **kw)
  attn_block = functools.partial(layers.AttentionBlock, module.num_heads,
                                 module.num_groups, module.dtype)
  return kw, res_block, attn_block


def _encoder(module: nn.Module, x: jax.Array, emb: jax.Array, train: bool,
             hint: Optional[jax.Array] = None):
  """The input convolution, the downsampling levels and the middle block,
  built inside ``module``'s compact call (so a :class:`ControlNet` names
  its copy's parameters as the :class:`UNet` does and can start from its
  weights). ``hint`` is added after the input convolution.

  Returns:
    ``(middle output, [skip activations]))``.
  """
  kw, res_block, attn_block = _blocks(module)
  h = layers.Conv(module.ch, 3, **kw)(x)
  if hint is not None:
    h = h + hint.astype(h.dtype)
  hs = [h]
  side = x.shape[-3]  # In-plane side H, in 2D and 3D.
  for level, mult in enumerate(module.ch_mult):
    for _ in range(module.num_res_blocks):
      h = res_block(module.ch * mult)(h, emb, train)
      if side in module.attn_resolutions:
        h = attn_block()(h)
      hs.append(h)
    if level != len(module.ch_mult) - 1:
      h = layers.Downsample(h.shape[-1], **kw)(h)
      side //= 2
      hs.append(h)
  h = res_block(h.shape[-1])(h, emb, train)
  h = attn_block()(h)
  h = res_block(h.shape[-1])(h, emb, train)
  return h, hs


def _embed(module: nn.Module, t: jax.Array, y: Optional[jax.Array],
           batch: int) -> jax.Array:
  """:meth:`UNet._embed` of any U-Net-shaped module."""
  dim = 4 * module.ch
  emb = layers.timestep_embedding(jnp.broadcast_to(t, (batch,)), module.ch)
  emb = nn.Dense(dim, kernel_init=layers.default_init)(emb)
  emb = nn.Dense(dim, kernel_init=layers.default_init)(nn.silu(emb))
  if module.num_classes > 0:
    if y is None:
      y = jnp.full((batch,), module.num_classes, jnp.int32)
    emb = emb + nn.Embed(module.num_classes + 1, dim, name="class_embed")(y)
  elif y is not None:
    raise ValueError("labels given to an unconditional UNet (num_classes=0)")
  return emb


class ControlNet(UNet):
  """A ControlNet adapter (Zhang et al. 2023) for a trained :class:`UNet`:
  a trainable copy of its input convolution, downsampling levels and
  middle block, fed the noisy image plus an encoded ``hint`` (e.g. a lesion
  mask), whose activations reach the frozen U-Net through zero-initialised
  1x1 convolutions: at initialisation the adapted model is exactly the
  base model.

  Attributes: :class:`UNet`'s (they must match the base model's, so the
  copy can start from its weights; ``out_channels`` is unused), plus
  ``hint_ch``: channels of the hint encoder's hidden layers.
  """

  hint_ch: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, hint: jax.Array, t: jax.Array,  # pylint: disable=arguments-renamed
               y: Optional[jax.Array] = None,
               train: bool = False) -> List[jax.Array]:
    """Residuals for the base U-Net's ``control`` argument.

    Args:
      x: ``[B, *S, C]`` the base model's input.
      hint: ``[B, *S, K]`` the condition (same spatial shape as ``x``).
      t, y, train: as :class:`UNet`.

    Returns:
      One array per skip connection of the base U-Net, then one for its
      middle block.
    """
    kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype,
              conv_lowering=self.conv_lowering)
    emb = _embed(self, t, y, x.shape[0])
    g = hint
    for i in range(2):
      g = nn.silu(layers.Conv(self.hint_ch, 3, name=f"hint_{i}", **kw)(g))
    g = layers.Conv(self.ch, 3, kernel_init=layers.zero_init,
                    name="hint_out", **kw)(g)
    h, hs = _encoder(self, x, emb, train, hint=g)
    return [layers.Conv(a.shape[-1], 1, kernel_init=layers.zero_init,
                        name=f"zero_{i}", **kw)(a)
            for i, a in enumerate(hs + [h])]


def controlnet_init(base_params, control_params):
  """``control_params`` with every parameter the copy shares with the base
  U-Net (same path and shape) taken from ``base_params``: the adapter
  starts as a copy of the trained encoder, its hint path and zero
  convolutions as initialised."""
  def take(base, own):
    if isinstance(own, dict):
      return {k: take(base.get(k) if isinstance(base, dict) else None, v)
              for k, v in own.items()}
    if base is not None and getattr(base, "shape", None) == own.shape:
      return jnp.asarray(base, own.dtype)
    return own
  return take(base_params, control_params)


# The ``model`` section a :class:`UNet` is built from.
MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions",
              "num_heads", "dropout", "num_groups", "dtype", "conv_lowering")
# Keys a ``model`` section may add; the defaults hold without them.
OPTIONAL_MODEL_KEYS = ("remat",)


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
  given = {k: v for k, v in model.items() if k not in OPTIONAL_MODEL_KEYS}
  if not checks.section_keys(errors, "model", given, MODEL_KEYS, "the U-Net"):
    return errors
  if not isinstance(model.get("remat", False), bool):
    errors.append(f"model.remat={model.remat!r} must be true or false")
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
