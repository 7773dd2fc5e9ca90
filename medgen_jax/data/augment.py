r"""Classical data augmentation in JAX, on device, for 2D and 3D images.

The strong baseline every generative augmentation is compared against: what
TorchIO / MONAI / nnU-Net users train with. Everything is pure and jittable
and runs inside the training step. Each example gets its own random
parameters (its own row of a few batch-wide draws; the transforms are
``vmap``-ed over the batch), and the output is a deterministic function of
``(rng, batch)``.

Per example, in this order:

1. Spatial: flip, affine (rotation, zoom, shear, translation about the
   centre) and a smooth elastic field are composed into ONE sampling grid,
   so the image is interpolated once. The image is resampled linearly with
   its background (per-channel minimum) outside the field of view; masks
   use the same grid with nearest-neighbour lookup (label values stay exact)
   and 0 outside.
2. Intensity (image only): gamma, bias field, contrast, brightness, noise,
   then optional clipping to the example's input range.

Coordinates are voxel indices. An output voxel ``p`` reads the input at::

  q = S @ (p + u(p)),   S = (flip o affine)^-1   (homogeneous [d+1, d+1])

where ``u`` is the elastic displacement. Examples whose spatial coins all
came up "off" are not resampled (bit-exact before the intensity part).

Benchmark::

  python -m medgen_jax.data.augment --bench
"""

import argparse
import dataclasses
import functools
import itertools
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Batch = Dict[str, jax.Array]
MASK_KEYS = ("lesion_mask", "tissue", "mask")
NOISE_TYPES = ("gaussian", "rician")
CLIP_MODES = ("input", "none")
PROB_FIELDS = ("flip_prob", "affine_prob", "elastic_prob", "gamma_prob",
               "bias_prob", "contrast_prob", "brightness_prob", "noise_prob")
# Ranges given as a number s (meaning [-s, s]) or a pair (lo, hi).
SYMMETRIC_FIELDS = ("rotate_deg", "translate_frac", "shear", "log_gamma",
                    "brightness")
PAIR_FIELDS = ("scale", "contrast", "noise_std")
FIELDS = ("enabled", "flip_axes", "isotropic_scale", "elastic_grid",
          "elastic_magnitude_px", "bias_order", "bias_strength", "noise_type",
          "clip") + PROB_FIELDS + SYMMETRIC_FIELDS + PAIR_FIELDS
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not (
      isinstance(x, bool))


def _is_pair(x: Any) -> bool:
  return (isinstance(x, (tuple, list)) and len(x) == 2
          and all(_is_number(v) for v in x))


def symmetric_range(value: Any) -> Tuple[float, float]:
  """``s`` -> ``(-s, s)``; a pair ``(lo, hi)`` is returned as floats."""
  if _is_pair(value):
    return float(value[0]), float(value[1])
  return -float(value), float(value)


