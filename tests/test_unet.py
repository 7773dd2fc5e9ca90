"""Tests for medgen_jax.nn.layers and medgen_jax.nn.unet (tiny models)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax import runtime
from medgen_jax.diffusion import samplers
from medgen_jax.nn import layers
from medgen_jax.nn import unet
from medgen_jax.nn.unet import UNet

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_heads=2,
            num_groups=4)


def random_params(module, *args, seed=0):
  """Random params with ``module.init``'s structure, drawn with numpy.

  Compiling ``init`` costs ~10 s per tiny net on CPU (one threefry program
  per parameter), and zero-initialised output layers would make every net
  output 0; numpy params avoid both. Scales keep activations O(1).
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 25
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in),
                       leaf.dtype)

  return jax.tree.map(draw, shapes)


def _build(model, x, y=None):
  """Random params and a jitted apply."""
  params = random_params(model, x, np.zeros(x.shape[:1]), y)["params"]
  apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  return params, apply


@pytest.fixture(scope="module")
def cond2d():
  """Conditional 2D net; every call uses batch 4 so apply compiles once."""
  model = UNet(**TINY, attn_resolutions=(4,), num_classes=2)
  x = np.random.default_rng(2).normal(size=(4, 8, 8, 2)).astype(np.float32)
  params, apply = _build(model, x, np.zeros((4,), np.int32))
  return model, params, apply, x


def test_conv_matches_flax_conv():
  rng = np.random.default_rng(0)
  for dims in (2, 3):
    x = rng.normal(size=(2,) + (6,) * dims + (3,)).astype(np.float32)
    ours = layers.Conv(5, 3, spatial_dims=dims)
    ref = nn.Conv(5, (3,) * dims, padding="SAME")
    p = random_params(ours, x)
    assert (jax.tree.map(jnp.shape, p) ==
            jax.tree.map(jnp.shape, jax.eval_shape(ref.init,
                                                   jax.random.key(0), x)))
    np.testing.assert_allclose(jax.jit(ours.apply)(p, x),
                               jax.jit(ref.apply)(p, x), rtol=1e-5, atol=1e-5)
  down = layers.Conv(4, 3, strides=2, spatial_dims=2)
  x = np.ones((1, 8, 8, 3), np.float32)
  out = jax.eval_shape(down.apply, random_params(down, x), x)
  assert out.shape == (1, 4, 4, 4)


def test_timestep_embedding():
  emb = layers.timestep_embedding(jnp.array([0, 5, 999]), 16)
  assert emb.shape == (3, 16) and emb.dtype == jnp.float32
  np.testing.assert_allclose(emb[0], np.r_[np.ones(8), np.zeros(8)])
  # Float timesteps give the same embedding as the equal integers.
  np.testing.assert_allclose(
      layers.timestep_embedding(jnp.array([5.0]), 16)[0], emb[1], rtol=1e-6)


def test_attention_is_per_sample_and_permutation_equivariant():
  block = layers.AttentionBlock(num_heads=2, num_groups=4)
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype(np.float32)
  apply = jax.jit(block.apply)
  p = random_params(block, x)
  out = np.asarray(apply(p, x))
  # No positional encoding: permuting positions permutes the output.
  perm = apply(p, x[:, ::-1, ::-1])
  np.testing.assert_allclose(perm, out[:, ::-1, ::-1], rtol=1e-5, atol=1e-5)
  # Batch elements do not see each other.
  other = apply(p, np.stack([x[0], np.zeros_like(x[1])]))
  np.testing.assert_allclose(other[0], out[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, x, atol=1e-3)


def test_unet_conditional_2d(cond2d):
  model, params, apply, x = cond2d
  t = np.array([0, 10, 500, 999], np.int32)
  out = apply(params, x, t, np.array([0, 1, 2, 1], np.int32))
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  # y=None means the null label; labels change the output.
  null = np.full((4,), 2, np.int32)
  np.testing.assert_allclose(apply(params, x, t, None),
                             apply(params, x, t, null), rtol=1e-6)
  assert not np.allclose(apply(params, x, t, np.zeros((4,), np.int32)),
                         apply(params, x, t, np.ones((4,), np.int32)))
  assert "class_embed" in params
  assert params["class_embed"]["embedding"].shape == (3, 4 * model.ch)


def test_cfg_with_zero_scale_is_conditional(cond2d):
  _, params, apply, x = cond2d
  # Batch 2, so the guided call (cond + uncond) has the compiled batch of 4.
  x, t, y = x[:2], np.array([300, 700], np.int32), np.array([0, 1], np.int32)
  model_fn = lambda x, t, y: apply(params, x, t, y)
  both = np.asarray(apply(params, np.concatenate([x, x]),
                          np.concatenate([t, t]), np.array([0, 1, 2, 2])))
  cond, uncond = both[:2], both[2:]
  guide = lambda w: samplers.guided_denoise_fn(model_fn, y, w, 2)(x, t)
  np.testing.assert_allclose(guide(0.0), cond, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guide(3.0), uncond + 4.0 * (cond - uncond),
                             rtol=1e-4, atol=1e-4)


def test_unet_unconditional_3d_and_out_channels():
  model = UNet(**TINY, attn_resolutions=(4,), spatial_dims=3, out_channels=3)
  x = np.ones((2, 8, 8, 8, 1), np.float32)
  params, apply = _build(model, x)
  out = apply(params, x, np.array([1.5, 7.0], np.float32), None)
  assert out.shape == (2, 8, 8, 8, 3) and out.dtype == jnp.float32
  assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 1, 8)
  with pytest.raises(ValueError, match="unconditional"):
    jax.eval_shape(apply, params, x, np.zeros((2,)), np.zeros((2,), int))


