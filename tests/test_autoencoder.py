"""Tests for medgen_jax.nn.autoencoder (tiny networks, pure VQ functions).

Network shapes are checked with ``jax.eval_shape`` (nothing compiles);
one tiny 2D pair and one discriminator actually run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.nn import autoencoder as ae
from test_unet import random_params  # pylint: disable=wrong-import-order

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4)


def _shape(module, *args):
  """Output shape of ``module`` on ``args`` without compiling anything."""
  params = jax.eval_shape(module.init, jax.random.key(0), *args)
  return jax.eval_shape(module.apply, params, *args).shape


# --- vector quantisation --------------------------------------------------

CODEBOOK = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_quantize_nearest_codes():
  z = jnp.array([[0.1, 0.2], [0.9, -0.1], [0.2, 0.7], [0.6, 0.8],
                 [2.0, 2.0]])
  z_q, idx, dist = ae.quantize(z, CODEBOOK)
  np.testing.assert_array_equal(idx, [0, 1, 2, 3, 3])
  assert idx.dtype == jnp.int32
  np.testing.assert_array_equal(z_q, CODEBOOK[np.asarray(idx)])
  brute = np.sum((np.asarray(z)[:, None] - np.asarray(CODEBOOK)[None]) ** 2,
                 axis=-1)
  np.testing.assert_allclose(dist, brute, rtol=1e-6, atol=1e-6)


def test_quantize_straight_through():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(2, 3, 3, 2)), jnp.float32)
  w = jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  _, idx, dist = ae.quantize(z, CODEBOOK)
  assert idx.shape == (2, 3, 3) and dist.shape == (2, 3, 3, 4)
  loss = lambda z, cb: jnp.sum(ae.quantize(z, cb)[0] * w)
  g_z, g_cb = jax.grad(loss, argnums=(0, 1))(z, CODEBOOK)
  np.testing.assert_array_equal(g_z, w)
  np.testing.assert_array_equal(g_cb, np.zeros_like(CODEBOOK))


def test_ema_update_hand_computed():
  z = jnp.array([[2.0, 0.0], [4.0, 0.0], [0.0, 2.0]])
  idx = jnp.array([0, 0, 1])
  size = jnp.array([1.0, 1.0, 0.0])
  embed_sum = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
  # counts (2, 1, 0), sums ((6, 0), (0, 2), 0); decay 0.5 averages them.
  size, embed_sum, cb = ae.ema_update(size, embed_sum, z, idx, 0.5, 0.1)
  np.testing.assert_allclose(size, [1.5, 1.0, 0.0])
  np.testing.assert_allclose(embed_sum, [[3.5, 0], [0, 1.5], [0, 0]])
  # n = 2.5; smoothed sizes (size + 0.1) / (2.5 + 3 * 0.1) * 2.5.
  np.testing.assert_allclose(
      cb, [[3.5 * 2.8 / (1.6 * 2.5), 0], [0, 1.5 * 2.8 / (1.1 * 2.5)],
           [0, 0]], rtol=1e-6)
  # eps = 0: the plain ratio of the EMA sums and sizes.
  _, _, cb = ae.ema_update(size[:2], embed_sum[:2] * 0, z, idx, 0.0, 0.0)
  np.testing.assert_allclose(cb, [[3.0, 0.0], [0.0, 2.0]], rtol=1e-6)


def test_restart_dead_codes():
  cb = jnp.array([[0.0, 0.0], [5.0, 5.0], [7.0, 7.0]])
  size = jnp.array([1.0, 1e-3, 2.0])
  embed_sum = cb * size[:, None]
  z = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
  restart = jax.jit(ae.restart_dead_codes)
  cb2, size2, sum2, num = restart(cb, size, embed_sum, z,
                                  jax.random.key(0), 0.01)
  assert int(num) == 1
  np.testing.assert_array_equal(cb2[jnp.array([0, 2])], cb[jnp.array([0, 2])])
  assert any(np.array_equal(cb2[1], row) for row in np.asarray(z))
  np.testing.assert_allclose(size2, [1.0, 0.01, 2.0])
  np.testing.assert_allclose(sum2[1], 0.01 * cb2[1], rtol=1e-6)
  np.testing.assert_array_equal(sum2[jnp.array([0, 2])],
                                embed_sum[jnp.array([0, 2])])


def test_perplexity_and_usage():
  np.testing.assert_allclose(ae.perplexity(jnp.arange(4), 4), 4.0, rtol=1e-6)
  np.testing.assert_allclose(ae.perplexity(jnp.full((3, 2), 2), 4), 1.0,
                             rtol=1e-6)
  np.testing.assert_allclose(ae.perplexity(jnp.array([0, 0, 1, 1]), 4), 2.0,
                             rtol=1e-6)
  assert float(ae.usage(jnp.array([0, 0, 1, 1]), 4)) == 0.5
  assert float(ae.usage(jnp.arange(4), 4)) == 1.0


# --- networks -------------------------------------------------------------


@pytest.mark.parametrize("dims,side", [(2, 16), (3, 8)])
@pytest.mark.parametrize("vector_dim", [0, 6])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_encoder_decoder_shapes(dims, side, vector_dim, num_classes):
  x = jnp.zeros((2,) + (side,) * dims + (3,))
  y = jnp.array([0, 2]) if num_classes else None
  base = (side // 2,) * dims
  enc = ae.Encoder(**TINY, out_channels=4, vector_dim=vector_dim,
                   spatial_dims=dims, num_classes=num_classes)
  dec = ae.Decoder(**TINY, out_channels=3, vector_dim=vector_dim,
                   base_shape=base, latent_channels=2, spatial_dims=dims,
                   num_classes=num_classes)
  z_shape = (2, vector_dim) if vector_dim else (2,) + base + (4,)
  assert _shape(enc, x, y) == z_shape
  z = jnp.zeros(z_shape)
  assert _shape(dec, z, y) == x.shape
  # Conditional nets also take unlabelled batches (the null label).
  assert _shape(enc, x) == z_shape
  if num_classes:
    params = jax.eval_shape(enc.init, jax.random.key(0), x, y)["params"]
    assert params["class_embed"]["embed"]["embedding"].shape == (4, 8)


def test_decoder_latent_map_input():
  dec = ae.Decoder(**TINY, out_channels=1, spatial_dims=3)
  assert _shape(dec, jnp.zeros((1, 4, 4, 4, 5))) == (1, 8, 8, 8, 1)


def test_network_input_errors():
  with pytest.raises(ValueError, match="unconditional"):
    _shape(ae.Encoder(**TINY), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1, int))
  with pytest.raises(ValueError, match="divisible"):
    _shape(ae.Encoder(**TINY), jnp.zeros((1, 7, 8, 1)))
  with pytest.raises(ValueError, match="base_shape"):
    _shape(ae.Decoder(**TINY, vector_dim=4, base_shape=(4,)),
           jnp.zeros((1, 4)))


@pytest.mark.parametrize("dims,side", [(2, 16), (3, 8)])
def test_patch_discriminator_shapes(dims, side):
  disc = ae.PatchDiscriminator(ch=4, num_layers=2, num_groups=2,
                               spatial_dims=dims)
  x = jnp.zeros((2,) + (side,) * dims + (1,))
  assert _shape(disc, x) == (2,) + (side // 4,) * dims + (1,)


def test_conditional_autoencoder_runs():
  enc = ae.Encoder(**TINY, out_channels=4, num_classes=2)
  dec = ae.Decoder(**TINY, out_channels=1, num_classes=2)
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 1)).astype(np.float32)
  y = np.array([0, 1])
  pe = random_params(enc, x, y)
  pd = random_params(dec, np.zeros((2, 4, 4, 4), np.float32), y, seed=1)

  @jax.jit
  def recon(y):
    return dec.apply(pd, enc.apply(pe, x, y), y)

  out = np.asarray(recon(y))
  assert out.shape == x.shape and np.all(np.isfinite(out))
  # The label changes the reconstruction.
  assert np.abs(out - np.asarray(recon(1 - y))).max() > 1e-3


def test_patch_discriminator_lowerings_agree():
  # 4-wide kernels pad asymmetrically; both conv lowerings must agree.
  x = np.random.default_rng(2).normal(size=(2, 16, 16, 1)).astype(np.float32)
  grads = []
  for lowering in ("xla", "explicit"):
    disc = ae.PatchDiscriminator(ch=4, num_layers=2, num_groups=2,
                                 conv_lowering=lowering)
    params = random_params(disc, x)
    loss = lambda p, x, d=disc: jnp.sum(jnp.square(d.apply(p, x)))
    grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