def config_errors(cfg: Any, spatial_dims: int) -> List[str]:
  """Every problem in an ``augment`` config section, each naming its key."""
  missing = [f for f in FIELDS if f not in cfg]
  if missing:
    return [f"augment is missing field(s) {missing}"]
  errors = []
  if not isinstance(cfg.enabled, bool):
    errors.append(f"augment.enabled={cfg.enabled!r} must be True or False")
  for f in PROB_FIELDS:
    v = cfg[f]
    if not (_is_number(v) and 0.0 <= v <= 1.0):
      errors.append(f"augment.{f}={v!r} must be a probability in [0, 1]")
  for f in SYMMETRIC_FIELDS:
    v = cfg[f]
    if _is_number(v):
      ok = v >= 0
    else:
      ok = _is_pair(v) and v[0] <= v[1]
    if not ok:
      errors.append(f"augment.{f}={v!r} must be a number >= 0 (meaning "
                    "[-s, s]) or a pair (lo, hi) with lo <= hi")
  for f in PAIR_FIELDS:
    v = cfg[f]
    lowest = 0.0 if f == "noise_std" else 1e-6
    if not (_is_pair(v) and lowest <= v[0] <= v[1]):
      bound = ">= 0" if f == "noise_std" else "> 0"
      errors.append(f"augment.{f}={v!r} must be a pair (lo, hi) with "
                    f"{bound} lo <= hi")
  axes = cfg.flip_axes
  if not (isinstance(axes, (tuple, list))
          and all(isinstance(a, int) and not isinstance(a, bool)
                  for a in axes)):
    errors.append(f"augment.flip_axes={axes!r} must be a tuple of ints")
  elif spatial_dims in (2, 3):
    norm = [a % spatial_dims for a in axes
            if -spatial_dims <= a < spatial_dims]
    if len(norm) != len(axes) or len(set(norm)) != len(norm):
      errors.append(f"augment.flip_axes={tuple(axes)!r} must be distinct "
                    f"spatial axes in [-{spatial_dims}, {spatial_dims})")
  if spatial_dims not in (2, 3):
    errors.append(f"spatial_dims={spatial_dims!r} must be 2 or 3")
  if not isinstance(cfg.isotropic_scale, bool):
    errors.append(f"augment.isotropic_scale={cfg.isotropic_scale!r} must be "
                  "True or False")
  if not (isinstance(cfg.elastic_grid, int) and cfg.elastic_grid >= 2):
    errors.append(f"augment.elastic_grid={cfg.elastic_grid!r} must be an int "
                  ">= 2 (control points per axis)")
  if not (_is_number(cfg.elastic_magnitude_px)
          and cfg.elastic_magnitude_px >= 0):
    errors.append(f"augment.elastic_magnitude_px={cfg.elastic_magnitude_px!r}"
                  " must be a number >= 0")
  if not (isinstance(cfg.bias_order, int) and 1 <= cfg.bias_order <= 6):
    errors.append(f"augment.bias_order={cfg.bias_order!r} must be an int in "
                  "[1, 6]")
  if not (_is_number(cfg.bias_strength) and cfg.bias_strength >= 0):
    errors.append(f"augment.bias_strength={cfg.bias_strength!r} must be a "
                  "number >= 0")
  if cfg.noise_type not in NOISE_TYPES:
    errors.append(f"augment.noise_type={cfg.noise_type!r} must be one of "
                  f"{NOISE_TYPES}")
  if cfg.clip not in CLIP_MODES:
    errors.append(f"augment.clip={cfg.clip!r} must be one of {CLIP_MODES}")
  return errors


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """A validated, immutable snapshot of an ``augment`` config.

  Ranges are normalised to ``(lo, hi)`` floats and flip axes to
  non-negative spatial axes, so the jitted function never depends on a
  mutable ConfigDict.
  """

  spatial_dims: int
  enabled: bool
  flip_prob: float
  flip_axes: Tuple[int, ...]
  affine_prob: float
  rotate_deg: Tuple[float, float]
  scale: Tuple[float, float]
  isotropic_scale: bool
  translate_frac: Tuple[float, float]
  shear: Tuple[float, float]
  elastic_prob: float
  elastic_grid: int
  elastic_magnitude_px: float
  gamma_prob: float
  log_gamma: Tuple[float, float]
  bias_prob: float
  bias_order: int
  bias_strength: float
  contrast_prob: float
  contrast: Tuple[float, float]
  brightness_prob: float
  brightness: Tuple[float, float]
  noise_prob: float
  noise_std: Tuple[float, float]
  noise_type: str
  clip: str

  @classmethod
  def from_config(cls, cfg: Any, spatial_dims: int) -> "AugmentSpec":
    """Validates ``cfg``; raises ``ValueError`` listing every problem."""
    errors = config_errors(cfg, spatial_dims)
    if errors:
      raise ValueError("invalid augment config: " + "; ".join(errors))
    kw = {f: cfg[f] for f in FIELDS}
    for f in PROB_FIELDS + ("elastic_magnitude_px", "bias_strength"):
      kw[f] = float(kw[f])
    for f in SYMMETRIC_FIELDS:
      kw[f] = symmetric_range(kw[f])
    for f in PAIR_FIELDS:
      kw[f] = (float(kw[f][0]), float(kw[f][1]))
    kw["flip_axes"] = tuple(sorted(a % spatial_dims for a in kw["flip_axes"]))
    return cls(spatial_dims=spatial_dims, **kw)

  @property
  def spatial(self) -> bool:
    """Whether any spatial transform can fire (else no resampling at all)."""
    return ((self.flip_prob > 0 and bool(self.flip_axes))
            or self.affine_prob > 0 or self.elastic_prob > 0)


# --------------------------------------------------------------------------
# Spatial building blocks (one example; d = number of spatial axes)
# --------------------------------------------------------------------------
#
# Every random block has a deterministic ``*_from_units`` core that maps
# uniforms in [0, 1) to parameters. The composed augmentation draws all of
# an example's scalars in one RNG call (XLA compiles each RNG call into its
# own hashing kernel, which dominated compile time) and feeds the cores.


def _uniform_flat(rng: jax.Array, n: int) -> jax.Array:
  """``n`` uniforms in [0, 1) from one flat RNG call (fast to compile)."""
  return jax.random.uniform(rng, (n,), jnp.float32)


def _normal_from_uniform(u: jax.Array) -> jax.Array:
  """Standard normals from uniforms in [0, 1) (inverse CDF, like
  ``jax.random.normal``; the open lower end keeps them finite)."""
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
  return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(
      jnp.maximum(2.0 * u - 1.0, lo))


def _from_unit(u: jax.Array, bounds: Tuple[float, float]) -> jax.Array:
  lo, hi = bounds
  return lo + (hi - lo) * u


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  # Broadcast multiply-add, not a dot: full float32 on every backend (TF32
  # dots on GPUs would move coordinates by ~0.05 px) and exact for the 0/1
  # entries of identities and flips.
  return (a[:, :, None] * b[None, :, :]).sum(axis=1)


def _matvec(a: jax.Array, v: jax.Array) -> jax.Array:
  return (a * v[None, :]).sum(axis=1)


def _homogeneous(linear: jax.Array, offset: jax.Array) -> jax.Array:
  """``[d, d]`` and ``[d]`` -> ``[d+1, d+1]`` mapping ``x -> L x + t``."""
  d = linear.shape[0]
  top = jnp.concatenate([linear, offset[:, None]], axis=1)
  bottom = jnp.zeros((1, d + 1), linear.dtype).at[0, d].set(1.0)
  return jnp.concatenate([top, bottom], axis=0)