def test_unet_bfloat16_params_stay_float32(cond2d):
  _, params, apply, x = cond2d
  model = UNet(**TINY, attn_resolutions=(4,), num_classes=2,
               dtype=jnp.bfloat16)
  t = np.array([0, 10, 500, 999], np.int32)
  y = np.array([0, 1, 2, 1], np.int32)
  p16 = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(p16))
  # Same float32 params, bf16 compute: close to the float32 output.
  out = jax.jit(lambda p: model.apply({"params": p}, x, t, y))(params)
  assert out.dtype == jnp.float32
  ref = apply(params, x, t, y)
  assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(
      jnp.max(jnp.abs(ref)))


def test_unet_rejects_bad_shapes():
  model = UNet(**TINY, attn_resolutions=())
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 6, 7, 1)),
                   jnp.zeros((1,)))
  with pytest.raises(ValueError, match="spatial_dims"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8, 8, 8, 1)),
                   jnp.zeros((1,)))


def test_zero_initialised_controlnet_leaves_the_base_output_unchanged():
  kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
            num_heads=2, num_groups=4, num_classes=2)
  net = unet.UNet(out_channels=1, **kw)
  control = unet.ControlNet(**kw)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  hint = jnp.where(jax.random.uniform(jax.random.key(1), (2, 8, 8, 1)) > 0.8,
                   1.0, -1.0)
  t, y = jnp.array([3, 500]), jnp.array([0, 1])
  # rbg keys: threefry init programs compile 5-10x slower on XLA:CPU.
  base = jax.jit(net.init)(runtime.init_key(2), x, t, y)["params"]
  # A "trained" base: the fresh U-Net's output convolution is zero.
  rng = np.random.default_rng(4)  # numpy: one jax draw per shape compiles
  base = jax.tree.map(
      lambda v: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32),
      jax.device_get(base))
  own = jax.jit(control.init)(runtime.init_key(3), x, hint, t, y)["params"]
  params = unet.controlnet_init(base, own)
  # The copy starts from the base encoder; hint and zero convs are its own.
  np.testing.assert_array_equal(params["ResBlock_0"]["Conv_0"]["kernel"],
                                base["ResBlock_0"]["Conv_0"]["kernel"])
  np.testing.assert_array_equal(params["hint_0"]["kernel"],
                                own["hint_0"]["kernel"])
  # Jitted: op-by-op dispatch of two U-Nets costs more than compiling.
  adapt = jax.jit(lambda p: control.apply({"params": p}, x, hint, t, y))
  run = jax.jit(lambda c: net.apply({"params": base}, x, t, y, control=c))
  plain = jax.jit(lambda: net.apply({"params": base}, x, t, y))()
  residuals = adapt(params)
  assert len(residuals) == 5 and all(float(jnp.abs(r).max()) == 0.0
                                     for r in residuals)
  np.testing.assert_array_equal(run(residuals), plain)
  # Once the zero convolutions move, the hint changes the output.
  moved = {k: (jax.tree.map(lambda v: v + 0.1, v) if k.startswith("zero_")
               else v) for k, v in params.items()}
  assert not np.allclose(run(adapt(moved)), plain)


def test_remat_keeps_parameter_paths_and_gradients():
  kw = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
            num_groups=4, dropout=0.1, conv_lowering="explicit")
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 1), jnp.float32)
  t = jnp.array([3, 5])
  plain, remat = UNet(**kw), UNet(remat=True, **kw)
  key = {"params": runtime.init_key(0)}
  params = jax.jit(plain.init)(key, x, t)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(remat.init, key, x, t)["params"])
  # The zero-initialised output layer would hide every other gradient.
  params = jax.tree.map(lambda v: v + 0.01, params)

  def grad(model):
    return jax.jit(jax.grad(lambda p: jnp.mean(model.apply(
        {"params": p}, x, t, train=True,
        rngs={"dropout": jax.random.key(1)}) ** 2)))(params)

  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
