"""Multi-contrast brain MRI phantom seeded from the ICBM152 2009a template.

Every virtual subject is the ICBM152 tissue probability maps (shipped inside
the nilearn wheel, so nothing is downloaded) under a random affine plus a
smooth elastic deformation, with optional synthetic MS-like white-matter
lesions, per-subject jittered relaxation times, T1w / T2w / PD / FLAIR
contrasts from the MR signal equations with partial volume, a smooth bias
field and Rician noise. A subject is a deterministic function of
``(seed, index)``.

Coordinates: points live in "template index" space, i.e. voxel indices of the
1 mm ICBM152 grid (RAS axes: x left->right, y posterior->anterior, z
inferior->superior). Outputs use display axes ``(z, row, col)``: axial slices
inferior->superior, rows anterior->posterior, columns patient left->right
(neurological convention), so ``volume[k]`` is an upright axial image.

Reference: Fonov et al., "Unbiased average age-appropriate atlases for
pediatric studies", NeuroImage 54(1), 2011 (ICBM152 2009 templates).
"""

import dataclasses
import functools
from typing import Dict, Tuple

import numpy as np
from scipy import ndimage

TISSUES = ("csf", "gm", "wm", "lesion")  # label of TISSUES[i] is i + 1
CONTRASTS = ("t1w", "t2w", "pd", "flair")
LABELS = {"background": 0, "csf": 1, "gm": 2, "wm": 3, "lesion": 4}

# Margin kept around the brain bounding box when cropping the template, so
# interpolation near the brain surface never reads past the crop.
_CROP_MARGIN = 4
# Independent random streams per subject: changing e.g. the SNR must not
# change the anatomy, so each stage draws from its own generator.
_STREAMS = ("anatomy", "lesions", "tissue", "bias", "noise")


@dataclasses.dataclass(frozen=True)
class SequenceParams:
  """Pulse-sequence timings in ms (typical clinical 1.5 T protocols).

  ``flair_ti=None`` picks the inversion time that nulls the nominal CSF T1
  for the given TR (see :func:`null_inversion_time`).
  """

  t1w_tr: float = 500.0
  t1w_te: float = 15.0
  t2w_tr: float = 4000.0
  t2w_te: float = 100.0
  pd_tr: float = 4000.0
  pd_te: float = 15.0
  flair_tr: float = 9000.0
  flair_te: float = 120.0
  flair_ti: float | None = None


