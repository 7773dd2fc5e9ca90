"""Image similarity metrics: SSIM, MS-SSIM, PSNR, MAE, MS-SSIM diversity.

Images are channels-last ``[B, H, W, C]`` (2D) or ``[B, D, H, W, C]`` (3D);
every metric returns one value per image ``[B]`` (channels are averaged), so
callers can average, take medians or keep per-case values. ``data_range`` is
always explicit: it is the span of valid intensities (2 for images in
[-1, 1], 1 for [0, 1], ``max - min`` of the reference for signal units) and
SSIM's stabilising constants and PSNR's peak depend on it; a scalar or one
value per image ``[B]``.
"""

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Wang, Simoncelli & Bovik (2003): weights of the five MS-SSIM scales, finest
# first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
K1, K2 = 0.01, 0.03


def _spatial_dims(x: jax.Array, name: str) -> int:
  if x.ndim not in (4, 5):
    raise ValueError(f"{name}: expected [B, H, W, C] or [B, D, H, W, C], got "
                     f"shape {x.shape}")
  return x.ndim - 2


def _check_pair(x, y) -> Tuple[jax.Array, jax.Array]:
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  _spatial_dims(x, "x")
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and "
                     f"{y.shape}")
  return x, y


def _per_image(value, x: jax.Array) -> jax.Array:
  """A scalar or ``[B]`` value broadcast against ``x`` ``[B, ...]``."""
  if isinstance(value, (int, float, np.number, np.ndarray)) and np.any(
      np.asarray(value) <= 0):
    raise ValueError(f"data_range must be positive, got {value}")
  v = jnp.asarray(value, jnp.float32)
  if v.ndim == 0:
    return v
  if v.shape != (x.shape[0],):
    raise ValueError(f"data_range: expected a scalar or shape "
                     f"({x.shape[0]},), got {v.shape}")
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def gaussian_window(size: int, sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian ``[size]`` (the separable SSIM window)."""
  t = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-t**2 / (2 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _band(n: int, win: np.ndarray) -> np.ndarray:
  """``[n - size + 1, n]`` matrix whose rows are ``win`` shifted by one."""
  size = win.shape[0]
  band = np.zeros((n - size + 1, n), np.float32)
  for i in range(n - size + 1):
    band[i, i:i + size] = win
  return band


def _filter_valid(x: jax.Array, win: np.ndarray) -> jax.Array:
  """Separable 'valid' correlation with ``win`` on every spatial axis.

  ``[B, *S, C] -> [B, *(S - len(win) + 1), C]``. One banded matrix product
  per axis: the same code in 2D and 3D, no channel mixing, quick to compile
  and fast on accelerators (at full float32 precision).
  """
  for axis in range(1, x.ndim - 1):
    band = jnp.asarray(_band(x.shape[axis], win))
    x = jnp.moveaxis(jnp.tensordot(band, x, axes=[[1], [axis]],
                                   precision=jax.lax.Precision.HIGHEST),
                     0, axis)
  return x


def _ssim_terms(x: jax.Array, y: jax.Array,
                win: np.ndarray) -> Tuple[jax.Array, jax.Array]:
  """Mean SSIM and mean contrast-structure term, ``[B, C]`` each.

  ``x`` and ``y`` are divided by the data range already, so ``L = 1``.
  """
  c1, c2 = K1**2, K2**2
  # One filter pass over all five local moments.
  moments = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], -1),
                          win)
  mu_x, mu_y, e_xx, e_yy, e_xy = jnp.split(moments, 5, axis=-1)
  # Weighted (population) moments, as in Wang et al. (2004).
  var_x = e_xx - mu_x**2
  var_y = e_yy - mu_y**2
  cov = e_xy - mu_x * mu_y
  cs = (2 * cov + c2) / (var_x + var_y + c2)
  lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
  axes = tuple(range(1, x.ndim - 1))
  return jnp.mean(lum * cs, axis=axes), jnp.mean(cs, axis=axes)


def _check_window(shape: Sequence[int], win_size: int) -> None:
  if win_size < 1 or win_size % 2 == 0:
    raise ValueError(f"win_size must be odd and positive, got {win_size}")
  spatial = tuple(shape[1:-1])
  if min(spatial) < win_size:
    raise ValueError(f"SSIM: spatial shape {spatial} is smaller than the "
                     f"{win_size}-wide window; pass a smaller win_size")


@functools.partial(jax.jit, static_argnames=("win_size", "sigma"))
def _ssim(x, y, data_range, win_size, sigma):
  win = gaussian_window(win_size, sigma)
  s, _ = _ssim_terms(x / data_range, y / data_range, win)
  return jnp.mean(s, axis=-1)


def ssim(x, y, data_range, win_size: int = 11,
         sigma: float = 1.5) -> jax.Array:
  """Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004).

  ``SSIM = mean over windows of l * cs`` with
  ``l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)``,
  ``cs = (2 s_xy + C2) / (s_x^2 + s_y^2 + C2)``, ``C1 = (0.01 L)^2``,
  ``C2 = (0.03 L)^2``, ``L = data_range``; local moments use a Gaussian
  window (11 wide, sigma 1.5), separable over 2 or 3 spatial axes, only at
  positions where the window fits (no padding, as in TensorFlow's
  ``tf.image.ssim``). Channels are averaged. In [-1, 1], higher is better, 1
  for identical images.

  Args:
    x: ``[B, H, W, C]`` or ``[B, D, H, W, C]``.
    y: same shape as ``x``.
    data_range: ``L``, a scalar or ``[B]``.
    win_size: odd window width; every spatial side must be >= it.
    sigma: Gaussian standard deviation in voxels.

  Returns:
    ``[B]`` float32.
  """
  x, y = _check_pair(x, y)
  _check_window(x.shape, win_size)
  return _ssim(x, y, _per_image(data_range, x), win_size, float(sigma))


def ms_ssim_num_scales(shape: Sequence[int], win_size: int = 11) -> int:
  """Most MS-SSIM scales (<= 5) an image of ``shape`` ``[B, *S, C]`` allows:
  the coarsest scale, ``S // 2^(n-1)``, must still hold the window."""
  smallest = min(shape[1:-1])
  n = 0
  while n < len(MS_SSIM_WEIGHTS) and smallest // 2**n >= win_size:
    n += 1
  return n