def _plane_rotation(d: int, i: int, j: int, angle: jax.Array) -> jax.Array:
  c, s = jnp.cos(angle), jnp.sin(angle)
  one, zero = jnp.ones_like(c), jnp.zeros_like(c)
  rows = [[one if r == k else zero for k in range(d)] for r in range(d)]
  rows[i][i], rows[i][j], rows[j][i], rows[j][j] = c, -s, s, c
  return jnp.stack([jnp.stack(r) for r in rows])


def rotation_matrix(angles: jax.Array) -> jax.Array:
  """Rotation ``[d, d]`` from radians: ``[1]`` (2D) or ``[3]`` (3D).

  In 2D a positive angle turns the image counter-clockwise as displayed
  (rows down, columns right). In 3D ``angles[k]`` rotates the plane of the
  two axes other than ``k`` (``angles[0]`` is in-plane for axial slices).
  """
  d = 2 if angles.shape[0] == 1 else 3
  planes = [(0, 1)] if d == 2 else [(1, 2), (0, 2), (0, 1)]
  out = _plane_rotation(d, *planes[0], angles[0])
  for (i, j), a in zip(planes[1:], angles[1:]):
    out = _matmul(out, _plane_rotation(d, i, j, a))
  return out


def affine_units(spatial_dims: int) -> int:
  """Uniforms :func:`affine_from_units` consumes: angles, shear, zoom, shift."""
  d = spatial_dims
  return (1 if d == 2 else 3) + d * d + 2 * d


def affine_from_units(u: jax.Array, cfg: Any,
                      shape: Sequence[int]) -> jax.Array:
  """Forward affine ``[d+1, d+1]`` from uniforms ``u`` ``[affine_units(d)]``.

  ``L = rotation @ shear @ diag(zoom)`` maps input voxel ``x`` to output
  voxel ``L (x - c) + c + t``, with ``c`` the centre and ``t`` the shift in
  voxels (``translate_frac`` times the axis size).
  """
  d = len(shape)
  na = 1 if d == 2 else 3
  angles = jnp.deg2rad(_from_unit(u[:na], symmetric_range(cfg.rotate_deg)))
  eye = jnp.eye(d, dtype=jnp.float32)
  shear_u = u[na:na + d * d].reshape(d, d)
  shear = eye + (1.0 - eye) * _from_unit(shear_u, symmetric_range(cfg.shear))
  zoom_u = u[na + d * d:na + d * d + d]
  if cfg.isotropic_scale:
    zoom_u = jnp.broadcast_to(zoom_u[:1], (d,))
  zoom = _from_unit(zoom_u, tuple(cfg.scale))
  linear = _matmul(rotation_matrix(angles), shear) * zoom[None, :]
  size = jnp.asarray(shape, jnp.float32)
  centre = (size - 1.0) / 2.0
  shift = _from_unit(u[na + d * d + d:], symmetric_range(cfg.translate_frac))
  offset = centre + shift * size - _matvec(linear, centre)
  return _homogeneous(linear, offset)


def affine_matrix(rng: jax.Array, cfg: Any,
                  shape: Sequence[int]) -> jax.Array:
  """A random forward affine about the image centre, ``[d+1, d+1]``.

  Always draws (no probability). ``cfg`` is an :class:`AugmentSpec` or a
  config with ``rotate_deg``, ``scale``, ``isotropic_scale``,
  ``translate_frac`` and ``shear``; ``shape`` is ``(H, W)`` or ``(D, H, W)``.
  """
  u = jax.random.uniform(rng, (affine_units(len(shape)),))
  return affine_from_units(u, cfg, shape)


