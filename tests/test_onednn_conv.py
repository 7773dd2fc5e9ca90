"""oneDNN convolutions (conv_lowering="onednn") against XLA's, and the
fallback to XLA where oneDNN cannot run.

Error bounds. Both sides compute in float32 from the same inputs (bf16 cases
round the inputs to bf16 first, so both see identical values), and each
output is a sum of ``K`` products, ``K`` the reduction length (``k^d * Ci``
forward, at most ``k^d * Co`` for the input gradient, ``B * prod(S')`` for
the kernel gradient). Summing in another order changes a float32 sum by at
most ``K * 2^-24 * sum|terms|``; ``sum|terms|`` is the same convolution of
the absolute values, so the float32 bound is ``K * 2^-23 * |conv|(|x|,|w|)``
(twice the first-order bound). A product of two bf16 numbers is exact in
float32 (8 + 8 significant bits), so bf16 adds only the rounding of the
result to bf16's 8 significant bits (unit roundoff ``2^-8``); the bound
``2^-7 * |conv|(|x|,|w|)`` allows that rounding twice (e.g. a partial sum
kept in bf16) while any indexing error is of order ``|conv|`` itself.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.nn import conv as conv_lib
from medgen_jax.nn import layers
from medgen_jax.nn import onednn
from medgen_jax.nn.unet import UNet


def _skip_unless(dtype):
  reason = onednn.unavailable_reason(dtype)
  if reason is not None:
    pytest.skip(f"oneDNN {jnp.dtype(dtype)} convolutions unavailable: "
                f"{reason}")


def _pad(ksize, n):
  return (((ksize - 1) // 2, ksize // 2),) * n


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _conv_and_grads(x, w, g, strides, lowering, absolute):
  """y, dx, dk of a "same" conv for cotangent ``g`` (with ``absolute``:
  of |x|, |w|, |g|, i.e. the sums of |terms| of each output)."""
  if absolute:
    x, w, g = jnp.abs(x), jnp.abs(w), jnp.abs(g)
  pad = _pad(w.shape[0], x.ndim - 2)
  if lowering == "onednn":
    f = lambda x, w: onednn.conv(x, w, strides, pad)
  else:
    f = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (strides,) * (x.ndim - 2), pad,
        dimension_numbers=conv_lib._dimension_numbers(x.ndim - 2))
  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(g.astype(y.dtype)))


CASES = [  # (x shape, kernel side, stride)
    ((2, 8, 8, 16), 3, 1),
    ((2, 7, 7, 16), 3, 2),   # odd side: the last padded row is read by none
    ((2, 8, 8, 16), 1, 1),
    ((3, 8, 8, 16), 1, 2),   # 3 images: chunks of unequal size
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,ksize,strides", CASES)
def test_matches_xla(shape, ksize, strides, dtype):
  _skip_unless(dtype)
  n, ci, co = len(shape) - 2, shape[-1], 24
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape)
  w = rng.normal(size=(ksize,) * n + (ci, co)) / np.sqrt(ksize ** n * ci)
  out = onednn.output_shape(shape, w.shape, strides, _pad(ksize, n))
  g = rng.normal(size=out)
  # Same (dtype-rounded) values on both sides; the reference in float32.
  x, w, g = (jnp.asarray(a, dtype) for a in (x, w, g))
  got = _conv_and_grads(x, w, g, strides, "onednn", False)
  f32 = [a.astype(jnp.float32) for a in (x, w, g)]
  ref = _conv_and_grads(*f32, strides, "xla", False)
  mag = _conv_and_grads(*f32, strides, "xla", True)
  reduction = (ksize ** n * ci, ksize ** n * co, shape[0] * np.prod(out[1:-1]))
  for name, a, r, m, k in zip(("forward", "input grad", "kernel grad"), got,
                              ref, mag, reduction):
    assert a.shape == r.shape and a.dtype == jnp.dtype(dtype), name
    bound = 2.0 ** -7 if dtype == "bfloat16" else k * 2.0 ** -23
    err = jnp.abs(a.astype(jnp.float32) - r)
    assert bool(jnp.all(err <= bound * m + 1e-30)), (
        f"{name}: max error {float(err.max())} over the bound "
        f"{float((bound * m).max())}")
    assert float(jnp.abs(r).max()) > 0.1  # not vacuous


def test_3d_matches_xla():
  _skip_unless("float32")
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 5, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 8)) / 10, jnp.float32)
  g = jnp.asarray(rng.normal(size=(1, 3, 3, 3, 8)), jnp.float32)
  got = _conv_and_grads(x, w, g, 2, "onednn", False)
  ref = _conv_and_grads(x, w, g, 2, "xla", False)
  for a, r in zip(got, ref):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_gradients_of_gradients_match_xla():
  """An R1-style penalty: the kernel gradient of the squared input gradient
  differentiates the gradient convolutions themselves."""
  _skip_unless("float32")
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)) / 5, jnp.float32)
  pad = _pad(3, 2)

  def penalty(w, lowering):
    dx = jax.grad(lambda x: jnp.sum(jnp.sin(
        conv_lib.conv(x, w, 2, pad, lowering))))(x)
    return jnp.sum(dx ** 2)

  got = jax.jit(jax.grad(lambda w: penalty(w, "onednn")))(w)
  ref = jax.jit(jax.grad(lambda w: penalty(w, "explicit")))(w)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(ref).max()) > 0.1


def test_fallback_gives_xla_values_and_logs_once(monkeypatch):
  reason = "forced unavailable by a test"

  def unavailable():
    raise onednn.Unavailable(reason)

  logged = []
  onednn._log_once.cache_clear()
  monkeypatch.setattr(onednn, "load", unavailable)
  monkeypatch.setattr(onednn.logging, "warning",
                      lambda msg, *a: logged.append(msg % a))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  pad = _pad(3, 2)
  for _ in range(2):
    got = conv_lib.conv(x, w, 1, pad, "onednn")
  np.testing.assert_array_equal(got, conv_lib.conv(x, w, 1, pad, "explicit"))
  assert len(logged) == 1 and reason in logged[0], logged


def test_no_bf16_units_in_cpuinfo(tmp_path):
  without, with_bf16 = tmp_path / "avx512", tmp_path / "spr"
  without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
  with_bf16.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
  assert not onednn.cpu_has_bf16_units(str(without))
  assert onednn.cpu_has_bf16_units(str(with_bf16))
  assert not onednn.cpu_has_bf16_units(str(tmp_path / "missing"))


def test_failed_build_says_why(tmp_path, monkeypatch):
  try:
    onednn._build_inputs()
  except onednn.Unavailable as e:
    pytest.skip(f"nothing to build with: {e}")
  broken = tmp_path / "broken.cc"
  broken.write_text("int f() { return ; }\n")
  monkeypatch.setattr(onednn, "SOURCE", str(broken))
  with pytest.raises(onednn.Unavailable, match="failed.*build.log"):
    onednn.build(str(tmp_path / "cache"))


def _stack_loss_and_grads(lowering):
  """A stack of layers.Conv (3x3, strided, upsampling, 1x1) summed over two
  microbatches in a lax.scan, as the microbatched train step runs it."""
  convs = [layers.Conv(8, 3, conv_lowering=lowering),
           layers.Conv(8, 3, strides=2, conv_lowering=lowering),
           layers.Conv(8, 3, upsample=True, conv_lowering=lowering),
           layers.Conv(2, 1, conv_lowering=lowering)]
  model = nn.Sequential([f for c in convs for f in (c, nn.silu)][:-1])
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 2, 8, 8, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x[0])

  def loss(p):
    def body(total, xb):
      return total + jnp.mean((model.apply(p, xb) - xb[..., :2]) ** 2), None
    return jax.lax.scan(body, 0.0, x)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


def test_layers_in_a_scan_match_explicit():
  _skip_unless("float32")
  loss, grads = _stack_loss_and_grads("onednn")
  ref_loss, ref_grads = _stack_loss_and_grads("explicit")
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_heads=2,
            num_groups=4, attn_resolutions=())


def _unet_loss_and_grads(dtype, lowering):
  model = UNet(**TINY, dtype=dtype, conv_lowering=lowering)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
  t = jnp.array([10, 700])
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  params = jax.tree.map(lambda s: jnp.asarray(
      rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 25),
      jnp.float32), shapes)

  def loss(p):
    return jnp.mean((model.apply({"params": p}, x, t) - x) ** 2)

  return jax.jit(jax.value_and_grad(loss))(params)


def _rel_err(a, b):
  """Largest per-tensor ||a - b|| / ||b|| over a gradient tree."""
  return max(float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_unet_bf16_step_matches_float32():
  """A bf16 U-Net's loss and float32 parameter gradients on oneDNN against
  the float32 ones on XLA.

  Every activation and cotangent is rounded to bf16's 8 significant bits
  (2^-8 relative) on its way through ~20 layers, so bf16 gradients move by
  a few percent whichever library convolves; oneDNN's must stay within 1.5x
  XLA's own bf16 error (+1%): the roundings happen at the same places, only
  the summation inside each conv differs. (Runs where oneDNN has bf16
  convolutions: CPUs with AVX512-BF16/AMX-BF16.)
  """
  _skip_unless("bfloat16")
  ref_loss, ref_grads = _unet_loss_and_grads(jnp.float32, "explicit")
  xla_loss, xla_grads = _unet_loss_and_grads(jnp.bfloat16, "explicit")
  loss, grads = _unet_loss_and_grads(jnp.bfloat16, "onednn")
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert abs(loss - ref_loss) <= (1.5 * abs(xla_loss - ref_loss) +
                                  0.01 * ref_loss)
  assert _rel_err(grads, ref_grads) <= 1.5 * _rel_err(xla_grads,
                                                      ref_grads) + 0.01
