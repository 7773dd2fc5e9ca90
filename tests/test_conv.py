"""The "explicit" convolution lowering gives XLA's values and gradients, as
canonical-layout convolutions also inside loops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.nn import conv


def _grads(lowering, x, k, strides):
  pad = tuple(((s - 1) // 2, s // 2) for s in k.shape[:-2])

  def loss(x, k):
    y = conv.conv(x, k, strides, pad, lowering)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))  # non-trivial cotangent

  return jax.value_and_grad(loss, argnums=(0, 1))(x, k)


@pytest.mark.parametrize("shape,ksize,strides", [
    ((2, 8, 8, 3), 3, 1),
    ((2, 8, 8, 3), 3, 2),
    ((2, 7, 7, 3), 3, 2),   # odd side: the last padded row is read by none
    ((2, 6, 6, 4), 1, 1),
    ((2, 6, 6, 4), 1, 2),
    ((1, 4, 4, 4, 2), 3, 1),
    ((1, 4, 4, 4, 2), 3, 2),
])
def test_explicit_matches_xla(shape, ksize, strides):
  kx, kk = jax.random.split(jax.random.key(0))
  n = len(shape) - 2
  x = jax.random.normal(kx, shape)
  k = jax.random.normal(kk, (ksize,) * n + (shape[-1], 5)) * 0.3
  (va, (dxa, dka)) = _grads("xla", x, k, strides)
  (vb, (dxb, dkb)) = _grads("explicit", x, k, strides)
  np.testing.assert_allclose(va, vb, rtol=1e-5)
  np.testing.assert_allclose(dxa, dxb, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dka, dkb, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(dka).max()) > 0.1  # the comparison is not vacuous
  assert float(jnp.abs(dxa).max()) > 0.1


def test_explicit_bf16_gradients_keep_dtypes():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 8))
  k = jax.random.normal(jax.random.key(2), (3, 3, 8, 8)) * 0.2
  (_, (ref_dx, ref_dk)) = _grads("xla", x, k, 1)
  (_, (dx, dk)) = _grads("explicit", x.astype(jnp.bfloat16),
                         k.astype(jnp.bfloat16), 1)
  assert dx.dtype == dk.dtype == jnp.bfloat16
  for got, ref in ((dx, ref_dx), (dk, ref_dk)):
    rel = float(jnp.abs(got.astype(jnp.float32) - ref).max() /
                jnp.abs(ref).max())
    assert rel < 0.05


def test_unknown_lowering():
  x = jnp.ones((1, 4, 4, 1))
  with pytest.raises(ValueError, match="conv lowering must be one of"):
    conv.conv(x, jnp.ones((3, 3, 1, 1)), 1, ((1, 1), (1, 1)), "winograd")


def test_auto_is_explicit_on_cpu():
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 2))
  k = jax.random.normal(jax.random.key(4), (3, 3, 2, 3))
  pad = ((1, 1), (1, 1))
  jaxpr = str(jax.make_jaxpr(lambda x: conv.conv(x, k, 1, pad, "auto"))(x))
  assert ("custom_vjp_call" in jaxpr) == (jax.default_backend() == "cpu")
  np.testing.assert_allclose(conv.conv(x, k, 1, pad, "auto"),
                             conv.conv(x, k, 1, pad, "xla"), rtol=1e-5)


def _conv_layouts(lowering):
  """dim_labels of every convolution XLA compiles for a scanned train step."""
  x = jnp.ones((2, 3, 8, 8, 4))
  k = jnp.ones((3, 3, 4, 4))

  def step(k, xs):
    def body(acc, x):
      gk, gx = jax.grad(lambda k, x: jnp.sum(jnp.sin(
          conv.conv(x, k, 1, ((1, 1), (1, 1)), lowering))), (0, 1))(k, x)
      return acc + gk, gx
    return jax.lax.scan(body, jnp.zeros_like(k), xs)

  text = jax.jit(step).lower(k, x).compile().as_text()
  return re.findall(r"convolution\(.*dim_labels=([\w>-]+)", text)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU layouts")
def test_explicit_gradients_stay_canonical_inside_a_scan():
  # XLA's own gradient convs inside a loop keep transposed layouts
  # (e.g. f01b_i01o->01bf), which XLA:CPU runs 100x slower.
  assert any(lbl != "b01f_01io->b01f" for lbl in _conv_layouts("xla"))
  layouts = _conv_layouts("explicit")
  assert len(layouts) == 3  # forward, input gradient, kernel gradient
  assert set(layouts) == {"b01f_01io->b01f"}


def _upsample_then_conv(x, k, lowering):
  n = x.ndim - 2
  for axis in range(1, 1 + n):
    x = jnp.repeat(x, 2, axis=axis)
  return conv.conv(x, k, 1, ((1, 1),) * n, lowering)


@pytest.mark.parametrize("shape,lowering", [
    ((2, 4, 4, 3), "explicit"),
    ((2, 5, 3, 3), "xla"),        # odd and unequal sides
    ((1, 3, 2, 4, 2), "explicit"),   # 3D
])
def test_upsample_conv_is_upsample_then_conv(shape, lowering):
  n = len(shape) - 2
  kx, kk, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, shape)
  k = jax.random.normal(kk, (3,) * n + (shape[-1], 5))
  ref = _upsample_then_conv(x, k, "xla")
  out = conv.upsample_conv(x, k, lowering)
  assert out.shape == ref.shape == (shape[0], *[2 * s for s in shape[1:-1]], 5)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Gradients with respect to the input and the 3-wide kernel match too.
  g = jax.random.normal(kg, ref.shape)
  want = jax.vjp(lambda x, k: _upsample_then_conv(x, k, "xla"), x, k)[1](g)
  got = jax.vjp(lambda x, k: conv.upsample_conv(x, k, lowering), x, k)[1](g)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_phase_kernels_add_the_taps_that_read_the_same_input():
  k = jnp.arange(3.0).reshape(3, 1, 1, 1) * jnp.ones((3, 3, 1, 1))  # rows 0,1,2
  pk = conv.phase_kernels(k)
  assert pk.shape == (2, 2, 1, 4)
  # Output channel (p, q): phase p along the rows; phase 0 taps rows
  # (0, 1 + 2), phase 1 taps rows (0 + 1, 2); each column tap sums 1 or 2
  # of the 3 equal column weights.
  cols = {0: (1.0, 2.0), 1: (2.0, 1.0)}
  rows = {0: (0.0, 3.0), 1: (1.0, 2.0)}
  for p in (0, 1):
    for q in (0, 1):
      want = np.outer(rows[p], cols[q])
      np.testing.assert_allclose(pk[:, :, 0, 2 * p + q], want)
  # The reversed order (upsample_conv's) lists phase 1 first on every axis.
  rev = conv.phase_kernels(k, order=(1, 0))
  for j in (0, 1):
    for l in (0, 1):
      np.testing.assert_allclose(rev[:, :, 0, 2 * j + l],
                                 pk[:, :, 0, 2 * (1 - j) + (1 - l)])
  with pytest.raises(ValueError, match="3-wide"):
    conv.phase_kernels(jnp.ones((1, 1, 2, 2)))
  with pytest.raises(ValueError, match="order"):
    conv.phase_kernels(k, order=(0, 0))


def test_upsample_layer_keeps_its_parameters_and_values():
  from medgen_jax.nn import layers  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  up = layers.Upsample(6, conv_lowering="explicit")
  params = up.init(jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, params) == {
      "Conv_0": {"kernel": (3, 3, 3, 6), "bias": (6,)}}
  plain = layers.Conv(6, 3, conv_lowering="xla")
  want = plain.apply({"params": params["Conv_0"]},
                     jnp.repeat(jnp.repeat(x, 2, 1), 2, 2))
  np.testing.assert_allclose(up.apply({"params": params}, x), want,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="kernel_size=3, strides=1"):
    layers.Conv(4, 3, strides=2, upsample=True).init(jax.random.key(0), x)