def flip_matrix(flips: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Homogeneous mirror ``[d+1, d+1]`` of the axes set in ``flips`` ``[d]``."""
  sign = jnp.where(flips, -1.0, 1.0).astype(jnp.float32)
  offset = jnp.where(flips, jnp.asarray(shape, jnp.float32) - 1.0, 0.0)
  return _homogeneous(jnp.diag(sign), offset)


def _inverse(m: jax.Array) -> jax.Array:
  """Closed-form 2x2 / 3x3 inverse (cheaper to compile than LU, and exact
  for identities and flips)."""
  if m.shape[0] == 2:
    adj = jnp.stack([jnp.stack([m[1, 1], -m[0, 1]]),
                     jnp.stack([-m[1, 0], m[0, 0]])])
    return adj / (m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0])
  r0, r1, r2 = m[0], m[1], m[2]
  cols = jnp.stack([jnp.cross(r1, r2), jnp.cross(r2, r0), jnp.cross(r0, r1)],
                   axis=1)
  return cols / jnp.dot(r0, jnp.cross(r1, r2), precision=_HIGHEST)


def invert_affine(matrix: jax.Array) -> jax.Array:
  """Inverse of a homogeneous 2D/3D affine ``[d+1, d+1]``."""
  d = matrix.shape[0] - 1
  inv = _inverse(matrix[:d, :d])
  return _homogeneous(inv, -_matvec(inv, matrix[:d, d]))


def bspline_weights(size: int, points: int) -> np.ndarray:
  """Cubic B-spline weights ``[size, points]`` of evenly spaced control points.

  Control point ``i`` sits at voxel ``i * (size - 1) / (points - 1)``; each
  row is normalised to sum to 1 (the edges see fewer points), so a field is
  a convex combination of control values: C2-smooth and never larger than
  the largest control value. A static numpy constant.
  """
  x = np.arange(size, dtype=np.float64)[:, None]
  t = np.abs(x * (points - 1) / max(size - 1, 1) - np.arange(points)[None])
  w = np.where(t < 1, 2.0 / 3.0 - t ** 2 + t ** 3 / 2,
               np.where(t < 2, (2.0 - t) ** 3 / 6, 0.0))
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def elastic_from_units(u: jax.Array, cfg: Any,
                       shape: Sequence[int]) -> jax.Array:
  """Displacement ``[*shape, d]`` from control-point uniforms ``[g]*d + [d]``.

  Control points get ``U(-m, m)`` voxels (``m = elastic_magnitude_px``) and
  a cubic B-spline spreads them to every voxel (as TorchIO's
  RandomElasticDeformation); ``|displacement| <= m`` per axis.
  """
  m = cfg.elastic_magnitude_px
  field = _from_unit(u, (-m, m))  # [g]*d + [d]
  # Separable: contract one control axis per spatial axis (small matmuls).
  for a, n in enumerate(shape):
    w = jnp.asarray(bspline_weights(n, field.shape[a]))
    field = jnp.moveaxis(jnp.tensordot(w, field, axes=([1], [a]),
                                       precision=_HIGHEST), 0, a)
  return field


def elastic_displacement(rng: jax.Array, cfg: Any,
                         shape: Sequence[int]) -> jax.Array:
  """A smooth random displacement field in voxels, ``[*shape, d]``.

  ``cfg`` gives ``elastic_grid`` (control points per axis) and
  ``elastic_magnitude_px``.
  """
  d = len(shape)
  shape_u = (cfg.elastic_grid,) * d + (d,)
  u = _uniform_flat(rng, int(np.prod(shape_u))).reshape(shape_u)
  return elastic_from_units(u, cfg, shape)


def sampling_grid(shape: Sequence[int], matrix: jax.Array,
                  displacement: Optional[jax.Array] = None) -> jax.Array:
  """Input coordinates read by each output voxel, ``[d, *shape]``.

  Args:
    shape: output spatial shape.
    matrix: homogeneous ``[d+1, d+1]`` sampling map (output -> input), e.g.
      ``invert_affine(flip @ affine)``.
    displacement: optional ``[*shape, d]`` field added to the output voxel
      positions before ``matrix``.
  """
  d = len(shape)
  # Index ramps kept rank-1 and broadcast: XLA on CPUs builds this 50-80x
  # faster than a dense meshgrid contracted with the matrix. Explicit
  # multiply-adds are full float32 everywhere and exact for flips.
  ramps = [jnp.arange(n, dtype=jnp.float32).reshape(
      [n if b == a else 1 for b in range(d)]) for a, n in enumerate(shape)]
  if displacement is not None:
    ramps = [r + displacement[..., a] for a, r in enumerate(ramps)]
  coords = []
  for i in range(d):
    acc = matrix[i, d]
    for j in range(d):
      acc = acc + matrix[i, j] * ramps[j]
    coords.append(jnp.broadcast_to(acc, tuple(shape)))
  return jnp.stack(coords)


def resample(image: jax.Array, coords: jax.Array, order: int = 1,
             fill: Any = 0.0) -> jax.Array:
  """Reads ``image`` at ``coords``; outside the field of view gives ``fill``.

  The contract of ``map_coordinates(mode="constant")``, but gathering all
  trailing axes (channels) per lookup and with a per-channel fill value.

  Args:
    image: ``[*S_in, *rest]`` with ``d = coords.shape[0]`` spatial axes
      first (e.g. ``[H, W, C]`` or an integer mask ``[D, H, W]``).
    coords: ``[d, *S_out]`` input voxel coordinates.
    order: 0 (nearest, exact values: masks) or 1 (multi-linear).
    fill: scalar or broadcastable to ``rest`` (e.g. per-channel ``[C]``).

  Returns:
    ``[*S_out, *rest]``, dtype of ``image``.
  """
  d = coords.shape[0]
  spatial, rest = image.shape[:d], image.shape[d:]
  out_shape = coords.shape[1:] + rest
  q = coords.reshape(d, -1)
  lift = (slice(None),) + (None,) * len(rest)  # [N] -> [N, 1...]

  def gather(per_axis_idx):
    # One gather per tap with per-axis indices, all trailing axes at once:
    # on CPU as fast as map_coordinates in 2D and ~1.3x faster in 3D.
    return image.at[tuple(per_axis_idx)].get(mode="promise_in_bounds")

  if order == 0:
    # Half away from zero, like map_coordinates(order=0).
    idx = (jnp.sign(q) * jnp.floor(jnp.abs(q) + 0.5)).astype(jnp.int32)
    inside = functools.reduce(jnp.logical_and, [
        (idx[a] >= 0) & (idx[a] < spatial[a]) for a in range(d)])
    vals = gather([jnp.clip(idx[a], 0, spatial[a] - 1) for a in range(d)])
    out = jnp.where(inside[lift], vals, jnp.asarray(fill, image.dtype))
    return out.reshape(out_shape)
  if order != 1:
    raise ValueError(f"resample: order must be 0 or 1, got {order}")
  base = jnp.floor(q)
  frac = q - base
  base = base.astype(jnp.int32)
  # Two taps per axis; a tap outside the image gets weight 0 and a clipped
  # (valid) index, so its weight goes to the fill value instead.
  taps = []
  for a in range(d):
    n = spatial[a]
    i0, i1 = base[a], base[a] + 1
    w0 = jnp.where((i0 >= 0) & (i0 < n), 1.0 - frac[a], 0.0)
    w1 = jnp.where((i1 >= 0) & (i1 < n), frac[a], 0.0)
    taps.append(((jnp.clip(i0, 0, n - 1), w0), (jnp.clip(i1, 0, n - 1), w1)))
  acc = None
  for combo in itertools.product(*taps):
    w = functools.reduce(jnp.multiply, [t[1] for t in combo])
    term = w[lift] * gather([t[0] for t in combo]).astype(jnp.float32)
    acc = term if acc is None else acc + term
  inside = functools.reduce(jnp.multiply, [t[0][1] + t[1][1] for t in taps])
  # For interior integer coordinates this term is exactly 0, so identity
  # sampling is bit-exact.
  out = acc + (1.0 - inside)[lift] * jnp.asarray(fill, jnp.float32)
  return out.astype(image.dtype).reshape(out_shape)


def resample_map_coordinates(image: jax.Array, coords: jax.Array,
                             order: int = 1, fill: Any = 0.0) -> jax.Array:
  """Same contract as :func:`resample`, via ``jax.scipy.ndimage``.

  One ``map_coordinates`` per channel; kept as the reference and for the
  benchmark. Its ``cval`` must be static, so the fill is subtracted first.
  """
  d = coords.shape[0]
  rest = image.shape[d:]
  x = image.reshape(image.shape[:d] + (-1,))
  fill = jnp.broadcast_to(jnp.asarray(fill, image.dtype), rest).reshape(-1)
  sample = lambda ch, f: jax.scipy.ndimage.map_coordinates(
      ch - f, list(coords), order=order, mode="constant", cval=0) + f
  out = jax.vmap(sample, in_axes=(-1, 0), out_axes=-1)(x, fill)
  return out.reshape(coords.shape[1:] + rest).astype(image.dtype)


# --------------------------------------------------------------------------
# Intensity building blocks (one example image [*S, C])
# --------------------------------------------------------------------------


def _channel_stats(image: jax.Array, fn) -> jax.Array:
  """``fn`` over the spatial axes, kept broadcastable: ``[1, ..., 1, C]``."""
  return fn(image, axis=tuple(range(image.ndim - 1)), keepdims=True)


def apply_gamma(image: jax.Array, gamma: jax.Array) -> jax.Array:
  """``x01 ** gamma`` on the per-channel [0, 1] rescaling of ``[*S, C]``.

  Mapped back afterwards, so each channel keeps its min and max.
  """
  lo = _channel_stats(image, jnp.min)
  hi = _channel_stats(image, jnp.max)
  width = jnp.where(hi > lo, hi - lo, 1.0)
  x01 = jnp.clip((image - lo) / width, 0.0, 1.0)
  return lo + width * x01 ** gamma


def random_gamma(rng: jax.Array, image: jax.Array,
                 log_gamma: Tuple[float, float]) -> jax.Array:
  """:func:`apply_gamma` with ``log(gamma) ~ U(log_gamma)``."""
  return apply_gamma(image, jnp.exp(_from_unit(jax.random.uniform(rng),
                                               log_gamma)))


def bias_monomials(spatial_dims: int, order: int) -> List[Tuple[int, ...]]:
  """Exponents of the bias polynomial's terms (total degree 1..order)."""
  return [e for e in itertools.product(range(order + 1), repeat=spatial_dims)
          if 0 < sum(e) <= order]


def bias_from_coefficients(coef: jax.Array, shape: Sequence[int],
                           order: int) -> jax.Array:
  """``exp(sum_k coef_k prod_a x_a^e_ka)``, log-mean removed, ``[*shape]``.

  Coordinates run over [-1, 1] per axis; ``coef`` is ``[len(bias_monomials)]``.
  """
  d = len(shape)
  axes = [jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32) for n in shape]
  powers = [[(ax ** k).reshape([-1 if b == a else 1 for b in range(d)])
             for k in range(order + 1)] for a, ax in enumerate(axes)]
  log_field = jnp.zeros(tuple(shape), jnp.float32)
  for i, e in enumerate(bias_monomials(d, order)):
    term = functools.reduce(jnp.multiply, [powers[a][e[a]] for a in range(d)])
    log_field = log_field + coef[i] * term
  # Zero log-mean: the field shades the image without a global gain.
  return jnp.exp(log_field - log_field.mean())