def _downsample(x: jax.Array) -> jax.Array:
  """2x average pooling on every spatial axis (odd trailing rows dropped)."""
  s = x.ndim - 2
  window = (1,) + (2,) * s + (1,)
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window,
                               "VALID") / 2**s


@functools.partial(jax.jit, static_argnames=("weights", "win_size", "sigma"))
def _ms_ssim(x, y, data_range, weights, win_size, sigma):
  win = gaussian_window(win_size, sigma)
  x, y = x / data_range, y / data_range
  value = 1.0
  for i, w in enumerate(weights):
    s, cs = _ssim_terms(x, y, win)
    # Negative cs/SSIM (anti-correlated structure) would make fractional
    # powers NaN; clip at 0 as pytorch-msssim and TF-GAN effectively do.
    term = s if i == len(weights) - 1 else cs
    value = value * jnp.maximum(term, 0.0)**w
    if i < len(weights) - 1:
      x, y = _downsample(x), _downsample(y)
  return jnp.mean(value, axis=-1)


def ms_ssim(x, y, data_range, num_scales: Optional[int] = None,
            weights: Optional[Sequence[float]] = None, win_size: int = 11,
            sigma: float = 1.5) -> jax.Array:
  """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003).

  ``MS-SSIM = prod_{j<n} cs_j^{w_j} * SSIM_n^{w_n}`` over ``n`` dyadic scales
  (2x average pooling between scales, in 2D or 3D), per channel, then
  averaged over channels. Negative terms are clipped at 0. Higher is better,
  1 for identical images.

  The standard five scales with an 11-wide window need every spatial side
  >= 176 (the coarsest scale is 1/16 of the image). Smaller medical images
  get fewer scales: with ``num_scales=None`` the most that fit (see
  :func:`ms_ssim_num_scales`) with the first standard weights renormalised to
  sum to 1 (so 1 scale is plain SSIM). Such values are not comparable with
  5-scale values from the literature; record the number of scales beside
  them. An explicit ``num_scales`` that does not fit is an error.

  Args:
    x: ``[B, H, W, C]`` or ``[B, D, H, W, C]``.
    y: same shape as ``x``.
    data_range: intensity span ``L``, a scalar or ``[B]``.
    num_scales: scales to use (1..5), or ``None`` for the most that fit.
    weights: per-scale exponents, finest first; default: the standard
      weights of the used scales, renormalised.
    win_size: odd Gaussian window width.
    sigma: Gaussian standard deviation in voxels.

  Returns:
    ``[B]`` float32.
  """
  x, y = _check_pair(x, y)
  _check_window(x.shape, win_size)
  fit = ms_ssim_num_scales(x.shape, win_size)
  n = fit if num_scales is None else num_scales
  if not 1 <= n <= len(MS_SSIM_WEIGHTS):
    raise ValueError(f"num_scales must be in 1..5, got {n}")
  if n > fit:
    need = win_size * 2**(n - 1)
    raise ValueError(
        f"MS-SSIM: spatial shape {tuple(x.shape[1:-1])} is too small for {n} "
        f"scales with a {win_size}-wide window (every side must be >= {need}); "
        f"at most {fit} fit: pass num_scales=None to adapt or a smaller "
        f"win_size")
  if weights is None:
    w = np.asarray(MS_SSIM_WEIGHTS[:n], np.float64)
    weights = tuple(float(v) for v in w / w.sum())
  elif len(weights) != n:
    raise ValueError(f"weights has {len(weights)} entries for {n} scales")
  return _ms_ssim(x, y, _per_image(data_range, x),
                  tuple(float(v) for v in weights), win_size, float(sigma))


