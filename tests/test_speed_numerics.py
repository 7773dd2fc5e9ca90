"""The speed-oriented formulations keep the numbers: GroupNorm(+SiLU) with
its hand-written gradient, explicit convolution gradients, the per-op
profiler, the XLA:CPU flags."""

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax import profiling
from medgen_jax import runtime
from medgen_jax.nn import conv
from medgen_jax.nn import layers


def _gn_loss(apply):
  def loss(params, x):
    y = apply(params, x).astype(jnp.float32)
    return jnp.sum(jnp.sin(y) * x.astype(jnp.float32))  # non-trivial cotangent
  return jax.value_and_grad(loss, argnums=(0, 1))


@pytest.mark.parametrize("shape,groups,silu", [((2, 6, 6, 8), 4, False),
                                               ((2, 6, 6, 8), 4, True),
                                               ((2, 4, 4, 4, 6), 3, False),
                                               ((2, 4, 4, 4, 6), 3, True)])
def test_group_norm_matches_flax(shape, groups, silu):
  rng = np.random.default_rng(0)
  # Offset and scaled input: the one-pass variance must still be exact.
  x = jnp.asarray(rng.normal(3.0, 2.0, size=shape), jnp.float32)
  c = shape[-1]
  params = {"scale": jnp.asarray(rng.normal(1.0, 0.3, size=c), jnp.float32),
            "bias": jnp.asarray(rng.normal(0.0, 0.3, size=c), jnp.float32)}
  ours = layers.group_norm(c, groups, silu=silu)
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5)
  assert (jax.tree.map(jnp.shape, jax.eval_shape(ours.init, jax.random.key(0),
                                                 x)) ==
          jax.tree.map(jnp.shape, jax.eval_shape(ref.init, jax.random.key(0),
                                                 x)))
  act = nn.silu if silu else (lambda y: y)
  (va, (dpa, dxa)) = jax.jit(_gn_loss(
      lambda p, x: ours.apply({"params": p}, x)))(params, x)
  (vb, (dpb, dxb)) = jax.jit(_gn_loss(
      lambda p, x: act(ref.apply({"params": p}, x))))(params, x)
  np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dxa, dxb, rtol=1e-4, atol=1e-4)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(dpa[k], dpb[k], rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(dxa).max()) > 0.1  # the comparison is not vacuous
  assert float(jnp.abs(dpa["scale"]).max()) > 0.1


def test_group_norm_bf16_output_and_float32_stats():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16)) * 4.0 + 10.0
  scale, bias = jnp.ones((16,)), jnp.zeros((16,))
  y = layers.group_norm_fn(x.astype(jnp.bfloat16), scale, bias, 4,
                           dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  ref = layers.group_norm_fn(x, scale, bias, 4)
  # Normalised values are O(1); bf16 rounding of the input is the only loss.
  assert float(jnp.abs(y.astype(jnp.float32) - ref).max()) < 0.05
  with pytest.raises(ValueError, match="not divisible"):
    layers.group_norm_fn(x, scale, bias, 5)


@pytest.mark.parametrize("shape,ksize,padding", [
    ((2, 7, 5, 3), 3, ((1, 1), (1, 1))),      # odd, non-square sides
    ((2, 6, 6, 3), 2, ((0, 1), (0, 1))),      # even kernel, asymmetric pad
    ((1, 4, 5, 3, 2), 3, ((1, 1), (1, 1), (1, 1))),
    ((3, 9, 2), 5, ((2, 2),)),                 # 1D
])
@pytest.mark.parametrize("strides", [1, 2])
def test_explicit_gradients_match_xla(shape, ksize, padding, strides):
  n = len(shape) - 2
  kx, kk, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, shape)
  kshape = (ksize,) * n + (shape[-1], 4)
  k = jax.random.normal(kk, kshape)
  y, vjp = jax.vjp(lambda x_, k_: conv.xla_conv(x_, k_, strides, padding),
                   x, k)
  g = jax.random.normal(kg, y.shape)
  ref_dx, ref_dk = vjp(g)
  dk = jax.jit(conv.kernel_grad, static_argnums=(2, 3, 4))(
      x, g, kshape, strides, padding)
  dx = jax.jit(conv.input_grad, static_argnums=(2, 3, 4))(
      g, k, x.shape, strides, padding)
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(ref_dk).max()) > 0.5
  assert float(jnp.abs(ref_dx).max()) > 0.5