def bias_field(rng: jax.Array, shape: Sequence[int], order: int,
               strength: float) -> jax.Array:
  """A smooth positive multiplicative field ``[*shape]``, geometric mean 1.

  Polynomial log-field with coefficients ``U(-strength, strength)`` (as
  TorchIO's RandomBiasField), see :func:`bias_from_coefficients`.
  """
  n = len(bias_monomials(len(shape), order))
  coef = _from_unit(jax.random.uniform(rng, (n,)), (-strength, strength))
  return bias_from_coefficients(coef, shape, order)


def apply_bias(image: jax.Array, field: jax.Array,
               background: jax.Array) -> jax.Array:
  """Scales the signal above ``background`` ``[1.., C]`` by ``field`` ``[*S]``.

  Normalised intensities are an affine map of the MR signal with the
  background at the minimum, so a receive-coil bias multiplies ``x - bg``.
  """
  return background + (image - background) * field[..., None]


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """``(x - mean) * factor + mean`` per channel of ``[*S, C]``."""
  mean = _channel_stats(image, jnp.mean)
  return (image - mean) * factor + mean


def random_contrast(rng: jax.Array, image: jax.Array,
                    factor: Tuple[float, float]) -> jax.Array:
  """:func:`adjust_contrast` with the factor ``~ U(factor)``."""
  return adjust_contrast(image, _from_unit(jax.random.uniform(rng), factor))