@dataclasses.dataclass(frozen=True)
class PhantomParams:
  """Everything random about a subject except the seed and the output grid.

  Relaxation values are (T1 ms, T2 ms, PD) at 1.5 T. They follow the usual
  textbook ranges for adult brain (e.g. Haacke et al., "Magnetic Resonance
  Imaging: Physical Principles and Sequence Design", 1999; Bernstein et al.,
  "Handbook of MRI Pulse Sequences", 2004): WM T1 ~ 600, T2 ~ 80; GM T1 ~
  950, T2 ~ 100; CSF is nearly free water (T1 ~ 4 s, T2 ~ 2 s). MS lesions
  have prolonged T1/T2 and raised water content (oedema, demyelination), so
  their values are drawn per subject from a range between WM and CSF.
  """

  snr: float = 30.0  # mean brain signal / noise sigma; inf gives no noise
  max_lesions: int = 24
  healthy_fraction: float = 0.2  # fraction of subjects without lesions
  lesion_radius_mm: Tuple[float, float] = (4.0, 14.0)  # longest semi-axis
  lesion_edge: float = 5.0  # logistic sharpness of the lesion boundary
  periventricular_mm: float = 15.0  # decay length of the lesion prior
  deep_wm_weight: float = 0.3  # prior weight of WM far from the ventricles
  csf: Tuple[float, float, float] = (4000.0, 2000.0, 1.0)
  gm: Tuple[float, float, float] = (950.0, 100.0, 0.80)
  wm: Tuple[float, float, float] = (600.0, 80.0, 0.69)
  lesion_low: Tuple[float, float, float] = (1000.0, 150.0, 0.80)
  lesion_high: Tuple[float, float, float] = (1300.0, 250.0, 0.90)
  tissue_jitter: float = 0.03  # relative std of healthy-tissue T1, T2, PD
  rotation_deg: float = 5.0  # uniform in [-r, r] about each axis
  scaling: float = 0.08  # per-axis scale uniform in [1 - s, 1 + s]
  shift_mm: float = 3.0  # uniform in [-t, t] along each axis
  deform_mm: float = 2.5  # std of the elastic displacement per axis
  deform_spacing_mm: float = 20.0  # control-point spacing of the deformation
  bias_std: float = 0.1  # std of the log bias field at its control points
  sequence: SequenceParams = SequenceParams()


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Output grid.

  Attributes:
    res: image side (2D) or cube side (3D) in pixels.
    spatial_dims: 2 for axial slices, 3 for volumes.
    slices_per_subject: axial slices per subject (2D only).
    fov_mm: square in-plane (2D) or cubic (3D) field of view. The brain
      bounding box is 145 x 182 x 156 mm, so 208 mm leaves room for the
      random scaling and shifts.
    slab: slices are spread evenly over this range of the brain's axial
      extent (0 = lowest, 1 = highest brain voxel). 60 % of the extent,
      skipping the near-empty vertex and, a little more, the cerebellum and
      skull base, where MS-like lesions are rare.
  """

  res: int = 32
  spatial_dims: int = 2
  slices_per_subject: int = 16
  fov_mm: float = 208.0
  slab: Tuple[float, float] = (0.25, 0.85)

  @property
  def oversample(self) -> int:
    """Working-grid points per output pixel and axis (2, unless < 1 mm)."""
    return 2 if self.fov_mm / (2 * self.res) >= 1.0 else 1

  @property
  def voxel_mm(self) -> float:
    """Spacing of the working grid the tissue maps are sampled on."""
    return self.fov_mm / (self.oversample * self.res)

  @property
  def atlas_voxel_mm(self) -> float:
    """Atlas spacing: the working spacing, capped at the 1 mm template."""
    return max(self.voxel_mm, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Atlas:
  """ICBM152 maps cropped to the brain and resampled to a working grid.

  Attributes:
    csf, gm, wm: (X, Y, Z) float32 tissue fractions; their sum is <= 1 and the
      rest is background.
    t1: (X, Y, Z) float32 ICBM152 T1 template intensity in [0, 1], kept as a
      reference for validating the simulated contrasts.
    origin: (3,) template index of atlas voxel (0, 0, 0).
    voxel_mm: atlas spacing in mm.
    center: (3,) template index of the brain bounding-box centre.
    z_extent: (lo, hi) template z indices of the brain's axial extent.
  """

  csf: np.ndarray
  gm: np.ndarray
  wm: np.ndarray
  t1: np.ndarray
  origin: np.ndarray
  voxel_mm: float
  center: np.ndarray
  z_extent: Tuple[int, int]


@functools.lru_cache(maxsize=1)
def _load_icbm152() -> Dict[str, np.ndarray]:
  """Loads the 1 mm ICBM152 maps, cropped to the brain (+ margin).

  Returns:
    Dict with float32 (X, Y, Z) maps "csf", "gm", "wm", "t1" and int64 (3,)
    "offset" (template index of the crop's first voxel) and "lo" / "hi"
    (inclusive template-index bounds of the brain).
  """
  # Imported here: nilearn takes seconds to import and only this needs it.
  from nilearn import datasets  # pylint: disable=g-import-not-at-top

  def load(fn):
    return np.asarray(fn(resolution=1).get_fdata(), np.float32)

  t1 = load(datasets.load_mni152_template)
  gm = load(datasets.load_mni152_gm_template)
  wm = load(datasets.load_mni152_wm_template)
  mask = load(datasets.load_mni152_brain_mask)
  # GM + WM <= 1 everywhere; inside the (binary) mask the remainder is CSF.
  # Outside the mask GM/WM keep their small partial-volume values.
  csf = np.clip(mask - gm - wm, 0.0, 1.0)
  idx = np.argwhere((mask > 0) | (gm + wm > 0.05))
  lo, hi = idx.min(0), idx.max(0)
  a = np.maximum(lo - _CROP_MARGIN, 0)
  b = np.minimum(hi + _CROP_MARGIN + 1, mask.shape)
  crop = tuple(slice(i, j) for i, j in zip(a, b))
  return dict(csf=csf[crop], gm=gm[crop], wm=wm[crop], t1=t1[crop],
              offset=a, lo=lo, hi=hi)


@functools.lru_cache(maxsize=4)
def load_atlas(voxel_mm: float = 1.0) -> Atlas:
  """ICBM152 atlas on an isotropic grid of ``voxel_mm`` (>= 1) spacing.

  Coarser grids are area-averaged (Gaussian prefilter matched to the box
  width), so the maps stay partial-volume fractions.
  """
  raw = _load_icbm152()
  voxel_mm = float(max(voxel_mm, 1.0))
  shape_1mm = np.array(raw["gm"].shape)
  n = np.maximum(np.floor((shape_1mm - 1) / voxel_mm).astype(int) + 1, 1)
  # Box of width v has variance v^2/12; the 1 mm voxels already hold 1/12.
  sigma = np.sqrt((voxel_mm ** 2 - 1.0) / 12.0)
  grid = np.stack(np.meshgrid(*[np.arange(k) * voxel_mm for k in n],
                              indexing="ij"))

  def resample(m):
    if voxel_mm == 1.0:
      return m
    m = ndimage.gaussian_filter(m, sigma, mode="constant")
    return ndimage.map_coordinates(m, grid, order=1, output=np.float32)

  maps = {k: resample(raw[k]) for k in ("csf", "gm", "wm", "t1")}
  lo, hi = raw["lo"], raw["hi"]
  return Atlas(
      origin=raw["offset"].astype(np.float64),
      voxel_mm=voxel_mm,
      center=(lo + hi) / 2.0,
      z_extent=(int(lo[2]), int(hi[2])),
      **maps)


@functools.lru_cache(maxsize=8)
def lesion_prior(atlas: Atlas, decay_mm: float,
                 deep_wm_weight: float) -> np.ndarray:
  """Lesion-centre distribution on the atlas grid.

  MS lesions sit mostly in periventricular and deep white matter: the weight
  is ``exp(-d / decay_mm) + deep_wm_weight`` on WM away from the cortex, with
  d the distance to the ventricles.

  Returns:
    (X, Y, Z) float64 cumulative probabilities in C order (last entry 1),
    read-only and cached, for sampling by ``searchsorted``.
  """
  v = atlas.voxel_mm
  brain = (atlas.csf + atlas.gm + atlas.wm) > 0.5
  depth = ndimage.distance_transform_edt(brain) * v
  # Deep CSF is ventricular; sulcal CSF lies within ~1 cm of the surface.
  ventricles = (atlas.csf > 0.5) & (depth > 15.0)
  dist = ndimage.distance_transform_edt(~ventricles) * v
  weight = (atlas.wm > 0.8) * (depth > 6.0) * (
      np.exp(-dist / decay_mm) + deep_wm_weight)
  cdf = np.cumsum(weight, axis=None).reshape(weight.shape)
  cdf /= cdf.flat[-1]
  cdf.flags.writeable = False
  return cdf


def slice_positions(geom: Geometry, atlas: Atlas) -> np.ndarray:
  """(Z,) int template z indices of the output slices (3D: of all planes)."""
  if geom.spatial_dims == 3:
    z = atlas.center[2] + (np.arange(geom.res) + 0.5) * (
        geom.fov_mm / geom.res) - geom.fov_mm / 2
    return np.round(z).astype(np.int32)
  lo, hi = atlas.z_extent
  a, b = lo + np.array(geom.slab) * (hi - lo)
  z = np.linspace(a, b, geom.slices_per_subject)
  return np.unique(np.round(z)).astype(np.int32)


def grid_axes(geom: Geometry,
              atlas: Atlas) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Working-grid coordinates of the output along x, y and z.

  Each output pixel is covered by ``oversample`` points per axis (also along
  z in 2D, so a slice is a slab as thick as a pixel is wide), which
  :func:`block_mean` later averages: partial volume without a second
  interpolation.

  Returns:
    x (Cw,), y (Rw,), z (Zw,) float64 template coordinates, with Rw = Cw =
    oversample * res and Zw = oversample * (res in 3D, slices in 2D). Columns
    run left -> right (x up), rows anterior -> posterior (y down).
  """
  f, v = geom.oversample, geom.voxel_mm
  inplane = (np.arange(f * geom.res) + 0.5) * v - geom.fov_mm / 2
  if geom.spatial_dims == 3:
    z = atlas.center[2] + inplane
  elif geom.spatial_dims == 2:
    offsets = (np.arange(f) + 0.5) * v - f * v / 2
    z = (slice_positions(geom, atlas)[:, None] + offsets[None]).ravel()
  else:
    raise ValueError(f"spatial_dims must be 2 or 3, got {geom.spatial_dims}")
  return atlas.center[0] + inplane, atlas.center[1] - inplane, z


def sample_points(axes: Tuple[np.ndarray, ...]) -> np.ndarray:
  """(3, Zw, Rw, Cw) x/y/z template coordinates of the grid from ``axes``."""
  x, y, z = axes
  zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
  return np.stack([xx, yy, zz])


def block_mean(x: np.ndarray, f: int) -> np.ndarray:
  """Averages f x f x f blocks of the last three axes: (..., fZ, fR, fC)."""
  if f == 1:
    return x
  *lead, z, r, c = x.shape
  x = x.reshape(*lead, z // f, f, r // f, f, c // f, f)
  return x.mean(axis=(-5, -3, -1))


def subject_rngs(seed: int, index: int) -> Dict[str, np.random.Generator]:
  """Independent generators per simulation stage for subject ``index``."""
  children = np.random.SeedSequence(seed, spawn_key=(index,)).spawn(
      len(_STREAMS))
  return {k: np.random.default_rng(s) for k, s in zip(_STREAMS, children)}


def _rotation(angles: np.ndarray) -> np.ndarray:
  """(3, 3) rotation from angles (radians) about x, y and z."""
  cx, cy, cz = np.cos(angles)
  sx, sy, sz = np.sin(angles)
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  return rz @ ry @ rx


def random_affine(rng: np.random.Generator,
                  params: PhantomParams) -> Tuple[np.ndarray, np.ndarray]:
  """Subject-to-atlas affine ``a = A @ (p - c) + b + c`` about the centre c.

  The subject is the atlas rotated, scaled per axis and shifted; sampling
  needs the inverse map, returned here as (A (3, 3), b (3,)).
  """
  angles = np.deg2rad(rng.uniform(-1, 1, 3) * params.rotation_deg)
  scale = 1.0 + rng.uniform(-1, 1, 3) * params.scaling
  shift = rng.uniform(-1, 1, 3) * params.shift_mm
  a = np.diag(1.0 / scale) @ _rotation(angles).T
  return a, -a @ shift


def random_smooth_field(rng: np.random.Generator, channels: int, size: int,
                        smooth: float) -> np.ndarray:
  """(channels, size, size, size) Gaussian field with unit std per channel."""
  g = rng.standard_normal((channels, size, size, size))
  if smooth > 0:
    g = ndimage.gaussian_filter(g, (0, smooth, smooth, smooth), mode="wrap")
  g -= g.mean(axis=(1, 2, 3), keepdims=True)
  return g / g.std(axis=(1, 2, 3), keepdims=True)


def _spline_weights(n: int, idx: np.ndarray) -> np.ndarray:
  """(len(idx), n) cubic-spline interpolation weights of n control points."""
  # Row j of the result interpolates the unit impulse e_j. Interpolating at
  # integer rows of the 2D identity is exact, so one call does all rows.
  rows, cols = np.meshgrid(np.arange(n), idx, indexing="ij")
  return ndimage.map_coordinates(np.eye(n), np.stack([rows, cols]), order=3,
                                 mode="nearest").T


def eval_field(field: np.ndarray, axes: Tuple[np.ndarray, ...],
               center: np.ndarray, fov_mm: float) -> np.ndarray:
  """Cubic-spline interpolation of a control grid spanning the FOV cube.

  The grid is a tensor product, and so is the spline, so the field is
  evaluated axis by axis (tens of times faster than ``map_coordinates``).

  Args:
    field: (C, n, n, n) control values over x, y, z on an n^3 grid covering
      the cube of side ``fov_mm`` centred on ``center``.
    axes: x (Cw,), y (Rw,), z (Zw,) template coordinates (1 mm units).
    center: (3,) centre of the FOV cube.
    fov_mm: side of the cube.

  Returns:
    (C, Zw, Rw, Cw) float64.
  """
  n = field.shape[1]
  wx, wy, wz = (_spline_weights(n, (a - c + fov_mm / 2) * (n / fov_mm) - 0.5)
                for a, c in zip(axes, center))
  return np.einsum("cijk,zk,rj,xi->czrx", field, wz, wy, wx, optimize=True)


def warp_points(rng: np.random.Generator, axes: Tuple[np.ndarray, ...],
                center: np.ndarray, fov_mm: float,
                params: PhantomParams) -> np.ndarray:
  """Maps subject grid points to atlas points: random affine + elastic field.

  Args:
    rng: the subject's anatomy generator.
    axes: x, y, z coordinates of the subject-space grid (:func:`grid_axes`).
    center: (3,) rotation / scaling centre.
    fov_mm: extent of the deformation control grid.
    params: amplitudes.

  Returns:
    (3, Zw, Rw, Cw) atlas-space template coordinates.
  """
  a, b = random_affine(rng, params)
  size = max(int(round(fov_mm / params.deform_spacing_mm)), 4)
  disp = params.deform_mm * random_smooth_field(rng, 3, size, 1.0)
  c = center.reshape(3, 1, 1, 1)
  out = np.tensordot(a, sample_points(axes) - c, axes=1) + b.reshape(3, 1, 1,
                                                                    1) + c
  return out + eval_field(disp, axes, center, fov_mm)


def warp_maps(maps: Tuple[np.ndarray, ...], atlas: Atlas,
              coords: np.ndarray) -> np.ndarray:
  """Linearly samples atlas-grid maps at atlas coordinates.

  Args:
    maps: K arrays shaped like the atlas maps.
    atlas: gives the grid (origin and spacing).
    coords: (3, ...) atlas-space template coordinates.

  Returns:
    (K, ...) float32, zero outside the atlas crop.
  """
  idx = (coords - atlas.origin.reshape(3, *[1] * (coords.ndim - 1))
         ) / atlas.voxel_mm
  return np.stack([
      ndimage.map_coordinates(m, idx, order=1, mode="constant", cval=0.0,
                              output=np.float32)
      for m in maps])


def is_healthy(seed: int, index: int, fraction: float) -> bool:
  """Whether subject ``index`` has no lesions.

  A golden-ratio sequence with a seed-dependent offset instead of a coin
  flip: any run of consecutive subjects has very nearly ``fraction`` healthy
  ones, so small data sets keep their class balance.
  """
  offset = np.random.default_rng(np.random.SeedSequence(seed)).random()
  return (index * 0.6180339887498949 + offset) % 1.0 < fraction


def sample_lesions(rng: np.random.Generator, atlas: Atlas,
                   params: PhantomParams,
                   healthy: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """Random ellipsoidal lesions in atlas space.

  Args:
    rng: the subject's lesion generator.
    atlas: the atlas lesions are placed in.
    params: lesion count and size ranges.
    healthy: no lesions at all; otherwise 1..max_lesions, uniformly.

  Returns:
    centers: (L, 3) template coordinates (L may be 0).
    shapes: (L, 3, 3) matrices M with ``|M (x - centre)| = 1`` on the
      ellipsoid surface.
  """
  n = 0 if healthy or params.max_lesions < 1 else int(
      rng.integers(1, params.max_lesions + 1))
  cdf = lesion_prior(atlas, params.periventricular_mm, params.deep_wm_weight)
  flat = np.searchsorted(cdf.ravel(), rng.random(n), side="right")
  vox = np.stack(np.unravel_index(flat, cdf.shape), -1)
  centers = atlas.origin + atlas.voxel_mm * (vox + rng.uniform(-.5, .5,
                                                               (n, 3)))
  lo, hi = np.log(params.lesion_radius_mm)
  major = np.exp(rng.uniform(lo, hi, (n, 1)))
  radii = major * np.concatenate([np.ones((n, 1)),
                                  rng.uniform(0.5, 1.0, (n, 2))], -1)
  q, r = np.linalg.qr(rng.standard_normal((n, 3, 3)))
  q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
  shapes = np.transpose(q, (0, 2, 1)) / radii[:, :, None]
  return centers.reshape(n, 3), shapes.reshape(n, 3, 3)


def lesion_map(atlas: Atlas, centers: np.ndarray, shapes: np.ndarray,
               edge: float) -> np.ndarray:
  """Soft union of logistic-edged ellipsoids, rasterised on the atlas grid.

  Lesions are drawn in atlas space and then warped with the tissue maps, so
  they follow the subject's deformation. Each one only touches a box of
  2.5 major radii (where its fraction is < 1e-3 at the default edge).

  Args:
    atlas: grid to draw on.
    centers, shapes: from :func:`sample_lesions`.
    edge: boundary sharpness (fraction 0.5 on the surface).

  Returns:
    (X, Y, Z) float32 lesion fraction in [0, 1].
  """
  shape = np.array(atlas.gm.shape)
  keep = np.ones(shape)
  for c, m in zip(centers, shapes):
    half = 2.5 / np.linalg.svd(m, compute_uv=False).min()  # 2.5 x major
    lo = np.clip(np.floor((c - half - atlas.origin) / atlas.voxel_mm), 0,
                 shape).astype(int)
    hi = np.clip(np.ceil((c + half - atlas.origin) / atlas.voxel_mm) + 1, 0,
                 shape).astype(int)
    axes = [atlas.origin[i] + atlas.voxel_mm * np.arange(lo[i], hi[i]) - c[i]
            for i in range(3)]
    rel = np.stack(np.meshgrid(*axes, indexing="ij"))
    d = np.linalg.norm(np.tensordot(m, rel, axes=1), axis=0)
    box = tuple(slice(i, j) for i, j in zip(lo, hi))
    keep[box] *= 1.0 - 1.0 / (1.0 + np.exp(np.minimum(edge * (d - 1.0), 50.)))
  return (1.0 - keep).astype(np.float32)


def add_lesions(fracs: np.ndarray, lesion: np.ndarray) -> np.ndarray:
  """Inserts lesions into CSF / GM / WM fractions by partial volume.

  Lesions grow in white matter: the lesion fraction is gated by the local
  WM fraction, then every other class (background included) is scaled by
  ``1 - p_lesion``.

  Args:
    fracs: (3, ...) CSF, GM, WM fractions.
    lesion: (...) raw lesion fraction.

  Returns:
    (4, ...) CSF, GM, WM, lesion fractions.
  """
  p = lesion * np.clip(2.0 * fracs[2], 0.0, 1.0)
  return np.concatenate([fracs * (1.0 - p), p[None]]).astype(np.float32)


def sample_tissue_params(rng: np.random.Generator,
                         params: PhantomParams) -> np.ndarray:
  """(3, 4) T1 (ms), T2 (ms), PD for CSF, GM, WM, lesion of one subject."""
  healthy = np.array([params.csf, params.gm, params.wm]).T  # (3, 3)
  jitter = np.clip(rng.standard_normal((3, 3)), -2.5, 2.5)
  healthy = healthy * (1.0 + params.tissue_jitter * jitter)
  lesion = rng.uniform(params.lesion_low, params.lesion_high)
  return np.concatenate([healthy, lesion[:, None]], axis=1)


def spin_echo(pd, t1, t2, tr, te):
  """Spin-echo magnitude ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``."""
  return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(pd, t1, t2, tr, te, ti):
  """Magnitude inversion recovery.

  ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)`` (TE << TI assumed).
  """
  return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)
                     ) * np.exp(-te / t2)


def null_inversion_time(t1, tr):
  """TI nulling a tissue of longitudinal relaxation ``t1`` at repetition ``tr``.

  Solves ``1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0``; tends to T1 ln 2 for
  TR >> T1 (CSF at TR 9 s: about 2.37 s).
  """
  return t1 * np.log(2.0 / (1.0 + np.exp(-tr / t1)))


def contrast_signals(tissue: np.ndarray, seq: SequenceParams,
                     flair_ti: float) -> np.ndarray:
  """(4 contrasts, 4 tissues) signal of a pure voxel of each tissue.

  Args:
    tissue: (3, 4) T1, T2, PD per tissue (see :func:`sample_tissue_params`).
    seq: sequence timings.
    flair_ti: FLAIR inversion time (ms).
  """
  t1, t2, pd = tissue
  return np.stack([
      spin_echo(pd, t1, t2, seq.t1w_tr, seq.t1w_te),
      spin_echo(pd, t1, t2, seq.t2w_tr, seq.t2w_te),
      spin_echo(pd, t1, t2, seq.pd_tr, seq.pd_te),
      inversion_recovery(pd, t1, t2, seq.flair_tr, seq.flair_te, flair_ti),
  ])


def rician(rng: np.random.Generator, signal: np.ndarray,
           sigma: np.ndarray) -> np.ndarray:
  """Magnitude of complex Gaussian noise: ``sqrt((S + n1)^2 + n2^2)``.

  Args:
    rng: noise generator.
    signal: (C, ...) noise-free magnitude.
    sigma: (C,) noise std per channel.
  """
  s = sigma.reshape(-1, *[1] * (signal.ndim - 1))
  n = rng.standard_normal((2,) + signal.shape) * s
  return np.sqrt((signal + n[0]) ** 2 + n[1] ** 2)


def tissue_labels(fracs: np.ndarray) -> np.ndarray:
  """(4, ...) CSF/GM/WM/lesion fractions -> (...) uint8 labels 0..4.

  Background where less than half of the voxel is tissue, otherwise the
  dominant tissue.
  """
  labels = np.argmax(fracs, axis=0) + 1
  return np.where(fracs.sum(0) >= 0.5, labels, 0).astype(np.uint8)


def has_lesion(lesion_mask: np.ndarray, min_pixels: int = 2) -> bool:
  """Class label: at least ``min_pixels`` lesion voxels in the image."""
  return int(np.count_nonzero(lesion_mask)) >= min_pixels


def simulate_subject(seed: int, index: int, geom: Geometry = Geometry(),
                     params: PhantomParams = PhantomParams()
                     ) -> Dict[str, np.ndarray]:
  """Simulates one virtual subject on the output grid.

  Args:
    seed: data-set seed.
    index: subject index; (seed, index) fully determines the result.
    geom: output grid (resolution, 2D slices or 3D volume).
    params: anatomy, lesion, tissue, sequence and noise parameters.

  Returns:
    Dict with, for Z = number of slices (2D) or ``res`` (3D) and R = C =
    ``res``:
      "t1w", "t2w", "pd", "flair": (Z, R, C) float32 magnitude images in
        physical units (PD-weighted fraction of equilibrium magnetisation).
      "tissue": (Z, R, C) uint8 labels (see ``LABELS``).
      "lesion_mask": (Z, R, C) uint8, lesion fraction > 0.5.
      "fractions": (4, Z, R, C) float32 CSF/GM/WM/lesion fractions.
      "slice_index": (Z,) int32 template z index (1 mm ICBM152 grid).
      "tissue_params": (3, 4) float64 T1/T2/PD of CSF/GM/WM/lesion.
      "num_lesions": () int32 lesions placed (some may be invisible).
  """
  atlas = load_atlas(geom.atlas_voxel_mm)
  axes = grid_axes(geom, atlas)
  rngs = subject_rngs(seed, index)

  coords = warp_points(rngs["anatomy"], axes, atlas.center, geom.fov_mm,
                       params)
  centers, shapes = sample_lesions(
      rngs["lesions"], atlas, params,
      is_healthy(seed, index, params.healthy_fraction))
  lesion = lesion_map(atlas, centers, shapes, params.lesion_edge)
  warped = warp_maps((atlas.csf, atlas.gm, atlas.wm, lesion), atlas, coords)
  fracs = add_lesions(warped[:3], warped[3])

  tissue = sample_tissue_params(rngs["tissue"], params)
  seq = params.sequence
  ti = seq.flair_ti
  if ti is None:  # nominal, not jittered, CSF T1: nulling is imperfect
    ti = null_inversion_time(params.csf[0], seq.flair_tr)
  signals = contrast_signals(tissue, seq, ti)  # (4 contrasts, 4 tissues)
  # One receive-coil sensitivity shared by all contrasts (same coil and
  # session); sequence-dependent transmit effects are ignored.
  bias = np.exp(params.bias_std * eval_field(
      random_smooth_field(rngs["bias"], 1, 4, 0.0), axes, atlas.center,
      geom.fov_mm)[0])
  images = np.tensordot(signals, fracs, axes=1) * bias

  f = geom.oversample
  fracs = block_mean(fracs, f).astype(np.float32)
  images = block_mean(images, f)
  labels = tissue_labels(fracs)
  brain = labels > 0
  sigma = images[:, brain].mean(axis=1) / params.snr
  images = rician(rngs["noise"], images, sigma).astype(np.float32)

  out = {c: images[i] for i, c in enumerate(CONTRASTS)}
  out.update(
      tissue=labels,
      lesion_mask=(fracs[3] > 0.5).astype(np.uint8),
      fractions=fracs,
      slice_index=slice_positions(geom, atlas),
      tissue_params=tissue,
      num_lesions=np.int32(len(centers)))
  return out
