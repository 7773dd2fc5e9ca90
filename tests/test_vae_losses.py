"""Tests for medgen_jax.methods.losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax.methods import losses

LOG2PI = math.log(2 * math.pi)


def test_gaussian_nll():
  np.testing.assert_allclose(losses.gaussian_nll(1.0, 0.0, 0.0),
                             0.5 + 0.5 * LOG2PI, rtol=1e-6)
  # x=3, mean=1, scale=2: 0.5 * (2 / 2)^2 + log 2 + 0.5 log(2 pi).
  np.testing.assert_allclose(
      losses.gaussian_nll(3.0, 1.0, math.log(2.0)),
      0.5 + math.log(2.0) + 0.5 * LOG2PI, rtol=1e-6)
  out = losses.gaussian_nll(jnp.zeros((2, 4, 4, 1)), 0.0, jnp.zeros((1,)))
  assert out.shape == (2, 4, 4, 1) and out.dtype == jnp.float32


def test_laplace_nll():
  np.testing.assert_allclose(losses.laplace_nll(1.0, 0.0, 0.0),
                             1.0 + math.log(2.0), rtol=1e-6)
  # x=3, loc=1, b=2: |2| / 2 + log 2 + log 2.
  np.testing.assert_allclose(losses.laplace_nll(3.0, 1.0, math.log(2.0)),
                             1.0 + 2 * math.log(2.0), rtol=1e-6)


def test_kl_diag_gaussian():
  mean = jnp.array([0.0, 1.0, 0.0, 2.0])
  logvar = jnp.array([0.0, 0.0, math.log(2.0), math.log(0.5)])
  expected = [0.0, 0.5, 0.5 * (1.0 - math.log(2.0)),
              0.5 * (0.5 + 4.0 - 1.0 + math.log(2.0))]
  np.testing.assert_allclose(losses.kl_diag_gaussian(mean, logvar), expected,
                             rtol=1e-6, atol=1e-7)


def test_free_bits_clamps_small_dims_only():
  # Batch 2, two latent dims: batch means 0.2 (small) and 3.0 (large).
  kl = jnp.array([[0.1, 2.0], [0.3, 4.0]])
  np.testing.assert_allclose(losses.free_bits(kl, 0.5), 0.5 + 3.0, rtol=1e-6)
  # No floor: batch mean of the per-example sums (2.1 and 4.3).
  np.testing.assert_allclose(losses.free_bits(kl, 0.0), 3.2, rtol=1e-6)
  # The clamped dimension gets no gradient; the other 1 / B per element.
  g = jax.grad(losses.free_bits)(kl, 0.5)
  np.testing.assert_array_equal(g, [[0.0, 0.5], [0.0, 0.5]])
  # Higher-rank latents: every non-batch axis is a dimension.
  assert losses.free_bits(jnp.ones((3, 2, 2, 4)), 2.0) == 2.0 * 16


def test_kl_weight_ramp():
  weight = jax.jit(lambda s: losses.kl_weight(s, 2.0, 10))
  got = [float(weight(jnp.asarray(s))) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(got, [0.0, 1.0, 2.0, 2.0], rtol=1e-6)
  assert float(losses.kl_weight(jnp.asarray(0), 2.0, 0)) == 2.0


def test_commitment_loss():
  z_e = jnp.array([1.0, 2.0])
  z_q = jnp.array([0.0, 0.0])
  np.testing.assert_allclose(losses.commitment_loss(z_e, z_q, 0.25),
                             0.25 * 2.5, rtol=1e-6)
  g_e, g_q = jax.grad(losses.commitment_loss, argnums=(0, 1))(z_e, z_q, 0.25)
  # 0.25 * 2 (z_e - z_q) / 2; nothing reaches the codes.
  np.testing.assert_allclose(g_e, [0.25, 0.5], rtol=1e-6)
  np.testing.assert_array_equal(g_q, [0.0, 0.0])


def test_adversarial_losses():
  real = jnp.array([2.0, 0.5])
  fake = jnp.array([-2.0, 0.5])
  # relu(1 - real) = (0, 0.5), relu(1 + fake) = (0, 1.5).
  np.testing.assert_allclose(losses.hinge_d(real, fake),
                             0.5 * (0.25 + 0.75), rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_g(fake), 0.75, rtol=1e-6)
  # softplus(-0) = log 2, softplus(log 3) = log 4, softplus(-log 3) = log 4/3.
  l3 = math.log(3.0)
  np.testing.assert_allclose(
      losses.nonsaturating_d(jnp.array([0.0]), jnp.array([l3])),
      0.5 * (math.log(2.0) + math.log(4.0)), rtol=1e-6)
  np.testing.assert_allclose(losses.nonsaturating_g(jnp.array([l3])),
                             math.log(4.0 / 3.0), rtol=1e-6)
  # (real - 1)^2 = (1, 0.25), fake^2 = (4, 0.25), (fake - 1)^2 = (9, 0.25).
  np.testing.assert_allclose(losses.least_squares_d(real, fake),
                             0.5 * (0.625 + 2.125), rtol=1e-6)
  np.testing.assert_allclose(losses.least_squares_g(fake), 4.625, rtol=1e-6)


def test_adaptive_weight():
  np.testing.assert_allclose(losses.adaptive_weight(2.0, 1.0),
                             2.0 / 1.0001, rtol=1e-6)
  assert float(losses.adaptive_weight(1.0, 0.0, max_weight=100.0)) == 100.0
  assert float(losses.adaptive_weight(0.0, 1.0)) == 0.0
  # A weight, not a loss term: no gradient flows through it.
  assert float(jax.grad(losses.adaptive_weight)(2.0, 1.0)) == 0.0