@pytest.fixture(scope="module")
def tiny_profile():
  """A tiny conv/GroupNorm net's train-like step, compiled and traced once."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = layers.Conv(8, conv_lowering="explicit")(x)
      h = nn.silu(layers.group_norm(8, 4)(h))
      return layers.Conv(2, conv_lowering="xla")(h)

  net = Net()
  x = jnp.ones((2, 8, 8, 2))
  params = net.init(jax.random.key(0), x)["params"]

  def step(p):
    grads = jax.grad(lambda p: jnp.mean(net.apply({"params": p}, x) ** 2))(p)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, grads)

  compiled = jax.jit(step).lower(params).compile()
  walls = []

  def run():
    t = time.perf_counter()
    jax.block_until_ready(compiled(params))
    walls.append(time.perf_counter() - t)

  rows, secs, ops = profiling.profile(run, compiled.as_text(), 2)
  return rows, secs, ops, sum(walls) / len(walls)


def test_profile_finds_every_kind_of_op(tiny_profile):
  rows, secs, ops, _ = tiny_profile
  cats = {r.category for r in rows}
  for expected in ("conv forward", "conv input-grad", "conv kernel-grad",
                   "group norm fwd", "group norm bwd"):
    assert expected in cats, (expected, cats)
  assert all(r.category in profiling.CATEGORIES for r in rows)
  assert abs(sum(r.share for r in rows) - 1.0) < 1e-6
  assert all(r.seconds >= 0 and r.count > 0 for r in rows)
  # Both lowerings' kernel gradients are recognised: the "xla" conv's
  # transposed convolution and the "explicit" conv's canonical one.
  kinds = {ops[n].opcode for n in secs if n in ops and
           profiling.categorize(ops[n]) == "conv kernel-grad"}
  assert kinds, "no kernel-gradient op was traced"
  table = profiling.format_table(rows, wall_s=0.5)
  assert "conv kernel-grad" in table and "wall time" in table


def test_categorize_rules():
  fwd = profiling.HloOp("f", "fusion", "f32[2,8,8,4]", "jit(s)/jvp(UNet)/"
                        "Conv_0/conv_general_dilated", ("convolution",),
                        (3, 3), (8, 8))
  dgrad = profiling.HloOp("d", "convolution", "f32[2,8,8,4]",
                          "jit(s)/transpose(jvp(UNet))/Conv_0/conv", (),
                          (3, 3), (8, 8))
  wgrad = profiling.HloOp("w", "convolution", "f32[4,3,3,4]", "", (),
                          (8, 8), (3, 3))
  opt = profiling.HloOp("o", "fusion", "f32[64]", "jit(s)/add",
                        ("parameter", "add", "multiply"))
  copy = profiling.HloOp("c", "fusion", "f32[64]", "jit(s)/UNet/x",
                         ("parameter", "slice", "bitcast"))
  assert [profiling.categorize(o) for o in (fwd, dgrad, wgrad, opt, copy)] == [
      "conv forward", "conv input-grad", "conv kernel-grad",
      "optimizer update", "copies/transposes/slices"]


def test_model_code_is_what_the_step_differentiates():
  def cat(op_name, kinds=("add", "multiply")):
    return profiling.categorize(profiling.HloOp("x", "fusion", "f32[8]",
                                                op_name, kinds))
  # Any method's networks, not only the DDPM's U-Net.
  assert cat("jit(train_step)/jvp(VAE)/Encoder/Dense_0/add") == (
      "elementwise/fusions")
  assert cat("jit(train_step)/transpose(jvp(Decoder))/mul") == (
      "elementwise/fusions")
  assert cat("jit(train_step)/jvp(VAE)/Dense_0/dot_general", ("dot",)) == (
      "dense (embedding)")
  # The gradient program's noise draws are not optimizer work.
  assert cat("jit(grad_step)/jit(_normal)/erf_inv") == "elementwise/fusions"
  assert cat("jit(apply_step)/mul") == "optimizer update"
  assert cat("jit(apply_step)/dot_general", ("dot",)) == "optimizer update"


def test_parse_hlo_sees_inside_fusions():
  text = """HloModule m

%fused (p0: f32[2,4,4,3], p1: f32[3,3,3,5]) -> f32[2,4,4,5] {
  %p0 = f32[2,4,4,3]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,3,5]{3,2,1,0} parameter(1)
  ROOT %c = f32[2,4,4,5]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