def random_brightness(rng: jax.Array, image: jax.Array,
                      shift: Tuple[float, float]) -> jax.Array:
  """``x + b``, ``b ~ U(shift)`` in normalised intensity units."""
  return image + _from_unit(jax.random.uniform(rng), shift)


def add_noise(image: jax.Array, sigma: jax.Array, normal: jax.Array,
              kind: str = "gaussian",
              background: Optional[jax.Array] = None) -> jax.Array:
  """Adds ``sigma * normal`` noise; ``normal`` is ``[2, *image.shape]``.

  ``gaussian`` uses ``normal[0]``. ``rician`` is the magnitude of complex
  Gaussian noise on the signal above ``background`` (``[1.., C]``), as in
  MR magnitude images: ``bg + |x - bg + sigma (n0 + i n1)|``.
  """
  if kind == "gaussian":
    return image + sigma * normal[0]
  if kind != "rician":
    raise ValueError(f"add_noise: kind must be one of {NOISE_TYPES}, "
                     f"got {kind!r}")
  real = image - background + sigma * normal[0]
  return background + jnp.sqrt(real ** 2 + (sigma * normal[1]) ** 2)


def random_noise(rng: jax.Array, image: jax.Array, std: Tuple[float, float],
                 kind: str = "gaussian",
                 background: Optional[jax.Array] = None) -> jax.Array:
  """:func:`add_noise` with ``sigma ~ U(std)``."""
  k_sigma, k_normal = jax.random.split(rng)
  sigma = _from_unit(jax.random.uniform(k_sigma), std)
  normal = _normal_from_uniform(
      _uniform_flat(k_normal, 2 * image.size).reshape((2,) + image.shape))
  return add_noise(image, sigma, normal, kind, background)


# --------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------


def _layout(spec: AugmentSpec) -> Dict[str, Tuple[int, int]]:
  """``name -> (start, stop)`` of each transform's uniforms per example.

  Fixed by the spatial dims (bias coefficients last, sized by its order), so
  changing one transform's probability never changes another's parameters.
  """
  d = spec.spatial_dims
  sizes = (("flip", d), ("affine_on", 1), ("affine", affine_units(d)),
           ("elastic_on", 1), ("gamma", 2), ("contrast", 2),
           ("brightness", 2), ("noise", 2),
           ("bias", 1 + len(bias_monomials(d, spec.bias_order))))
  out, start = {}, 0
  for name, n in sizes:
    out[name] = (start, start + n)
    start += n
  return out


def _spatial_from_units(spec: AugmentSpec, u: Dict[str, jax.Array],
                        elastic_u: Optional[jax.Array],
                        shape: Sequence[int], strength: Any = 1.0):
  """(sampling matrix, displacement or None, fired) for one example; every
  probability is scaled by ``strength``."""
  d = len(shape)
  forward = jnp.eye(d + 1, dtype=jnp.float32)
  fired = jnp.zeros((), bool)
  if spec.affine_prob > 0:
    on = u["affine_on"][0] < spec.affine_prob * strength
    forward = jnp.where(on, affine_from_units(u["affine"], spec, shape),
                        forward)
    fired |= on
  if spec.flip_prob > 0 and spec.flip_axes:
    allowed = np.isin(np.arange(d), spec.flip_axes)
    flips = (u["flip"] < spec.flip_prob * strength) & allowed
    # The flip acts last on the anatomy, after the affine.
    forward = _matmul(flip_matrix(flips, shape), forward)
    fired |= flips.any()
  displacement = None
  if spec.elastic_prob > 0:
    on = u["elastic_on"][0] < spec.elastic_prob * strength
    displacement = jnp.where(on, elastic_from_units(elastic_u, spec, shape),
                             0.0)
    fired |= on
  return invert_affine(forward), displacement, fired


def _intensity_from_units(spec: AugmentSpec, u: Dict[str, jax.Array],
                          normal: Optional[jax.Array], image: jax.Array,
                          lo: jax.Array, hi: jax.Array,
                          strength: Any = 1.0) -> jax.Array:
  """Gamma, bias, contrast, brightness, noise, clip on ``[*S, C]``.

  ``lo``/``hi`` (``[1.., C]``) are the example's per-channel input range:
  the background level for the bias and Rician noise, and the clip bounds.
  """
  x = image.astype(jnp.float32)

  def maybe(name, prob, fn):
    nonlocal x
    if prob > 0:
      x = jnp.where(u[name][0] < prob * strength, fn(u[name][1:]), x)

  maybe("gamma", spec.gamma_prob, lambda v: apply_gamma(
      x, jnp.exp(_from_unit(v[0], spec.log_gamma))))
  maybe("bias", spec.bias_prob, lambda v: apply_bias(x, bias_from_coefficients(
      _from_unit(v, (-spec.bias_strength, spec.bias_strength)),
      x.shape[:-1], spec.bias_order), lo))
  maybe("contrast", spec.contrast_prob, lambda v: adjust_contrast(
      x, _from_unit(v[0], spec.contrast)))
  maybe("brightness", spec.brightness_prob,
        lambda v: x + _from_unit(v[0], spec.brightness))
  maybe("noise", spec.noise_prob, lambda v: add_noise(
      x, _from_unit(v[0], spec.noise_std), normal, spec.noise_type, lo))
  if spec.clip == "input":
    x = jnp.clip(x, lo, hi)
  return x


