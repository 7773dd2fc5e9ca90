"""Convolution lowerings, selectable in one place.

``"xla"`` is XLA's own convolution. ``"gemm"`` keeps it for the forward pass
and the input gradient but computes the kernel (weight) gradient as matrix
products of shifted rows: when XLA:CPU hands convolutions to YNNPACK (the
default of jaxlib 0.10), its backward-filter convolution runs 5-10x below
the machine's matmul speed at medical-image sizes, and the GEMMs are 2-3x
faster. With the project's XLA:CPU flags (:mod:`medgen_jax.runtime`), XLA's
Eigen convolutions are used instead, which match PyTorch's oneDNN kernels
there, and ``"xla"`` is the fastest again; ``"auto"`` picks accordingly.
"""

import functools
import itertools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax import runtime

Padding = Tuple[Tuple[int, int], ...]
LOWERINGS = ("auto", "xla", "gemm")


def xla_conv(x: jax.Array, kernel: jax.Array, strides: int,
             padding: Padding) -> jax.Array:
  """``[B, *S, Ci]`` * ``[*k, Ci, Co]`` -> ``[B, *S', Co]`` (channels-last)."""
  n = kernel.ndim - 2
  spatial = "DHW"[-n:]
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(strides,) * n, padding=padding,
      dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))


def kernel_grad_gemm(x: jax.Array, g: jax.Array,
                     kernel_shape: Sequence[int], strides: int,
                     padding: Padding) -> jax.Array:
  """Kernel gradient as one ``[Ci, Co]`` GEMM per kernel offset.

  Args:
    x: conv input ``[B, *S, Ci]``.
    g: gradient of the conv output ``[B, *S', Co]``.
    kernel_shape: ``(*k, Ci, Co)``.
    strides: spatial stride.
    padding: the forward padding per spatial axis.

  Returns:
    ``dL/dkernel`` with ``kernel_shape``, accumulated in float32.
  """
  n = len(kernel_shape) - 2
  xp = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  out_sizes = g.shape[1:-1]
  ci, co = kernel_shape[-2], kernel_shape[-1]
  g2 = g.reshape(-1, co)
  grads = []
  for offsets in itertools.product(*(range(k) for k in kernel_shape[:n])):
    window = tuple(slice(o, o + (size - 1) * strides + 1, strides)
                   for o, size in zip(offsets, out_sizes))
    patch = xp[(slice(None),) + window + (slice(None),)].reshape(-1, ci)
    grads.append(jnp.matmul(patch.T, g2, preferred_element_type=jnp.float32))
  return jnp.stack(grads).reshape(kernel_shape)


def kernel_grad_rows(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                     padding: Padding) -> jax.Array:
  """Kernel gradient of a stride-1 conv as ONE GEMM over shifted rows.

  Both operands are flattened to rows of the zero-padded input grid
  (``R = B * prod(padded sides)`` rows): ``x`` to ``[R, Ci]`` and ``g``,
  zero-padded onto the same grid, to ``[R, Co]``. A kernel offset ``o`` is
  then a shift of ``o . row_strides`` rows, ``dK[o] = sum_r X[r + o] g[r]``.
  Offsets along the leading spatial axes shift ``X`` and those along the
  last axis shift ``g`` the other way, so with the shifted copies
  concatenated on the channel axis, ``X_s [R, k1..k_{n-1} Ci]`` and
  ``G_s [R, k_n Co]``, every offset's block is in ``X_s^T G_s``. For a 3x3
  kernel that is 3 copies of each operand and one large GEMM, instead of 9
  patch copies and 9 small GEMMs; the price is the padding rows
  (``prod(P / S)``: 13% more FLOPs at 32x32).

  Args:
    x: conv input ``[B, *S, Ci]``.
    g: gradient of the conv output ``[B, *O, Co]`` (``O = P - k + 1``).
    kernel_shape: ``(*k, Ci, Co)``.
    padding: the forward padding per spatial axis.

  Returns:
    ``dL/dkernel`` with ``kernel_shape``, accumulated in float32.
  """
  n = len(kernel_shape) - 2
  ks = tuple(kernel_shape[:n])
  ci, co = kernel_shape[-2], kernel_shape[-1]
  xp = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  sides = xp.shape[1:-1]
  # Zeros where g has no output position: the tail of every axis.
  gp = jnp.pad(g, ((0, 0),) + tuple((0, p - o) for p, o in
                                     zip(sides, g.shape[1:-1])) + ((0, 0),))
  rows = xp.shape[0] * int(np.prod(sides))
  strides = [int(np.prod(sides[i + 1:])) for i in range(n)]
  offsets = [sum(o * s for o, s in zip(offs, strides)) for offs in
             itertools.product(*(range(k) for k in ks[:-1]))]
  xf = jnp.pad(xp.reshape(rows, ci), ((0, max(offsets)), (0, 0)))
  x_shift = jnp.concatenate(
      [jax.lax.slice_in_dim(xf, off, off + rows) for off in offsets], axis=1)
  gf = gp.reshape(rows, co)
  g_shift = jnp.concatenate(
      [jnp.pad(gf[:rows - o], ((o, 0), (0, 0))) for o in range(ks[-1])],
      axis=1)
  dk = jnp.matmul(x_shift.T, g_shift, preferred_element_type=jnp.float32)
  # [(k1..k_{n-1}) Ci, k_n Co] -> [k1..k_{n-1}, Ci, k_n, Co] -> [*k, Ci, Co].
  dk = dk.reshape(ks[:-1] + (ci, ks[-1], co))
  perm = tuple(range(n - 1)) + (n, n - 1, n + 1)
  return dk.transpose(perm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def gemm_conv(x: jax.Array, kernel: jax.Array, strides: int,
              padding: Padding) -> jax.Array:
  """Same values and gradients as :func:`xla_conv`; faster kernel gradient."""
  return xla_conv(x, kernel, strides, padding)


def _gemm_conv_fwd(x, kernel, strides, padding):
  return xla_conv(x, kernel, strides, padding), (x, kernel)


def _gemm_conv_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: xla_conv(x_, kernel, strides, padding), x)
  (dx,) = input_vjp(g)
  if strides == 1 and kernel.size > kernel.shape[-2] * kernel.shape[-1]:
    dk = kernel_grad_rows(x, g, kernel.shape, padding)
  else:  # strided and 1x1 convs: per-offset patches.
    dk = kernel_grad_gemm(x, g, kernel.shape, strides, padding)
  return dx, dk.astype(kernel.dtype)


gemm_conv.defvjp(_gemm_conv_fwd, _gemm_conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, strides: int, padding: Padding,
         lowering: str = "xla") -> jax.Array:
  """Dispatches to a lowering by name (see ``LOWERINGS``).

  ``"auto"`` takes ``"gemm"`` on a CPU whose convolutions go through
  YNNPACK and XLA's own convolution everywhere else (Eigen on CPU with the
  project's flags, cuDNN, the TPU compiler).
  """
  if lowering == "auto":
    ynn_cpu = (jax.default_backend() == "cpu" and
               not runtime.cpu_convolutions_are_xla())
    lowering = "gemm" if ynn_cpu else "xla"
  if lowering == "gemm":
    return gemm_conv(x, kernel, strides, tuple(map(tuple, padding)))
  if lowering == "xla":
    return xla_conv(x, kernel, strides, padding)
  raise ValueError(f"conv lowering must be one of {LOWERINGS}, got {lowering!r}")
