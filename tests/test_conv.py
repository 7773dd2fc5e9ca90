"""The "gemm" convolution lowering gives XLA's values and gradients."""

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
    ((2, 6, 6, 4), 1, 1),
    ((1, 4, 4, 4, 2), 3, 1),
    ((1, 4, 4, 4, 2), 3, 2),
])
def test_gemm_matches_xla(shape, ksize, strides):
  kx, kk = jax.random.split(jax.random.key(0))
  n = len(shape) - 2
  x = jax.random.normal(kx, shape)
  k = jax.random.normal(kk, (ksize,) * n + (shape[-1], 5)) * 0.3
  (va, (dxa, dka)) = _grads("xla", x, k, strides)
  (vb, (dxb, dkb)) = _grads("gemm", x, k, strides)
  np.testing.assert_allclose(va, vb, rtol=1e-5)
  np.testing.assert_allclose(dxa, dxb, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dka, dkb, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(dka).max()) > 0.1  # the comparison is not vacuous


def test_gemm_bf16_kernel_grad_is_accumulated_in_float32():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 8))
  k = jax.random.normal(jax.random.key(2), (3, 3, 8, 8)) * 0.2
  (_, (_, ref)) = _grads("xla", x, k, 1)
  (_, (_, got)) = _grads("gemm", x.astype(jnp.bfloat16),
                         k.astype(jnp.bfloat16), 1)
  assert got.dtype == jnp.bfloat16
  rel = float(jnp.abs(got.astype(jnp.float32) - ref).max() /
              jnp.abs(ref).max())
  assert rel < 0.05


def test_unknown_lowering():
  x = jnp.ones((1, 4, 4, 1))
  with pytest.raises(ValueError, match="conv lowering must be one of"):
    conv.conv(x, jnp.ones((3, 3, 1, 1)), 1, ((1, 1), (1, 1)), "winograd")


@pytest.mark.parametrize("xla_flags,want_gemm", [
    ("", True),  # jaxlib's default: convolutions through YNNPACK
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_"
     "DOT,LIBRARY_FUSION_TYPE_REDUCE", False),
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_"
     "CONVOLUTION", True),
])
def test_auto_follows_cpu_convolution_library(monkeypatch, xla_flags,
                                              want_gemm):
  monkeypatch.setenv("XLA_FLAGS", xla_flags)
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 2))
  k = jax.random.normal(jax.random.key(4), (3, 3, 2, 3))
  pad = ((1, 1), (1, 1))
  jaxpr = str(jax.make_jaxpr(lambda x: conv.conv(x, k, 1, pad, "auto"))(x))
  cpu = jax.default_backend() == "cpu"
  assert ("custom_vjp_call" in jaxpr) == (cpu and want_gemm)
  np.testing.assert_allclose(conv.conv(x, k, 1, pad, "auto"),
                             conv.conv(x, k, 1, pad, "xla"), rtol=1e-5)
