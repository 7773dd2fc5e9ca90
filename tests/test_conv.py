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