def _augment_one(spec: AugmentSpec, channels: Optional[Tuple[int, ...]],
                 units: jax.Array, elastic_u: Optional[jax.Array],
                 normal: Optional[jax.Array], image: jax.Array,
                 masks: Dict[str, jax.Array], strength: Any = 1.0):
  """One example: image ``[*S, C]``, masks ``{key: [*S, ...]}``."""
  shape = image.shape[:-1]
  u = {name: units[a:b] for name, (a, b) in _layout(spec).items()}
  lo = _channel_stats(image, jnp.min)
  hi = _channel_stats(image, jnp.max)
  out = image
  if spec.spatial:
    matrix, displacement, fired = _spatial_from_units(spec, u, elastic_u,
                                                      shape, strength)
    coords = sampling_grid(shape, matrix, displacement)
    # Examples whose spatial coins all came up "off" stay bit-exact.
    out = jnp.where(fired, resample(image, coords, 1, lo.reshape(-1)), image)
    masks = {k: jnp.where(fired, resample(m, coords, 0, 0), m)
             for k, m in masks.items()}
  changed = _intensity_from_units(spec, u, normal, out, lo, hi, strength)
  if channels is not None:
    num = image.shape[-1]
    keep = ~np.isin(np.arange(num), [c % num for c in channels])
    changed = jnp.where(keep, out.astype(jnp.float32), changed)
  return changed.astype(image.dtype), masks


def _check_batch(batch: Mapping[str, jax.Array], spatial_dims: int,
                 mask_keys: Sequence[str]) -> None:
  if "image" not in batch:
    raise ValueError(f"augment: batch has no 'image' (keys: {sorted(batch)})")
  image = batch["image"]
  if image.ndim != spatial_dims + 2:
    layout = "[B, H, W, C]" if spatial_dims == 2 else "[B, D, H, W, C]"
    raise ValueError(f"augment: batch['image'] has shape {image.shape}; "
                     f"expected {layout} for spatial_dims={spatial_dims}")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"augment: batch['image'] must be floating point, got "
                     f"{image.dtype}")
  want = image.shape[:-1]
  for key in mask_keys:
    if key in batch and batch[key].shape[:spatial_dims + 1] != want:
      raise ValueError(f"augment: batch[{key!r}] has shape "
                       f"{batch[key].shape}; expected {want} (+ optional "
                       "trailing axes) to match batch['image']")


def make_augment_fn(cfg: Any, spatial_dims: int,
                    mask_keys: Sequence[str] = MASK_KEYS, *,
                    intensity_channels: Optional[Sequence[int]] = None
                    ) -> Callable[[jax.Array, Batch], Batch]:
  """Builds ``augment(rng, batch) -> batch`` for use inside a jitted step.

  Args:
    cfg: the ``augment`` config section (``configs.common.augment_config``);
      validated here, ``ValueError`` names each bad field.
    spatial_dims: 2 (``image [B, H, W, C]``) or 3 (``[B, D, H, W, C]``).
    mask_keys: batch keys holding masks ``[B, *S]`` (integer labels, or any
      dtype, optionally with trailing axes); they follow the image's spatial
      transform with nearest-neighbour lookup and skip intensity transforms.
    intensity_channels: image channels the intensity transforms touch (None:
      all). E.g. only the input contrasts of a translation task, so the
      target channel is moved spatially with them but keeps its intensities.

  Returns:
    A pure function of ``(rng, batch, strength=1)``: same keys, shapes and
    dtypes; keys other than ``image`` and the present mask keys pass
    through untouched. ``strength`` (a traced scalar is fine: one program
    serves every value) multiplies every transform's probability.
    With ``cfg.enabled`` False it returns the batch unchanged. Each example
    draws its own parameters; the result is a deterministic function of
    ``rng`` and the batch.
  """
  spec = AugmentSpec.from_config(cfg, spatial_dims)
  mask_keys = tuple(mask_keys)
  channels = None if intensity_channels is None else tuple(
      int(c) for c in intensity_channels)
  num_units = max(b for _, b in _layout(spec).values())

  def augment(rng: jax.Array, batch: Batch, strength: Any = 1.0) -> Batch:
    _check_batch(batch, spatial_dims, mask_keys)
    num_channels = batch["image"].shape[-1]
    if channels is not None and not all(
        -num_channels <= c < num_channels for c in channels):
      raise ValueError(f"augment: intensity_channels={channels} out of range "
                       f"for batch['image'] with {num_channels} channels")
    if not spec.enabled:
      return dict(batch)
    image = batch["image"]
    size = image.shape[0]
    elastic_shape = (spec.elastic_grid,) * spatial_dims + (spatial_dims,)
    noise_shape = (2 if spec.noise_type == "rician" else 1,) + image.shape[1:]
    parts = [("units", (num_units,), True),
             ("elastic", elastic_shape, spec.elastic_prob > 0),
             ("noise", noise_shape, spec.noise_prob > 0)]
    parts = [(n, s) for n, s, on in parts if on]
    per_example = [int(np.prod(s)) for _, s in parts]
    # ONE flat draw for everything: XLA compiles a multi-dimensional RNG
    # call several times slower than a flat one. Row i is example i's.
    draws = _uniform_flat(rng, size * sum(per_example)).reshape(size, -1)
    cuts = np.cumsum([0] + per_example)
    got = {n: draws[:, a:b].reshape((size,) + s)
           for (n, s), a, b in zip(parts, cuts[:-1], cuts[1:])}
    units, elastic_u = got["units"], got.get("elastic")
    normal = _normal_from_uniform(got["noise"]) if "noise" in got else None
    masks = {k: batch[k] for k in mask_keys if k in batch}
    out, masks = jax.vmap(
        lambda *a: _augment_one(spec, channels, *a, strength=strength))(
            units, elastic_u, normal, image, masks)
    return {**batch, "image": out, **masks}

  return augment


