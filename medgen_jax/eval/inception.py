"""Inception-V3 feature extractor of FID, in Flax, with user-supplied weights.

The network is the one behind the FID numbers of the literature: the
TensorFlow "inception-2015-12-05" graph used by the original FID code, as
ported to PyTorch by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``).
It differs from torchvision's Inception-V3 in its weights, in average pooling
that ignores padded zeros, and in a max pool in the last block. Features are
the 2048-d global average of the last block ("pool3").

Preprocessing, fixed so that numbers are comparable:

1. input ``[B, H, W, C]`` float in ``input_range`` (default [0, 1]), values
   outside it are clipped (as writing PNGs would);
2. one channel is repeated to three (grayscale medical images); other
   channel counts are an error, pick or combine contrasts first;
3. bilinear resize to 299 x 299 without antialiasing (PyTorch's
   ``F.interpolate(..., mode="bilinear", align_corners=False)``);
4. scaling to [-1, 1].

Unlike file-based FID tools, images are not quantised to 8 bits.

Weights: nothing is downloaded. Convert the pytorch-fid state dict once with
``experiments/tools/convert_inception_weights.py`` into an ``.npz`` whose keys
are the flattened Flax variable paths joined by ``/``: for every
convolution layer (named as in PyTorch, e.g. ``Mixed_5b/branch1x1``)
``params/<layer>/kernel`` ``[kh, kw, in, out]``, ``params/<layer>/scale`` and
``params/<layer>/bias`` (BatchNorm affine), ``batch_stats/<layer>/mean`` and
``batch_stats/<layer>/var`` (BatchNorm running statistics), all float32; 470
arrays. :func:`load_variables` checks every name and shape against the
network.
"""

import functools
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medgen_jax import errors

FEATURE_DIM = 2048
INPUT_SIZE = 299
# The smallest input that survives the stride-2 stages without resizing.
MIN_INPUT_SIZE = 75
_HIGHEST = jax.lax.Precision.HIGHEST


class BasicConv(nn.Module):
  """Convolution without bias, BatchNorm (eps 1e-3, running stats), ReLU.

  Variables: ``params/kernel`` ``[kh, kw, in, out]``, ``params/scale``,
  ``params/bias``, ``batch_stats/mean``, ``batch_stats/var`` (``[out]``).
  Written with raw variables rather than ``nn.Conv``/``nn.BatchNorm``:
  tracing 94 of those costs seconds, and inference needs no batch updates.
  """

  features: int
  kernel: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f = self.features
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel, x.shape[-1], f))
    scale = self.param("scale", nn.initializers.ones, (f,))
    bias = self.param("bias", nn.initializers.zeros, (f,))
    mean = self.variable("batch_stats", "mean", jnp.zeros, (f,)).value
    var = self.variable("batch_stats", "var", jnp.ones, (f,)).value
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
    # Inference BatchNorm as one affine map: (y - mean) / sqrt(var + eps).
    mul = scale * jax.lax.rsqrt(var + 1e-3)
    return nn.relu(y * mul + (bias - mean * mul))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TF's average pool divides by the number of real (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1),
                   name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """The last two blocks; ``max_pool`` marks the FID graph's final block,
  whose pooling branch uses a 3x3 max pool instead of an average pool."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                         -1)
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jax.Array, input_range: Tuple[float, float] = (0., 1.),
               resize: bool = True) -> jax.Array:
  """``[B, H, W, 1 or 3]`` in ``input_range`` -> ``[B, 299, 299, 3]`` in
  [-1, 1] (see the module docstring)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Inception input: expected [B, H, W, 1] or "
                     f"[B, H, W, 3], got shape {images.shape}")
  lo, hi = input_range
  x = jnp.clip((images.astype(jnp.float32) - lo) / (hi - lo), 0.0, 1.0)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if resize:
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3),
                         "bilinear", antialias=False)
  elif min(x.shape[1:3]) < MIN_INPUT_SIZE:
    raise ValueError(f"Inception input: {x.shape[1:3]} is below the "
                     f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} minimum; resize it")
  return 2.0 * x - 1.0