def mse(x, y) -> jax.Array:
  """Mean squared error per image, ``[B]``; lower is better."""
  x, y = _check_pair(x, y)
  return jnp.mean((x - y)**2, axis=tuple(range(1, x.ndim)))


def mae(x, y) -> jax.Array:
  """Mean absolute error per image, ``[B]``, in intensity units; lower is
  better. For translation report it in the target's signal units (or say
  which normalisation was applied)."""
  x, y = _check_pair(x, y)
  return jnp.mean(jnp.abs(x - y), axis=tuple(range(1, x.ndim)))


def psnr(x, y, data_range) -> jax.Array:
  """Peak signal-to-noise ratio per image, ``[B]``, in dB.

  ``PSNR = 10 log10(L^2 / MSE)`` with ``L = data_range`` (a scalar or
  ``[B]``); higher is better; ``+inf`` for identical images.
  """
  x, y = _check_pair(x, y)
  peak = _per_image(data_range, x).reshape(-1)
  return 10.0 * jnp.log10(peak**2 / mse(x, y))


def ms_ssim_diversity(samples, num_pairs: int, rng: jax.Array, data_range,
                      batch_size: int = 64, **ms_ssim_kwargs) -> float:
  """Mean MS-SSIM between random pairs of distinct samples.

  A diversity measure for generated sets (Odena et al. 2017): lower means
  more diverse; mode collapse drives it towards 1. Compare with the same
  statistic on real images of the same class/contrast. Pairs ``(i, j)``,
  ``i != j``, are drawn uniformly with replacement.

  Args:
    samples: ``[N, H, W, C]`` or ``[N, D, H, W, C]``, N >= 2.
    num_pairs: pairs to average.
    rng: PRNG key for the pair draw.
    data_range: intensity span, a scalar.
    batch_size: pairs per MS-SSIM call (bounds memory).
    **ms_ssim_kwargs: passed to :func:`ms_ssim` (``num_scales``, ...).

  Returns:
    The mean MS-SSIM over the pairs.
  """
  samples = jnp.asarray(samples, jnp.float32)
  _spatial_dims(samples, "samples")
  n = samples.shape[0]
  if n < 2:
    raise ValueError(f"samples: need at least 2 images, got {n}")
  if num_pairs < 1:
    raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
  k_i, k_j = jax.random.split(rng)
  i = jax.random.randint(k_i, (num_pairs,), 0, n)
  # Adding an offset in [1, n) modulo n gives j != i, uniform over the rest.
  j = (i + jax.random.randint(k_j, (num_pairs,), 1, n)) % n
  bs = min(batch_size, num_pairs)
  pad = -num_pairs % bs
  i, j = jnp.pad(i, (0, pad)), jnp.pad(j, (0, pad), constant_values=1)
  values = [ms_ssim(samples[i[s:s + bs]], samples[j[s:s + bs]], data_range,
                    **ms_ssim_kwargs) for s in range(0, num_pairs + pad, bs)]
  return float(jnp.mean(jnp.concatenate(values)[:num_pairs]))