# --------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------


def _interleaved_ms(fns: Mapping[str, Callable[[], Any]],
                    repeats: int) -> Dict[str, float]:
  """Median (``name``) and fastest (``name_min``) ms per call of each
  function, timed in alternation so that a busy machine slows all alike."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  out = {}
  for name, ts in times.items():
    out[name] = 1e3 * statistics.median(ts)
    out[name + "_min"] = 1e3 * min(ts)
  return out


def benchmark(shape: Sequence[int], cfg: Any = None,
              repeats: int = 20) -> Dict[str, float]:
  """Times the default augmentation and both linear resamplers on one batch.

  Args:
    shape: image batch shape ``[B, *S, C]``; a ``tissue`` and a
      ``lesion_mask`` mask of the same spatial shape come along.
    cfg: augment config (default: ``configs.common.augment_config()``).
    repeats: timed calls (median reported).

  Returns:
    ``compile_s``, ``augment_ms`` (whole default pipeline per batch),
    ``gather_ms`` and ``map_coordinates_ms`` (linear resampling of the image
    only, same random affine grid); medians, and fastest calls as
    ``*_ms_min``.
  """
  if cfg is None:
    from configs import common  # pylint: disable=import-outside-toplevel
    cfg = common.augment_config()
  shape = tuple(shape)
  d = len(shape) - 2
  rng = np.random.default_rng(0)
  batch = {
      "image": jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32),
      "tissue": jnp.asarray(rng.integers(0, 5, shape[:-1]), jnp.uint8),
      "lesion_mask": jnp.asarray(rng.integers(0, 2, shape[:-1]), jnp.uint8),
      "label": jnp.zeros(shape[:1], jnp.int32),
  }
  key = jax.random.key(0)
  fn = jax.jit(make_augment_fn(cfg, d))
  t = time.perf_counter()
  jax.block_until_ready(fn(key, batch))
  compile_s = time.perf_counter() - t
  spec = AugmentSpec.from_config(cfg, d)

  def grids(k):
    keys = jax.random.split(k, shape[0])
    return jax.vmap(lambda kk: sampling_grid(
        shape[1:-1], invert_affine(affine_matrix(kk, spec, shape[1:-1]))))(keys)

  coords = jax.jit(grids)(key)
  fill = batch["image"].min(axis=tuple(range(1, d + 1)))
  calls = {"augment_ms": lambda: fn(key, batch)}
  for name, impl in (("gather_ms", resample),
                     ("map_coordinates_ms", resample_map_coordinates)):
    f = jax.jit(jax.vmap(functools.partial(impl, order=1)))
    jax.block_until_ready(f(batch["image"], coords, fill=fill))
    calls[name] = functools.partial(f, batch["image"], coords, fill=fill)
  return {"compile_s": compile_s, **_interleaved_ms(calls, repeats)}


def _main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      description="Classical augmentation benchmark (ms per batch).")
  parser.add_argument("--bench", action="store_true",
                      help="time augmentation on the default shapes")
  parser.add_argument("--shape", action="append", default=None,
                      help="batch shape B,*S,C (repeatable), e.g. 8,64,64,64,1")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  if not args.bench:
    parser.error("nothing to do: pass --bench")
  shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shape]
            if args.shape else [(64, 32, 32, 1), (8, 32, 32, 32, 1)])
  print(f"device: {jax.devices()[0].device_kind}; default augment config; "
        f"median of {args.repeats} calls")
  for shape in shapes:
    if len(shape) not in (4, 5):
      parser.error(f"--shape {shape}: expected B,H,W,C or B,D,H,W,C")
    r = benchmark(shape, repeats=args.repeats)
    print(f"{'x'.join(map(str, shape)):>16}: augment {r['augment_ms']:7.2f} "
          f"ms/batch (fastest {r['augment_ms_min']:.2f}, compile "
          f"{r['compile_s']:.1f} s) | linear resample of the image: gather "
          f"{r['gather_ms']:.2f} ms, map_coordinates "
          f"{r['map_coordinates_ms']:.2f} ms")


if __name__ == "__main__":
  _main()