class InceptionV3(nn.Module):
  """FID Inception-V3 up to pool3 (no classifier head).

  Attributes:
    input_range: the intensity range mapped to [0, 1], e.g. ``(-1, 1)`` for
      the images of this library's generators.
    resize: bilinear resize to 299 x 299 (the FID protocol); without it the
      input must be at least 75 x 75 (for tests and feature maps).
  """

  input_range: Tuple[float, float] = (0.0, 1.0)
  resize: bool = True

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """``[B, H, W, 1 or 3]`` -> pool3 features ``[B, 2048]`` float32."""
    x = preprocess(images, self.input_range, self.resize)
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def abstract_variables(model: Optional[InceptionV3] = None) -> Dict[str, Any]:
  """Shapes and dtypes of the network's variables, without computing them."""
  model = model or InceptionV3()
  size = INPUT_SIZE if model.resize else MIN_INPUT_SIZE
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def _flat(variables) -> Dict[str, Any]:
  return traverse_util.flatten_dict(variables, sep="/")


@functools.cache
def _expected_shapes() -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  # Tracing the network takes seconds; the answer never changes.
  return tuple((k, tuple(v.shape))
               for k, v in _flat(abstract_variables()).items())


def expected_shapes() -> Dict[str, Tuple[int, ...]]:
  """Every ``.npz`` key the weights file must hold, with its shape."""
  return dict(_expected_shapes())


def check_arrays(arrays: Dict[str, np.ndarray], source: str) -> None:
  """Raises naming ``source`` and the first missing, unexpected or
  mis-shaped parameter when ``arrays`` does not match the network."""
  expected = expected_shapes()
  for name, shape in expected.items():
    if name not in arrays:
      raise ValueError(f"{source}: missing parameter {name} (expected shape "
                       f"{shape})")
    found = tuple(np.shape(arrays[name]))
    if found != shape:
      raise ValueError(f"{source}: parameter {name} has shape {found}, "
                       f"expected {shape}")
  extra = sorted(set(arrays) - set(expected))
  if extra:
    raise ValueError(f"{source}: unexpected parameter {extra[0]} "
                     f"({len(extra)} unexpected in all)")


def load_variables(path: str) -> Dict[str, Any]:
  """Reads and checks an Inception ``.npz`` (see the module docstring).

  Returns:
    The Flax variables ``{"params": ..., "batch_stats": ...}`` in float32.
  """
  if not os.path.isfile(path):
    raise errors.MissingFileError(
        f"Inception weights file {path} not found; convert pytorch-fid's "
        "pt_inception-2015-12-05 state dict with "
        "experiments/tools/convert_inception_weights.py")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: np.asarray(f[k], np.float32) for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable .npz file ({e})") from e
  check_arrays(arrays, path)
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in arrays.items()}, sep="/")


def save_variables(variables, path: str) -> None:
  """Writes ``variables`` as the checked ``.npz`` format, atomically."""
  arrays = {k: np.asarray(v, np.float32) for k, v in _flat(variables).items()}
  check_arrays(arrays, path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


@functools.partial(jax.jit, static_argnames=("model",))
def _apply(model: InceptionV3, variables, images: jax.Array) -> jax.Array:
  return model.apply(variables, images)


def extract_features(variables, images, batch_size: int = 50,
                     input_range: Tuple[float, float] = (0.0, 1.0)
                     ) -> np.ndarray:
  """Pool3 features of many images, batch by batch.

  Args:
    variables: from :func:`load_variables`.
    images: ``[N, H, W, 1 or 3]`` in ``input_range`` (numpy or jax).
    batch_size: images per forward pass; the last batch is padded so every
      call reuses one compiled program.
    input_range: see :class:`InceptionV3`.

  Returns:
    ``[N, 2048]`` float32.
  """
  model = InceptionV3(input_range=tuple(float(v) for v in input_range))
  images = np.asarray(images)
  n = images.shape[0]
  if n == 0:
    raise ValueError("extract_features: no images")
  bs = min(batch_size, n)
  out = []
  for start in range(0, n, bs):
    batch = images[start:start + bs]
    pad = bs - batch.shape[0]
    if pad:
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    out.append(np.asarray(_apply(model, variables, jnp.asarray(batch))))
  return np.concatenate(out)[:n]