ENTRY %main (a: f32[2,4,4,3], b: f32[3,3,3,5]) -> f32[2,4,4,5] {
  %a = f32[2,4,4,3]{3,2,1,0} parameter(0)
  %b = f32[3,3,3,5]{3,2,1,0} parameter(1)
  ROOT %f = f32[2,4,4,5]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused, metadata={op_name="jit(f)/conv_general_dilated"}
}
"""
  ops = profiling.parse_hlo(text)
  assert set(ops) == {"m/a", "m/b", "m/f", "m/p0", "m/p1", "m/c"}
  f = ops["m/f"]
  assert f.opcode == "fusion" and "convolution" in f.inner
  assert f.conv_window == (3, 3) and f.conv_out_spatial == (4, 4)
  assert f.op_name == "jit(f)/conv_general_dilated"
  assert profiling.categorize(f) == "conv forward"


def test_xla_cpu_flags_keep_user_choice(monkeypatch):
  monkeypatch.setenv(runtime.ADDED_FLAGS_ENV, "")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_scheduler_type=X --foo=1")
  out = runtime.set_xla_cpu_flags()
  assert out.split().count("--xla_cpu_scheduler_type=X") == 1
  assert "MEMORY_OPTIMIZED" not in out and "--foo=1" in out
  monkeypatch.setenv("XLA_FLAGS", "--foo=1")
  out = runtime.set_xla_cpu_flags()
  assert out.split() == [*runtime.default_xla_cpu_flags(), "--foo=1"]
  assert os.environ["XLA_FLAGS"] == out


def test_microbatched_train_steps_compile_with_the_default_scheduler(
    monkeypatch):
  monkeypatch.setenv(runtime.ADDED_FLAGS_ENV, "")
  # Only real flags: XLA reads $XLA_FLAGS again when it compiles.
  monkeypatch.setenv("XLA_FLAGS", "")
  runtime.set_xla_cpu_flags()
  assert not runtime.user_set_flag(runtime.SCHEDULER_FLAG)
  assert runtime.train_step_compiler_options(1) is None
  opts = runtime.train_step_compiler_options(4)
  assert opts == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"}
  # XLA takes the option per program.
  f = jax.jit(lambda x: jnp.cumsum(x * 2.0), compiler_options=opts)
  np.testing.assert_allclose(f(jnp.arange(4.0)), [0.0, 2.0, 6.0, 12.0])
  # A scheduler the user chose in $XLA_FLAGS applies to every program.
  monkeypatch.setenv(runtime.ADDED_FLAGS_ENV, "")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_scheduler_type=X")
  runtime.set_xla_cpu_flags()
  assert runtime.user_set_flag(runtime.SCHEDULER_FLAG)
  assert runtime.train_step_compiler_options(4) is None


def test_fast_compile_flag_only_without_accelerators(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert runtime.FAST_COMPILE_FLAG in runtime.default_xla_cpu_flags()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert runtime.FAST_COMPILE_FLAG not in runtime.default_xla_cpu_flags()


def test_use_huge_pages_is_a_no_op_when_set_or_disabled(monkeypatch):
  calls = []
  monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  runtime.use_huge_pages()
  monkeypatch.setenv("GLIBC_TUNABLES", "")
  monkeypatch.setenv("MEDGEN_JAX_HUGE_PAGES", "0")
  runtime.use_huge_pages()
  assert not calls
  monkeypatch.setenv("MEDGEN_JAX_HUGE_PAGES", "1")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  monkeypatch.setattr(runtime, "_thp_available", lambda: True)
  runtime.use_huge_pages()
  if calls:  # Linux: re-executes itself with the tunable appended.
    _, argv, env = calls[0]
    assert env["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert argv[0]


def test_mfu_peaks_follow_the_compute_dtype():
  # The table lives in profiling (bench defines absl flags that would clash
  # with launch.py's when both are imported in one test session).
  assert profiling.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  # float32 runs on TF32 tensor cores under JAX's default precision.
  assert profiling.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 495.0
  assert profiling.peak_tflops("TPU v5 lite", "float32") == 197.0
  assert profiling.peak_tflops("cpu", "float32") == 0.0


def test_breakdown_skips_loops_whose_bodies_are_traced():
  ops = {"w": profiling.HloOp("w", "while", "(f32[2])", "jit(s)/while"),
         "f": profiling.HloOp("f", "fusion", "f32[2]", "jit(s)/while/body/add",
                              ("add",))}
  rows = profiling.breakdown({"w": 1.0, "f": 0.25}, ops)
  assert [(r.category, r.seconds, r.count) for r in rows] == [
      ("optimizer update", 0.25, 1)]
  assert [n for n, _, _ in profiling.top_ops({"w": 1.0, "f": 0.25}, ops)] == [
      "f"]


def test_wall_shares_split_overlapping_ops():
  # a runs 0-10, b 5-15, c 20-22 (alone), d twice within a's time.
  shares = profiling.wall_shares([(0, 10, "a"), (5, 15, "b"), (20, 22, "c"),
                                  (1, 2, "d"), (3, 4, "d")])
  # 0-1 a; 1-2 a+d; 2-3 a; 3-4 a+d; 4-5 a; 5-10 a+b; 10-15 b; 20-22 c.
  assert shares == {"a": 6, "d": 1, "b": 8, "c": 2}
  assert sum(shares.values()) == 15 + 2  # the union of the intervals
  assert profiling.wall_shares([]) == {}


def test_profile_rows_add_up_to_at_most_the_wall_time(tiny_profile):
  rows, secs, ops, wall = tiny_profile
  # Each instant is charged once, so the instructions of one call add up to
  # no more than its wall time, however many of them ran concurrently.
  assert 0 < sum(s for n, s in secs.items() if n in ops) <= wall
  assert sum(r.seconds for r in rows) <= wall
  assert "total (traced)" in profiling.format_table(rows)


def test_parse_hlo_keeps_modules_apart():
  one = """HloModule {m}

ENTRY %main (a: f32[4]) -> f32[4] {{
  %a = f32[4]{{0}} parameter(0)
  ROOT %f = f32[4]{{0}} {op}(%a, %a)
}}
"""
  ops = profiling.parse_hlo(one.format(m="jit_grads", op="add") + "\n" +
                            one.format(m="jit_update", op="multiply"))
  assert ops["jit_grads/f"].opcode == "add"
  assert ops["jit_update/f"].opcode == "multiply"
